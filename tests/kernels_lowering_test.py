"""Every kernel and every model entry point that uses one lowers for CUDA (JAX's default Pallas GPU
configuration) and for TPU v5e, v5p and v6e, from this CPU-only machine, at the 1.5B model's shapes and
L = 1024, 8192 and 32768 (and 9216, the paper's training row), with the form each platform gets
(`kernels/target.py`), and each compiled kernel's estimated on-chip memory fits the smallest target
(`kernels/lowering.py`)."""

import jax
import jax.numpy as jnp
import pytest
from jax.experimental import pallas as pl

from attnrl_jax.kernels import lowering

# The kernels each entry point must contain when lowered for a TPU (GPU kernels are counted, not named).
TPU_KERNELS = {
    "flash attention forward": {"flash_attention_fwd"},
    "flash attention backward": {"flash_attention_fwd", "flash_attention_dq", "flash_attention_dkv"},
    "FCI column sums": {"fci_column_sums"},
    "decode": {"decode_attention"},
    "forward_with_fci": {"flash_attention_fwd", "fci_column_sums"},
    "train step": {"flash_attention_fwd", "flash_attention_dq", "flash_attention_dkv"},
    "sampler": {"flash_attention_fwd", "decode_attention"},  # prefill (within the prefixes), then decode
}


def test_the_default_pallas_gpu_backend_is_in_force():
    """The CUDA lowering below runs under JAX's default Pallas GPU setting (Mosaic GPU in this JAX): the
    kernels choose their Triton form themselves, nothing in the environment does it for them."""
    from jax._src import config

    assert config.jax_pallas_use_mosaic_gpu.value


@pytest.mark.parametrize("length", [*lowering.LENGTHS, 9216])  # and the paper's row length, not a power of 2
def test_every_entry_point_lowers_for_every_target(length):
    points = lowering.entry_points(length)
    assert {name.split(" (")[0] for name in points} == set(TPU_KERNELS)
    for name, (fn, args) in points.items():
        for target, (names, memory) in lowering.check(name, fn, args, lowering.TARGETS).items():
            assert memory, (name, target)
            for m in memory:
                assert m.fits, f"{name} at L={length} on {target}: {m.name} needs {m.bytes} B > {m.limit} B"
            if target.startswith("TPU"):
                assert set(names) == TPU_KERNELS[name.split(" (")[0]], (name, names)


def test_on_chip_estimate_flags_a_kernel_that_holds_a_whole_sequence():
    """The estimate is not vacuous: a TPU kernel whose block is a whole 32k-token K (the kernels before
    they were tiled) is over the VMEM limit, and so is a Triton kernel loading it at once."""
    from attnrl_jax.kernels import target as tg

    def copy(x_ref, o_ref):
        o_ref[...] = x_ref[...]

    x = jax.ShapeDtypeStruct((1, 32768, 128), jnp.bfloat16)
    spec = pl.BlockSpec((None, 32768, 128), lambda i: (i, 0, 0))

    def whole(form):
        params = tg.compiler_params(form, False, "parallel")
        call = pl.pallas_call(
            copy, grid=(1,), in_specs=[spec], out_specs=spec, out_shape=x, compiler_params=params
        )
        return lowering.on_chip_bytes(call, (x,))

    for form in ("tpu", "triton"):
        (m,) = whole(form)
        assert m.form == form and not m.fits, m


def test_on_a_tpu_mesh_each_kernel_sees_its_devices_rows():
    """forward_with_fci at the 1.5B shapes on an abstract 8-chip v5e mesh (FSDP 8), 8 rows: every kernel
    call in the lowered program takes one row (shard_map), not the all-gathered eight."""
    from jax._src.mesh import AbstractDevice, AbstractMesh

    from attnrl_jax.mesh import Sharder
    from attnrl_jax.model.transformer import forward_with_fci

    cfg = lowering._model_cfg()
    device = AbstractDevice(device_kind="TPU v5e", num_cores=1, platform="tpu")
    mesh = AbstractMesh((1, 8, 1), ("data", "fsdp", "tensor"), abstract_device=device)
    sharder = Sharder(mesh)
    row = jax.ShapeDtypeStruct((8, 1024), jnp.int32)

    def fn(p, t, s):
        return forward_with_fci(
            p, t, s, jnp.full((8,), -1), cfg=cfg, num_steps=512, targets=t, sharder=sharder
        )

    with jax.sharding.use_abstract_mesh(mesh):
        text = (
            jax.jit(fn)
            .trace(lowering._abstract_params(cfg), row, row)
            .lower(lowering_platforms=("tpu",))
            .as_text()
        )
    calls = [line for line in text.splitlines() if "tpu_custom_call" in line]
    assert len(calls) == 2  # flash attention forward and FCI, once each in the scanned layer
    for call in calls:
        assert "tensor<1x12x1024x128xbf16>" in call and "tensor<8x" not in call, call[-400:]
