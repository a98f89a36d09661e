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
