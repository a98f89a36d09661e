"""Accelerators a run can be compiled for on a machine that does not have them, with their real compilers.

* TPU: libtpu compiles deviceless for a topology (the route of MaxText's `train_compile.py`):
  `jax.experimental.topologies.get_topology_desc` gives compile-only devices of that topology, and
  `jax.jit(f).lower(*abstract).compile()` runs XLA:TPU and Mosaic on them. Needs `pip install -e ".[tpu]"`.
* NVIDIA GPUs: XLA:GPU (and its Triton pipeline for the Pallas kernels) compiles from a
  `GpuTargetConfigProto` (`attnrl_jax/gpu_targets/`). Needs `pip install -e ".[cuda]"`.

Names follow the clouds': `v5e-8` and `v6e-8` are 8 chips; `v5p-16` and `v4-16` count TensorCores, two
per chip (8 chips); `h100-8` and `h200-8` are 8 GPUs (more than 8: hosts of 8).

Capacity per chip comes from the compilers: libtpu states the HBM it allows when it refuses a program
(`capacity` asks it once per target with a program that cannot fit), and XLA:GPU's target config states the
device's memory, of which JAX's GPU client takes `GPU_MEMORY_FRACTION` (`train.py` sets it as
`XLA_PYTHON_CLIENT_MEM_FRACTION` on a GPU).

Nothing here starts a backend: the compile-only devices come from the topology, and JAX must run with
`JAX_PLATFORMS=cpu` (set by `train.py --compile_only` before JAX starts; a CUDA plugin without a GPU
otherwise fails to start).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import re

import jax
import jax.numpy as jnp
from jax.experimental import topologies

GPU_MEMORY_FRACTION = 0.95  # of a GPU's memory, JAX's client preallocates this (its default is 0.75)
GPU_CONFIGS = {"h100": "h100_sxm.txtpb", "h200": "h200_sxm.txtpb"}

# TPU generations: (topology prefix, chips per name unit (1: the name counts chips, 2: TensorCores),
# dimensions of the topology, chip config).
_TPUS = {
    "v5e": ("v5e", 1, 2, "default"),
    "v6e": ("v6e", 1, 2, "default"),
    "v5p": ("v5", 2, 3, "megacore"),
    "v4": ("v4", 2, 3, "megacore"),
}
EXTRAS = {"tpu": ("libtpu", ".[tpu]"), "cuda": ("jax_cuda12_plugin", ".[cuda]")}


class MissingCompiler(RuntimeError):
    """The compiler of a target is not installed; the message says which extra installs it."""


@dataclasses.dataclass(frozen=True)
class Target:
    """A compile-only target: its name, platform ("tpu" or "cuda"), chips and how to get its devices."""

    name: str
    platform: str
    chips: int
    topology: str
    chip_config: str = ""  # TPU: libtpu's chip config
    hosts_bounds: tuple[int, ...] = ()  # TPU: chips per host along each topology axis
    gpu_config: str = ""  # GPU: file in attnrl_jax/gpu_targets

    def __str__(self) -> str:
        return self.name


def _grid(chips: int, dims: int) -> tuple[int, ...]:
    """The smallest-aspect grid of `chips` chips in `dims` dimensions, powers of two, ascending with the
    axes of 1 last, as the clouds name them (2x4, 2x2x1, 2x2x4, 4x4x4)."""
    if chips < 1 or chips & (chips - 1):
        raise ValueError(f"a TPU slice of {chips} chips: expected a power of two")
    shape = [1] * dims
    i = 0
    while chips > 1:
        shape[i % dims] *= 2
        chips //= 2
        i += 1
    return tuple(sorted(shape, key=lambda x: (x == 1, x)))


def parse(name: str) -> Target:
    """The target named `name` (v5e-8, v5p-16, v6e-8, v4-8, h100-8, h200-16, ...); ValueError if unknown."""
    m = re.fullmatch(r"(v5e|v6e|v5p|v4|h100|h200)-(\d+)", name.strip().lower())
    if not m:
        raise ValueError(
            f"unknown compile target {name!r}: expected v5e-N, v6e-N, v5p-N, v4-N (TPU slices as the cloud "
            "names them) or h100-N, h200-N (N GPUs)"
        )
    kind, n = m.group(1), int(m.group(2))
    if kind in GPU_CONFIGS:
        if n < 1 or (n > 8 and n % 8):
            raise ValueError(f"{name}: N GPUs must be 1-8 or a multiple of 8 (hosts of 8)")
        hosts, per = (n // 8, 8) if n > 8 else (1, n)
        return Target(name, "cuda", n, f"{hosts}x1x{per}", gpu_config=GPU_CONFIGS[kind])
    prefix, unit, dims, chip_config = _TPUS[kind]
    if n % unit:
        raise ValueError(f"{name}: {kind} slices count TensorCores, two per chip; expected an even N")
    chips = n // unit
    shape = _grid(chips, dims)
    # One host holds up to 8 v5e/v6e chips in a 2x4 (a v5e-8 is one host), 4 v5p/v4 chips in a 2x2x1.
    host = (min(shape[0], 2), min(shape[1], 4)) + (1,) if dims == 2 else (2, 2, 1)
    host = tuple(min(h, s) for h, s in zip(host, shape + (1,) * (3 - dims)))
    return Target(name, "tpu", chips, f"{prefix}:{'x'.join(map(str, shape))}", chip_config, host)


def require(platform: str) -> None:
    """Raises MissingCompiler naming the extra to install when `platform`'s compiler is absent."""
    module, extra = EXTRAS[platform]
    if importlib.util.find_spec(module) is None:
        what = "libtpu (the TPU compiler)" if platform == "tpu" else "jax's CUDA plugin (XLA:GPU)"
        raise MissingCompiler(
            f"compiling for {platform.upper()} needs {what}, which is not installed: "
            f'pip install -e "{extra}" (or `pip install -e ".[compilers]"` for both)'
        )


def gpu_config_text(target: Target) -> str:
    path = os.path.join(os.path.dirname(__file__), "gpu_targets", target.gpu_config)
    with open(path) as f:
        return f.read()


@functools.cache
def devices(target: Target) -> tuple:
    """The target's compile-only devices (needs its compiler: `require`)."""

    require(target.platform)
    if jax.config.jax_platforms != "cpu":
        raise RuntimeError(
            f"compiling for {target} needs JAX_PLATFORMS=cpu set before JAX starts (got "
            f"{jax.config.jax_platforms!r}): the target's devices are compile-only, and a CUDA plugin "
            "without a GPU fails to start"
        )
    if target.platform == "cuda":
        desc = topologies.get_topology_desc(
            topology_name=target.topology,
            platform="cuda",
            topology=target.topology,
            target_config=gpu_config_text(target),
        )
    else:
        # libtpu takes a lock meant for processes that share a TPU; compiling needs none, and test
        # processes (pytest-xdist) compile side by side.
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        desc = topologies.get_topology_desc(
            topology_name=target.topology,
            platform="tpu",
            chip_config_name=target.chip_config,
            chips_per_host_bounds=target.hosts_bounds,
            num_slices=1,
        )
    devs = tuple(desc.devices)
    if len(devs) != target.chips:
        raise RuntimeError(f"{target}: the topology {target.topology} gave {len(devs)} devices")
    return devs


def device_kind(target: Target) -> str:
    return devices(target)[0].device_kind


@functools.cache
def capacity(target: Target) -> int:
    """Bytes of memory per chip that a program may use on `target`, as its compiler states it (module
    docstring)."""
    if target.platform == "cuda":
        m = re.search(r"device_memory_size:\s*(\d+)", gpu_config_text(target))
        return int(int(m.group(1)) * GPU_MEMORY_FRACTION)

    mesh = jax.sharding.Mesh(devices(target)[:1], ("x",))
    one = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    x = jax.ShapeDtypeStruct((1024,), jnp.float32, sharding=one)
    rows = (1 << 40) // 4096  # a TiB of float32 temporaries: more than any chip holds
    try:
        jax.jit(lambda x: jnp.broadcast_to(x, (rows, 1024)).cumsum(0)[-1]).lower(x).compile()
    except Exception as e:  # noqa: BLE001 - the message is what is wanted
        m = re.search(r"available HBM \(([\d.]+)([KMGT])\)", str(e))
        if m:
            return int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2)))
        raise RuntimeError(f"{target}: libtpu refused the probe without stating its HBM: {e}") from e
    raise RuntimeError(f"{target}: libtpu compiled a TiB of temporaries; cannot tell its HBM")
