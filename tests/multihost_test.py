"""Multi-process training with `jax.distributed` on 127.0.0.1 and CPU (gloo) collectives: 2 processes of
one device each train the tiny task model (`task_world`) to the parameters (within 1e-5) of one process
with 2 devices (same global mesh, batch and seed); checkpoints written by either restore in the other and
continue to the same parameters; a SIGTERM to one process saves and stops both; a process that dies makes
the other exit with an error."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from trainer_test import ROOT, _overrides, _wait_for

from attnrl_jax import distributed
from attnrl_jax.checkpoint import Checkpointer

# Integration: whole jobs, subprocesses or real-compiler builds (make test-fast leaves it out).
pytestmark = pytest.mark.slow


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(world, workdir, steps, processes, extra=()):
    """Starts `processes` train.py processes (one CPU device each), or one process with 2 CPU devices."""
    args = [f"--config.{k}={v}" for k, v in _overrides(world, workdir, steps).items()]
    base = [sys.executable, "train.py", "--config=configs/base.py", *args, *extra]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    if processes == 1:
        env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
        cmds = [base + ["--config.distributed.enabled=off"]]
    else:
        env["XLA_FLAGS"] = ""
        port = _port()
        cmds = [
            base
            + [
                f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                f"--config.distributed.num_processes={processes}",
                f"--config.distributed.process_id={i}",
                "--config.distributed.heartbeat_timeout=5",
            ]
            for i in range(processes)
        ]
    return [
        subprocess.Popen(c, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for c in cmds
    ]


def _finish(procs, timeout=600):
    outs = []
    for p in procs:
        out, _ = p.communicate(timeout=timeout)
        assert p.returncode == 0, out
        outs.append(out)
    return outs


def _assert_same_params(a, b):
    # Host arrays, whatever devices and processes wrote them.
    pa, _, sa = Checkpointer(str(a / "ckpt")).restore_params()
    pb, _, sb = Checkpointer(str(b / "ckpt")).restore_params()
    assert sa == sb
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)


def _records(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _rewind(src, dst, step):
    """A copy of run `src` as if it had stopped after checkpoint `step`."""
    shutil.copytree(src, dst)
    for d in (dst / "ckpt").iterdir():
        if d.name.isdigit() and int(d.name) > step:
            shutil.rmtree(d)
    shutil.rmtree(dst / "export", ignore_errors=True)
    lines = (dst / "metrics.jsonl").read_text().splitlines()[:step]
    (dst / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))


def test_two_processes_train_like_one_and_checkpoints_cross_restore(task_world, tmp_path):
    two, one = tmp_path / "two", tmp_path / "one"
    # Recomputed behaviour log-probs and a KL term put the forward-only paths on the mesh too.
    extra = ["--config.train.recompute_logprobs=True", "--config.loss.kl_coef=0.01"]
    outs = _finish(_launch(task_world, two, 2, 2, extra) + _launch(task_world, one, 2, 1, extra))
    assert "mesh {'data': 1, 'fsdp': 2, 'tensor': 1} over 2 cpu device(s) in 2 process(es)" in outs[0]
    assert "in 1 process(es)" in outs[2]
    assert "train (attnrl" in outs[0] and "train (attnrl" not in outs[1]  # process 0 alone shows progress
    _assert_same_params(two, one)
    r2, r1 = _records(two), _records(one)
    assert len(r2) == 2  # only process 0 writes metrics
    assert all(r["update/grad_norm"] > 0 for r in r2)  # the parameters really moved
    for a, b in zip(r2, r1):
        for key in ("accuracy", "num_paths", "initial_tokens", "update/optimizer_steps"):
            assert a[key] == b[key], key
        np.testing.assert_allclose(a["update/loss"], b["update/loss"], rtol=1e-4, atol=1e-6)
    assert (two / "export" / "step_2" / "config.json").is_file()

    # A 2-process checkpoint (step 1, with the off-policy in-flight batch) resumes in 1 process, and a
    # 1-process checkpoint in 2 processes; both continue to the parameters of the uninterrupted runs.
    _rewind(two, tmp_path / "two_then_one", 1)
    _rewind(one, tmp_path / "one_then_two", 1)
    outs = _finish(
        _launch(task_world, tmp_path / "two_then_one", 2, 1, extra)
        + _launch(task_world, tmp_path / "one_then_two", 2, 2, extra)
    )
    assert "resumed from step 1" in outs[0] and "resumed from step 1" in outs[1]
    _assert_same_params(tmp_path / "two_then_one", one)
    _assert_same_params(tmp_path / "one_then_two", two)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "frozen"])
def test_a_dead_process_stops_the_others(task_world, tmp_path, sig):
    """Killed: its sockets close and the next collective fails at once. Frozen (SIGSTOP): its sockets stay
    open and a collective would wait forever; the missed heartbeats (5 s here) end the other process."""
    procs = _launch(task_world, tmp_path, 200, 2, extra=["--config.ckpt.every=1000"])
    metrics = tmp_path / "metrics.jsonl"
    try:
        _wait_for(lambda: metrics.is_file() and metrics.read_text().count("\n") >= 1, procs[0])
        procs[1].send_signal(sig)
        t = time.time()
        out, _ = procs[0].communicate(timeout=120)
        assert procs[0].returncode != 0, out
        assert time.time() - t < 120
    finally:
        procs[1].kill()
        procs[1].wait()
    # Whichever notices first: the failed collective, our heartbeat watchdog, or JAX's own error polling.
    assert "error: process 0 of 2" in out or "another task died" in out, out
    if sig == signal.SIGSTOP:
        assert "stopped sending heartbeats" in out or "another task died" in out, out


def test_sigterm_to_one_process_saves_and_stops_both(task_world, tmp_path):
    procs = _launch(task_world, tmp_path, 200, 2, extra=["--config.ckpt.every=1000"])
    metrics = tmp_path / "metrics.jsonl"
    _wait_for(lambda: metrics.is_file() and metrics.read_text().count("\n") >= 1, procs[0])
    procs[1].send_signal(signal.SIGTERM)  # a preemption notice that reached one host only
    outs = _finish(procs, timeout=300)
    assert "SIGTERM or Ctrl-C to another process: saved step" in outs[0]
    saved = Checkpointer(str(tmp_path / "ckpt")).latest_step()
    assert saved is not None and 1 <= saved < 200


def test_share_splits_items_contiguously(monkeypatch):
    monkeypatch.setattr(jax, "process_count", lambda: 3)
    shares = []
    for i in range(3):
        monkeypatch.setattr(jax, "process_index", lambda i=i: i)
        shares.append(distributed.share(8))
    assert shares == [slice(0, 3), slice(3, 6), slice(6, 8)]


def _dist_config(**kw):
    from configs import base

    c = base.get_config()
    for k, v in kw.items():
        c.distributed[k] = v
    return c


def test_initialize_decides_from_config_and_environment(monkeypatch):
    for name in ("JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    assert not distributed._wants_distributed(_dist_config().distributed)  # a laptop: single process
    assert distributed._wants_distributed(_dist_config(coordinator_address="10.0.0.1:1234").distributed)
    assert not distributed._wants_distributed(
        _dist_config(coordinator_address="h:1", enabled="off").distributed
    )
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "t0,t1,t2,t3")
    assert distributed._wants_distributed(_dist_config().distributed)
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "localhost")  # a single-host TPU VM
    assert not distributed._wants_distributed(_dist_config().distributed)
    monkeypatch.setenv("SLURM_NTASKS", "2")
    assert distributed._wants_distributed(_dist_config().distributed)
    assert not distributed.initialize(_dist_config(enabled="off"))
    with pytest.raises(ValueError, match="config.distributed.enabled='maybe'"):
        distributed.initialize(_dist_config(enabled="maybe"))
    with pytest.raises(ValueError, match=r"process_id=2 is outside \[0, num_processes=2\)"):
        distributed.initialize(_dist_config(enabled="on", num_processes=2, process_id=2))
    monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES='two'"):
        distributed.initialize(_dist_config(enabled="on"))


def test_sharded_scorer_reassembles_every_verdict_in_order(monkeypatch):
    """3 simulated processes grade 3 + 2 + 2 of 7 responses; the all-gather (faked: it stacks what each
    process sent) gives every process all 7 verdicts in the original order, strings included."""
    import concurrent.futures

    from jax.experimental import multihost_utils

    from attnrl_jax.rewards.math_grader import Verdict

    texts = [f"answer {i}" for i in range(7)]
    graded = []

    def submit(ts, gts):
        graded.append(list(ts))
        f = concurrent.futures.Future()
        f.set_result(
            [
                Verdict.of(
                    int(t[-1]) % 2 == 0, "correct" if int(t[-1]) % 2 == 0 else "mismatch", t, int(t[-1]) % 3
                )
                for t in ts
            ]
        )
        return f

    monkeypatch.setattr(jax, "process_count", lambda: 3)
    sent = []

    class Sent(Exception):
        """The first pass only collects what each process would send."""

    def record(x):
        sent.append(x)
        raise Sent

    monkeypatch.setattr(multihost_utils, "process_allgather", record)
    futures = []
    for i in range(3):
        monkeypatch.setattr(jax, "process_index", lambda i=i: i)
        futures.append(distributed.ShardedScorer(submit)(texts, texts))
        with pytest.raises(Sent):
            futures[-1].result()
    assert graded == [texts[0:3], texts[3:5], texts[5:7]]
    stacked = tuple(np.stack([s[j] for s in sent]) for j in range(len(sent[0])))
    monkeypatch.setattr(multihost_utils, "process_allgather", lambda x: stacked)
    for f in futures:
        verdicts = f.result()
        assert [v.answer for v in verdicts] == texts
        assert [v.acc for v in verdicts] == [1, 0, 1, 0, 1, 0, 1]
        assert [v.reason for v in verdicts] == ["correct", "mismatch"] * 3 + ["correct"]
        assert [v.score for v in verdicts] == [1.0, -1.0] * 3 + [1.0]
        assert [v.restarts for v in verdicts] == [i % 3 for i in range(7)]  # worker restarts travel too
