"""Which compiled form of a Pallas kernel each platform gets, decided where the program is lowered.

Every kernel in this folder exists in two forms with one body of generic `pl.*` code each:

* "triton" (CUDA/ROCm GPUs): one program per query tile (or cache row) that loops over the key tiles
  inside the kernel. The operands stay in global memory and only the tile being used is loaded, so the
  whole sequence is never on chip. It is compiled with Triton compiler params: with JAX's default Pallas
  GPU backend, Mosaic GPU, a `pl.pallas_call` copies every operand block into shared memory (an
  8k-token K/V block is megabytes), and JAX deprecates `pl.pallas_call` for Mosaic GPU in favour of its
  own `plgpu.kernel` API, whose warpgroup-level code neither interprets on a CPU nor shares a body with
  the TPU form. Triton's block shapes must be powers of two: the kernels pad the sequence axes, the
  grouped query heads and the step buckets to powers of two where those are block shapes.
* "tpu": the key (or query) tiles are a grid axis marked "arbitrary" and the running statistics live in
  VMEM scratch, so each grid step holds one tile of every operand in VMEM (the TPU pipeline DMAs the
  next tile while the current one computes), and index maps clamp invisible tiles to the last visible
  one, so causally masked tiles are neither fetched nor computed.

`dispatch` picks the form from the platform the program is lowered for (`lax.platform_dependent`), not
from `jax.default_backend()` at trace time: lowering for CUDA or TPU from a CPU machine exercises the real
kernel, and one jitted program serves every platform. On the CPU the "triton" form runs in interpret mode
(its in-kernel loops make fewer grid steps, so it interprets fastest); tests interpret both forms.
"""

from __future__ import annotations

from collections.abc import Callable

from jax import lax

TARGETS = ("triton", "tpu")


def check_target(target: str | None) -> None:
    if target is not None and target not in TARGETS:
        raise ValueError(f"unknown kernel target {target!r}; known: {TARGETS} (None: per lowering platform)")


def resolve(target: str | None, interpret) -> tuple[str | None, object]:
    """(target, interpret) after the defaults: interpret=True alone means the interpreted "triton" form,
    TPU interpret params alone the interpreted "tpu" form; neither means per platform (target None)."""
    check_target(target)
    if target is None and interpret not in (None, False):
        target = "triton" if interpret is True else "tpu"
    return target, (False if interpret is None else interpret)


def dispatch(build: Callable[[str, object], Callable], args: tuple, target: str | None, interpret=None):
    """Runs build(target, interpret)(*args): for the given target, or per lowering platform (CPU:
    interpreted "triton"; CUDA/ROCm: "triton"; TPU: "tpu") when target is None."""
    target, interpret = resolve(target, interpret)
    if target is not None:
        return build(target, interpret)(*args)
    return lax.platform_dependent(
        *args,
        cpu=build("triton", True),
        cuda=build("triton", False),
        rocm=build("triton", False),
        tpu=build("tpu", False),
    )


def triton_params(num_warps: int = 4, num_stages: int = 2):
    from jax.experimental.pallas import triton as plt

    return plt.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def tpu_params(*semantics: str):
    from jax.experimental.pallas import tpu as pltpu

    return pltpu.CompilerParams(dimension_semantics=semantics)


def compiler_params(target: str, interpret, *tpu_semantics: str, num_warps: int = 4):
    """The compiler params of a compiled kernel (None when interpreting)."""
    if interpret is not False:
        return None
    return triton_params(num_warps) if target == "triton" else tpu_params(*tpu_semantics)


def next_pow2(x: int) -> int:
    return 1 << max(int(x) - 1, 0).bit_length()
