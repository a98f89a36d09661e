"""Training metrics: a concise stdout line, JSONL, and TensorBoard event files, written by process 0.

`MetricWriter.write(step, metrics)` takes host scalars. `LaggedMetrics` keeps the device arrays of step t
and fetches them only after step t + 1 has been dispatched, so the host never makes the device wait for a
log line (the train step's metrics are read one step late).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Mapping

import jax
import numpy as np

from attnrl_jax.distributed import fetch

# Shown on the stdout line, in this order, when present (everything goes to JSONL and TensorBoard).
HEADLINE = (
    "accuracy",
    "reward",
    "loss",
    "kl",
    "clip_frac",
    "grad_norm",
    "valid_token_ratio",
    "prompt_batch",
    "num_paths",
    "tokens_per_s",
    "time_sample",
    "time_score",
    "time_update",
    # what the run would otherwise lose silently: verdicts that timed out or failed (scored 0), verifier
    # worker restarts, initial responses whose steps overflowed the FCI buckets or had no step separator
    # (fallback segmentation)
    "verifier_timeouts",
    "verifier_errors",
    "verifier_restarts",
    "step_overflow",
    "needs_fallback",
)


class MetricWriter:
    """Writes each step's scalars to `workdir`/metrics.jsonl, TensorBoard events in `workdir`/tb, and a
    one-line summary to stdout. Only process 0 writes in a multi-process run.

    `resume_step` is the step the run restarts from (0 for a fresh run): records of later steps, written
    by an interrupted run after its last checkpoint, are cut from metrics.jsonl (atomically), and the
    TensorBoard events are rebuilt from the records that remain, so each step appears once in both.
    """

    def __init__(self, workdir: str, tensorboard: bool = True, stdout: bool = True, resume_step: int = 0):
        self.enabled = jax.process_index() == 0
        self.stdout = stdout
        self._jsonl = None
        self._tb = None
        if not self.enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        path = os.path.join(workdir, "metrics.jsonl")
        kept = _records_up_to(path, resume_step)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
        os.replace(tmp, path)
        self._jsonl = open(path, "a", buffering=1)
        if tensorboard:
            tb_dir = os.path.join(workdir, "tb")
            if os.path.isdir(tb_dir):
                shutil.rmtree(tb_dir)
            # (imported here: tensorboardX loads torch where it is installed, about 1 s a process)
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(tb_dir)
            for r in kept:
                self._add_scalars(int(r["step"]), {k: v for k, v in r.items() if k != "step"})

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        values = {k: _scalar(v) for k, v in metrics.items()}
        self._jsonl.write(json.dumps({"step": int(step), **values}) + "\n")
        self._add_scalars(int(step), values)
        if self.stdout:
            shown = [f"{k}={values[k]:.4g}" for k in HEADLINE if values.get(k) is not None]
            print(f"step {int(step)}: " + " ".join(shown), flush=True)

    def _add_scalars(self, step: int, values: Mapping[str, float | None]) -> None:
        if self._tb is None:
            return
        for k, v in values.items():
            if v is not None and math.isfinite(v):
                self._tb.add_scalar(k, v, step)
        self._tb.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def _records_up_to(path: str, step: int) -> list[dict]:
    """The records of a metrics.jsonl with step <= `step`, in order (a torn last line is dropped)."""
    if not os.path.isfile(path):
        return []
    kept = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # the last line of a killed run may be cut short
                continue
            if int(record.get("step", step + 1)) <= step:
                kept.append(record)
    return kept


def _scalar(v) -> float | None:
    try:
        x = float(np.asarray(v))
    except (TypeError, ValueError):
        return None
    return x


class LaggedMetrics:
    """Holds the (device) metrics of the latest step; `push` returns the previous step's, fetched now."""

    def __init__(self):
        self._pending: tuple[int, dict] | None = None

    def push(self, step: int, metrics: Mapping) -> tuple[int, dict] | None:
        previous, self._pending = self._pending, (step, dict(metrics))
        return None if previous is None else (previous[0], fetch(previous[1]))

    def flush(self) -> tuple[int, dict] | None:
        previous, self._pending = self._pending, None
        return None if previous is None else (previous[0], fetch(previous[1]))
