"""Training metrics: a concise stdout line, JSONL, and TensorBoard event files, written by process 0.

`MetricWriter.write(step, metrics)` takes host scalars. `LaggedMetrics` keeps the device arrays of step t
and fetches them only after step t + 1 has been dispatched, so the host never makes the device wait for a
log line (the train step's metrics are read one step late).
"""

from __future__ import annotations

import json
import math
import os
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
)


class MetricWriter:
    """Writes each step's scalars to `workdir`/metrics.jsonl, TensorBoard events in `workdir`/tb, and a
    one-line summary to stdout. Only process 0 writes in a multi-process run."""

    def __init__(self, workdir: str, tensorboard: bool = True, stdout: bool = True):
        self.enabled = jax.process_index() == 0
        self.stdout = stdout
        self._jsonl = None
        self._tb = None
        if not self.enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", buffering=1)
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tb"))

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        values = {k: _scalar(v) for k, v in metrics.items()}
        self._jsonl.write(json.dumps({"step": int(step), **values}) + "\n")
        if self._tb is not None:
            for k, v in values.items():
                if v is not None and math.isfinite(v):
                    self._tb.add_scalar(k, v, int(step))
            self._tb.flush()
        if self.stdout:
            shown = [f"{k}={values[k]:.4g}" for k in HEADLINE if values.get(k) is not None]
            print(f"step {int(step)}: " + " ".join(shown), flush=True)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


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
