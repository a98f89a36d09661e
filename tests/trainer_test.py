"""The training loop on a tiny Qwen2 over the built-in task's 384-token vocabulary (`task_world`): each
pipeline and method trains, checkpoints and exports; a run stopped by its token budget at step 1 and
resumed repeats steps 2-3 of the uninterrupted run exactly (the off-policy in-flight batch travels in the
checkpoint); a run killed with SIGKILL resumes and finishes; SIGTERM saves
and exits 0; each bad config gives its error."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from attnrl_jax import JobError
from attnrl_jax.checkpoint import Checkpointer
from helpers import trainer_overrides as _overrides

# Integration: whole jobs, subprocesses or real-compiler builds (make test-fast leaves it out).
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(world, workdir, steps, **kw):
    import configs.base as base

    c = base.get_config()
    for key, value in _overrides(world, workdir, steps, **kw).items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def _params(workdir, step=None):
    ckpt = Checkpointer(str(workdir / "ckpt"))
    step = ckpt.latest_step() if step is None else step
    from orbax.checkpoint import PyTreeCheckpointer

    tree = PyTreeCheckpointer().restore(str(workdir / "ckpt" / str(step) / "state"))
    return step, tree["params"]


def _records(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    "preset,off_policy",
    [("attnrl", True), ("attnrl", False), ("grpo", False), ("treerl", False)],
    ids=["attnrl-offpolicy", "attnrl-onpolicy", "grpo", "treerl"],
)
def test_each_mode_trains_three_steps(task_world, tmp_path, preset, off_policy):
    from attnrl_jax import trainer
    from attnrl_jax.model.hf_io import load_checkpoint

    c = _config(task_world, tmp_path, 3, preset=preset, off_policy=off_policy)
    c.train.recompute_logprobs = preset == "attnrl" and not off_policy
    trainer.run(c)
    step, params = _params(tmp_path)
    assert step == 3
    _, initial, _ = load_checkpoint(str(task_world / "model"))
    diffs = [
        float(np.abs(np.asarray(a) - np.asarray(b)).max())
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(initial))
    ]
    assert max(diffs) > 0  # the parameters changed
    records = _records(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:
        assert all(v is None or np.isfinite(v) for v in r.values())
        for key in ("accuracy", "num_paths", "time_sample", "time_score", "time_update", "tokens_per_s"):
            assert key in r
    updated = [r for r in records if "update/loss" in r]
    assert updated and all(r["update/finite"] == 1.0 for r in updated)
    if c.train.recompute_logprobs:  # on-policy: the forward pass agrees with the sampler's log-probs
        assert all(r["update/logp_mismatch"] < 1e-4 for r in updated)
    exported = tmp_path / "export" / "step_3"
    assert (exported / "config.json").is_file() and (exported / "tokenizer.json").is_file()


def test_a_run_stopped_by_its_token_budget_resumes_exactly(task_world, tmp_path):
    """A budget of 1 token stops after step 1 (checkpoint with the off-policy in-flight batch, export);
    the same command again takes no step (it used to take one past the budget); with the budget lifted it
    resumes, and its steps 2-3 are the uninterrupted run's (benchmarks.task_comparison evaluates policies
    at fractions of its budget this way)."""
    from attnrl_jax import trainer

    trainer.run(_config(task_world, tmp_path / "straight", 3))
    split = tmp_path / "split"
    c = _config(task_world, split, 3)
    c.train.max_generated_tokens = 1
    trainer.run(c)
    assert [r["step"] for r in _records(split)] == [1]
    assert os.path.isdir(os.path.join(split, "ckpt", "1", "arrays"))  # the in-flight batch is saved
    assert (split / "export" / "step_1" / "config.json").is_file()
    assert trainer.run(c) == {}  # resumed at step 1 with the budget spent: no step
    assert [r["step"] for r in _records(split)] == [1]
    assert Checkpointer(str(split / "ckpt")).latest_step() == 1
    c.train.max_generated_tokens = 0
    with pytest.raises(JobError, match=r"config.train.max_generated_tokens: 1 there, 0 now"):
        trainer.run(c)  # a changed setting is refused unless accepted
    c.accept_changes = "train.max_generated_tokens"
    trainer.run(c)  # resumes from step 1
    assert trainer.latest_export(str(split)).endswith("step_3")
    s1, p1 = _params(tmp_path / "straight")
    s2, p2 = _params(split)
    assert s1 == s2 == 3
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for r1, r2 in zip(_records(tmp_path / "straight")[1:], _records(split)[1:], strict=True):
        for key in ("accuracy", "num_paths", "update/loss", "update/grad_norm", "total_generated_tokens"):
            assert r1[key] == r2[key], key
    records = _records(split)  # the other budgets' totals count across the resume
    assert [r["total_paths"] for r in records] == list(np.cumsum([r["num_paths"] for r in records]))
    steps = np.cumsum([r["update/optimizer_steps"] for r in records])
    assert [r["total_optimizer_steps"] for r in records] == list(steps)


def test_budget_spent_names_the_first_budget_reached():
    from ml_collections import ConfigDict

    from attnrl_jax.trainer import budget_spent

    c = ConfigDict({"train": {"max_generated_tokens": 1000, "max_paths": 0, "max_optimizer_steps": 12}})
    totals = {"generated_tokens": 999, "paths": 10**6, "optimizer_steps": 11}
    assert budget_spent(c, totals) is None  # max_paths 0 is no limit
    assert budget_spent(c, dict(totals, optimizer_steps=12)) == "12 of 12 optimizer steps"
    assert budget_spent(c, dict(totals, generated_tokens=1500)) == "1,500 of 1,000 tokens sampled"
    c.train.max_paths = 50
    assert budget_spent(c, totals) == "1,000,000 of 50 training paths"


def _cli(world, workdir, steps, extra=()):
    args = [f"--config.{k}={v}" for k, v in _overrides(world, workdir, steps).items()]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", PYTHONUNBUFFERED="1")
    return [sys.executable, "train.py", "--config=configs/base.py", *args, *extra], env


def _wait_for(predicate, proc, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run exited early with {proc.returncode}: {proc.stdout.read()}")
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("timed out")


def test_sigkill_resumes_and_finishes(task_world, tmp_path):
    cmd, env = _cli(task_world, tmp_path, 4)
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    ckpt_dir = tmp_path / "ckpt"
    _wait_for(lambda: ckpt_dir.is_dir() and any(p.name.isdigit() for p in ckpt_dir.iterdir()), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = Checkpointer(str(ckpt_dir)).latest_step()
    assert killed_at is not None and killed_at < 4
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"resumed from step {killed_at}" in done.stdout
    assert Checkpointer(str(ckpt_dir)).latest_step() == 4
    assert [r["step"] for r in _records(tmp_path)] == [1, 2, 3, 4]  # each step once, resume or not


def test_sigterm_saves_and_exits_zero(task_world, tmp_path):
    cmd, env = _cli(task_world, tmp_path, 100, extra=["--config.ckpt.every=1000"])
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    metrics = tmp_path / "metrics.jsonl"
    _wait_for(lambda: metrics.is_file() and metrics.read_text().count("\n") >= 1, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert "SIGTERM: saved step" in out
    saved = Checkpointer(str(tmp_path / "ckpt")).latest_step()
    assert saved is not None and 1 <= saved < 100


@pytest.mark.parametrize(
    "override,message",
    [
        ("--config.train.nope=1", "nope"),  # unknown key (the locked config refuses it)
        ("--config.train.steps=zero", "steps"),  # a value of the wrong type
        ("--config.train.steps=0", "config.train.steps must be at least 1"),
        ("--config.algo.preset=ppo", "unknown algorithm preset 'ppo'"),
        ("--config.loss.aggregation=mean", "loss.aggregation"),
        ("--config.data.train_path=/nonexistent.parquet", "config.data.train_path='/nonexistent.parquet'"),
        ("--config.model.hf_path=/nonexistent_model", "/nonexistent_model"),
        ("--config.train.rows_per_device=-1", "config.train.rows_per_device must be 0 or positive"),
        ("--config.train.micro_batches=2", "micro_batches"),  # the old key: rows_per_device replaced it
    ],
)
def test_bad_config_gives_a_clear_error(task_world, tmp_path, override, message):
    cmd, env = _cli(task_world, tmp_path, 2, extra=[override])
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert message in done.stdout + done.stderr, done.stdout + done.stderr
    assert not (tmp_path / "ckpt").exists()  # nothing was written


def test_the_train_state_waits_in_host_memory_while_the_sampler_runs(task_world, tmp_path, monkeypatch):
    """train.offload_state (on by default): while the sampling stage runs, the float32 parameters and both
    AdamW moments are in host memory (pinned_host), not on the devices (and the steps train as before:
    test_a_run_stopped_by_its_token_budget_resumes_exactly)."""
    from attnrl_jax import trainer

    seen = []
    original = trainer.sample_stage

    def spy(*args, **kwargs):
        host = [x for x in jax.live_arrays() if x.sharding.memory_kind == "pinned_host"]
        seen.append(sum(x.nbytes for x in host))
        return original(*args, **kwargs)

    monkeypatch.setattr(trainer, "sample_stage", spy)
    trainer.run(_config(task_world, tmp_path, 2))
    _, params = _params(tmp_path)
    param_bytes = sum(np.asarray(x).nbytes for x in jax.tree.leaves(params))
    assert len(seen) == 2
    for held in seen:
        assert held >= 3 * param_bytes, (held, param_bytes)
