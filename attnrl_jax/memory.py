"""What a run holds on each chip, and the room it leaves the sampler's KV cache.

A training run keeps its train state (float32 parameters and AdamW's two moments), the frozen reference
(compute dtype, when `loss.kl_coef > 0`) and, while it samples, a compute-dtype copy of the policy for the
sampler. The sampler's call is not all that must fit: `trainer.run` moves the train state to host memory
for the sampling stage (`train.offload_state`; the sampler reads only its own copy) and drops the sampler's
copy before the update, and `resident_bytes` counts what stays, per chip, from the arrays themselves (or
their abstract shapes with shardings, in the compile-only fit check, `attnrl_jax/fit.py`).

The sampler's cache budget follows the chip (`config.sampler.cache_gib` unset): a fraction
(`config.sampler.memory_fraction`) of the memory a chip has left after what stays resident, as vLLM's
`gpu_memory_utilization` does; the rest is the sampler program's own working memory (prefill activations,
all-gathered weights, logits). The capacity comes from the device (`memory_stats()["bytes_limit"]`) or, when
compiling for a target without it, from the target's compiler (`targets.capacity`). A CPU states no limit:
there the budget is `CPU_CACHE_GIB`.
"""

from __future__ import annotations

import math

import jax
import numpy as np

GiB = 2**30
CPU_CACHE_GIB = 12.0  # the sampler's budget where the device states no memory limit (a CPU)


def shard_bytes(x) -> int:
    """Bytes of the largest shard of one array (a jax.Array or a ShapeDtypeStruct with a sharding)."""
    sharding = getattr(x, "sharding", None)
    shape = tuple(x.shape)
    if sharding is not None and hasattr(sharding, "shard_shape"):
        shape = tuple(sharding.shard_shape(shape))
    return math.prod(shape) * np.dtype(x.dtype).itemsize


def resident_bytes(*trees) -> int:
    """Bytes per chip of every array in `trees` (None entries skipped), each at its largest shard."""
    return sum(shard_bytes(x) for t in trees if t is not None for x in jax.tree.leaves(t))


def device_capacity(device=None) -> int | None:
    """The memory a program may use on `device` (default: this process's first), or None where the
    device states none (CPU)."""
    device = device or jax.local_devices()[0]
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - a backend without memory stats
        return None
    return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


def cache_gib(fixed: float | None, capacity: int | None, resident: int, fraction: float) -> float:
    """The sampler's per-chip cache budget in GiB: `fixed` when set (0: no limit), else `fraction` of what
    `capacity` leaves after `resident` bytes (module docstring)."""
    if fixed is not None:
        return float(fixed)
    if capacity is None:
        return CPU_CACHE_GIB
    room = fraction * (capacity - resident)
    if room <= 0:
        raise ValueError(
            f"the run keeps {resident / GiB:.2f} GiB per chip resident while sampling, and the chip holds "
            f"{capacity / GiB:.2f} GiB: no room for the sampler's KV cache (a larger mesh splits the state "
            "further; config.train.offload_state moves the train state to host memory while sampling)"
        )
    return room / GiB


def check_memory_settings(section, name: str) -> None:
    """ValueError naming the key unless `section` (config.sampler or config.eval) has a cache_gib of None
    or >= 0 and a memory_fraction in (0, 1]."""
    if section.cache_gib is not None and not section.cache_gib >= 0:
        raise ValueError(
            f"config.{name}.cache_gib must be unset (from the chip), 0 (no limit) or a positive number of "
            f"GiB, got {section.cache_gib}"
        )
    if not 0 < section.memory_fraction <= 1:
        raise ValueError(f"config.{name}.memory_fraction must be in (0, 1], got {section.memory_fraction}")


def to_host(tree):
    """`tree` moved to host memory with the same shardings (`pinned_host`), freeing its device memory."""
    return jax.tree.map(lambda x: jax.device_put(x, x.sharding.with_memory_kind("pinned_host")), tree)


def to_device(tree):
    """The inverse of `to_host`."""
    return jax.tree.map(lambda x: jax.device_put(x, x.sharding.with_memory_kind("device")), tree)
