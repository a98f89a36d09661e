"""Shared timing helper of the benchmark scripts."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def median_seconds(fn: Callable[[], object], iters: int) -> float:
    """Median wall time of `fn()` over `iters` runs after one warm-up run (compilation, caches).

    `fn` must block until its result is ready (e.g. `jax.block_until_ready`).
    """
    fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
