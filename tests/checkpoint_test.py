"""Orbax checkpoints: exact round trip of the train state and metadata, max_to_keep, unfinished saves,
restore into another sharding, and the SIGTERM guard."""

import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnrl_jax.algo import RunningMean
from attnrl_jax.checkpoint import Checkpointer, PreemptionGuard
from attnrl_jax.mesh import MeshConfig, Sharder, make_mesh
from attnrl_jax.model import ModelConfig, init_params
from attnrl_jax.rl import OptimConfig, init_sharded_train_state, init_train_state, make_optimizer

CFG = ModelConfig.tiny(vocab_size=48, num_layers=1, param_dtype="bfloat16")


def _state(seed=0):
    return init_train_state(init_params(CFG, jax.random.key(seed)), make_optimizer(OptimConfig()))


def test_round_trip_keeps_everything(tmp_path):
    ckpt = Checkpointer(str(tmp_path / "ckpt"), max_to_keep=2)
    state = _state()
    meta = {
        "data": {"seed": 1, "epoch": 2, "position": 5},
        "running_fci": RunningMean(1.5, 3)._asdict(),
        "batch_size": [70, 4],
        "rng": [1, 2],
        "config": {"algo": "attnrl"},
    }
    for step in (1, 2, 3):
        ckpt.save(step, state, {**meta, "step": step})
    assert ckpt.all_steps() == [2, 3] and ckpt.latest_step() == 3
    restored, got_meta, step = ckpt.restore(_state(seed=9))
    assert step == 3 and got_meta == {**meta, "step": 3}
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    assert restored.params["embed"].dtype == jnp.bfloat16


def test_unfinished_save_is_never_restored(tmp_path):
    ckpt = Checkpointer(str(tmp_path / "ckpt"))
    ckpt.save(1, _state(), {"step": 1})
    # What a crash in the middle of writing step 2 leaves behind: a temporary directory.
    os.makedirs(tmp_path / "ckpt" / "2.orbax-checkpoint-tmp-1234" / "state")
    (tmp_path / "ckpt" / "2.orbax-checkpoint-tmp-1234" / "state" / "partial").write_text("x")
    reopened = Checkpointer(str(tmp_path / "ckpt"))
    assert reopened.latest_step() == 1
    _, meta, step = reopened.restore(_state())
    assert step == 1 and meta == {"step": 1}
    with pytest.raises(FileNotFoundError, match="no finished checkpoint"):
        Checkpointer(str(tmp_path / "empty")).restore(_state())


def test_restore_into_another_sharding(tmp_path):
    opt = make_optimizer(OptimConfig())
    params = init_params(CFG, jax.random.key(4))
    mesh_a = Sharder(make_mesh(MeshConfig(data=1, fsdp=8, tensor=1)))
    mesh_b = Sharder(make_mesh(MeshConfig(data=1, fsdp=2, tensor=4)))
    state = init_sharded_train_state(params, opt, mesh_a, CFG)
    ckpt = Checkpointer(str(tmp_path / "ckpt"))
    ckpt.save(7, state, {"step": 7})
    target = init_sharded_train_state(init_params(CFG, jax.random.key(5)), opt, mesh_b, CFG)
    restored, _, _ = ckpt.restore(target)
    assert restored.params["layers"]["q"].sharding.spec == target.params["layers"]["q"].sharding.spec
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_preemption_guard_turns_sigterm_into_a_flag():
    before = signal.getsignal(signal.SIGTERM)
    with PreemptionGuard() as guard:
        assert not guard.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert guard.requested  # the process is still alive, and the loop can save and exit
    assert signal.getsignal(signal.SIGTERM) == before


@pytest.mark.parametrize("damage", ["meta record deleted", "state file truncated"])
def test_a_damaged_newest_step_falls_back_and_is_kept_aside(tmp_path, damage):
    ckpt = Checkpointer(str(tmp_path / "ckpt"), max_to_keep=3)
    for step in (1, 2):
        ckpt.save(step, _state(seed=step), {"step": step})
    newest = tmp_path / "ckpt" / "2"
    if damage == "meta record deleted":
        (newest / "meta" / "metadata").unlink()
    else:
        data = [os.path.join(d, f) for d, _, fs in os.walk(newest / "state") for f in fs if "/d" in d]
        biggest = max(data, key=os.path.getsize)
        os.truncate(biggest, os.path.getsize(biggest) // 3)
    said = []
    reopened = Checkpointer(str(tmp_path / "ckpt"))
    assert reopened.meta() is None or damage != "meta record deleted"  # the quick look does not raise
    state, meta, _, step = reopened.restore_all(_state(), say=said.append)
    assert step == 1 and meta == {"step": 1}
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(_state(seed=1))):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    assert (
        "checkpoint step 2" in said[0]
        and "is damaged" in said[0]
        and said[1].startswith("resuming from step 1")
    )
    assert (tmp_path / "ckpt.damaged" / "2").is_dir() and reopened.all_steps() == [1]
    reopened.save(2, state, {"step": 2})  # the run goes on and saves step 2 again
    assert reopened.all_steps() == [1, 2]


def test_no_intact_step_stops_naming_the_directory_and_deletes_nothing(tmp_path):
    from attnrl_jax import JobError

    ckpt = Checkpointer(str(tmp_path / "ckpt"))
    for step in (1, 2):
        ckpt.save(step, _state(), {"step": step})
        (tmp_path / "ckpt" / str(step) / "meta" / "metadata").unlink()
    with pytest.raises(JobError, match=r"no kept checkpoint step restores \(steps \[1, 2\]; step 2: ") as e:
        Checkpointer(str(tmp_path / "ckpt")).restore_all(_state(), say=print)
    assert str(e.value).splitlines()[1].startswith(f"Delete {tmp_path / 'ckpt'} to start the run over")
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["1", "2"] and not (tmp_path / "ckpt.damaged").exists()


def test_ctrl_c_is_a_stop_request_and_a_second_one_stops_at_once():
    before = signal.getsignal(signal.SIGINT)
    with PreemptionGuard() as guard:
        os.kill(os.getpid(), signal.SIGINT)
        assert guard.requested and guard.signal_name == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) == before
