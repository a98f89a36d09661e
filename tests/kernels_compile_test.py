"""Every Pallas kernel compiles for TPU v5e, TPU v5p and an H100 with their real compilers, from this
CPU-only machine (`benchmarks/kernel_compile.py`): the 1.5B model's heads, bfloat16, the shipped tiles, every
(segmentations, step buckets, page) the configs use for the paged decode kernel, at L = 1k, 8k and 32k. The
Triton kernels use no local memory (ptxas on sm_90a: no spills), and the compilers' limits are not vacuous
(each refuses a kernel over them)."""

import importlib.util

import jax
import jax.numpy as jnp
import pytest
from jax.experimental import pallas as pl

from attnrl_jax.kernels import target as tg
from benchmarks import kernel_compile as cc

# Real-compiler builds (make test-fast leaves them out), with the compilers only.
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("libtpu") is None or importlib.util.find_spec("jax_cuda12_plugin") is None,
        reason='the real compilers: pip install -e ".[compilers]" (make test installs them)',
    ),
]


@pytest.mark.parametrize("length", cc.LENGTHS)
def test_every_kernel_compiles_for_every_target(length):
    failed = []
    for name, (fn, args) in cc.kernel_points(length).items():
        for target in cc.TARGETS:
            try:
                cc.compile_for(fn, args, target)
            except Exception as e:  # noqa: BLE001 - collected, so one run names every failure
                failed.append(f"{name} on {target}: {str(e).splitlines()[0][:200]}")
    assert not failed, "\n".join(failed)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="the triton package (the cuda extra)")
def test_triton_kernels_do_not_spill():
    seen = set()
    for name, (fn, args) in cc.kernel_points(32768).items():
        for r in cc.triton_registers(fn, args):
            seen.add(r.kernel)
            assert r.spill_stores == r.spill_loads == 0, f"{name}: {r}"
            assert r.registers <= 255 and r.shared_bytes <= 232448, f"{name}: {r}"
    assert {"flash_attention_fwd", "flash_attention_dq", "flash_attention_dkv", "decode_attention"} <= seen


def test_the_compilers_refuse_a_kernel_over_their_limits():
    """A dot of a [1024, 128] float32 tile in one program: its operands over an H100 block's shared memory
    (XLA:GPU says so when compiling), and a 200 MiB VMEM scratch over a TPU core's VMEM (Mosaic says so)."""
    from jax.experimental.pallas import tpu as pltpu

    def matmul(x_ref, w_ref, o_ref):
        o_ref[...] = jnp.dot(x_ref[...], w_ref[...], preferred_element_type=jnp.float32)

    x = jax.ShapeDtypeStruct((1, 1024, 128), jnp.float32)
    w = jax.ShapeDtypeStruct((128, 128), jnp.float32)
    spec = pl.BlockSpec((None, 1024, 128), lambda i: (i, 0, 0))
    whole = pl.pallas_call(
        matmul,
        grid=(1,),
        in_specs=[spec, pl.BlockSpec((128, 128), lambda i: (0, 0))],
        out_specs=spec,
        out_shape=x,
        compiler_params=tg.compiler_params("triton", False),
    )
    with pytest.raises(Exception, match="Shared memory size limit exceeded"):
        cc.compile_for(whole, (x, w), "h100-1")

    def scratch(x_ref, o_ref, s_ref):
        s_ref[0] = x_ref[...]
        o_ref[...] = s_ref[0]

    tpu_spec = pl.BlockSpec((None, 8, 128), lambda i: (i, 0, 0))
    big = pl.pallas_call(
        scratch,
        grid=(1,),
        in_specs=[tpu_spec],
        out_specs=tpu_spec,
        out_shape=jax.ShapeDtypeStruct((1, 8, 128), jnp.float32),
        scratch_shapes=[pltpu.VMEM((51200, 8, 128), jnp.float32)],  # 200 MiB
        compiler_params=tg.compiler_params("tpu", False, "arbitrary"),
    )
    with pytest.raises(Exception, match="vmem|VMEM"):
        cc.compile_for(big, (jax.ShapeDtypeStruct((1, 8, 128), jnp.float32),), "v5e-1")
