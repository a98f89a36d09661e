"""The Pallas flash attention against the dense reference, in interpret mode on CPU: both compiled forms
("triton", "tpu"; `kernels/target.py`) under generic interpretation, the TPU form also under TPU interpret
mode, and the per-platform default; outputs, log-sum-exp and gradients."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from attnrl_jax.kernels.flash_attention import BlockSizes, attention_reference, flash_attention


def _inputs(b, t, s, n, k, h, seed=0, dtype=jnp.float32):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (b, t, n, h), dtype)
    kk = jax.random.normal(ks[1], (b, s, k, h), dtype)
    v = jax.random.normal(ks[2], (b, s, k, h), dtype)
    do = jax.random.normal(ks[3], (b, t, n, h), jnp.float32)
    return q, kk, v, do


def _segments(b, length, kind):
    seg = np.ones((b, length), np.int32)
    if kind == "padded":
        seg[0, length - 5 :] = 0  # right padding
        seg[-1, :3] = 0  # left padding
    elif kind == "packed":
        seg[:, length // 3 :] = 2
        seg[:, 2 * length // 3 :] = 3
        seg[0, length - 2 :] = 0
    return jnp.asarray(seg)


FORMS = [("triton", True), ("tpu", True)]


def _check(q, k, v, do, qseg, kseg, blocks, target=None, interpret=None, atol=1e-5, grad_atol=1e-5):
    kernel = functools.partial(flash_attention, block_sizes=blocks, target=target, interpret=interpret)
    out, lse = kernel(q, k, v, qseg, kseg)
    ref_out, ref_lse = attention_reference(q, k, v, qseg, kseg)
    rows = np.asarray(qseg) != 0
    np.testing.assert_allclose(
        np.asarray(out, np.float32)[rows], np.asarray(ref_out, np.float32)[rows], atol=atol
    )
    np.testing.assert_allclose(
        np.asarray(lse).transpose(0, 2, 1)[rows],
        np.asarray(ref_lse).transpose(0, 2, 1)[rows],
        atol=atol,
        rtol=1e-6,
    )

    def loss(fn):
        def f(q, k, v):
            o, lse = fn(q, k, v)
            lse = jnp.where(jnp.isfinite(lse), lse, 0.0)  # rows that see nothing carry +inf
            return jnp.sum(o.astype(jnp.float32) * do) + 0.1 * jnp.sum(lse)

        return jax.jit(jax.grad(f, argnums=(0, 1, 2)))

    ours = loss(lambda q, k, v: kernel(q, k, v, qseg, kseg))(q, k, v)
    theirs = loss(lambda q, k, v: attention_reference(q, k, v, qseg, kseg))(q, k, v)
    for name, a, b in zip("qkv", ours, theirs):
        err = float(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)).max())
        assert err <= grad_atol, (name, err)


CASES = {
    "ratio1": (4, 4, 32, BlockSizes(8, 8, 8, 8), "none"),  # GQA ratio 1
    "ragged": (4, 2, 37, BlockSizes(16, 8, 8, 16), "padded"),  # ratio 2, length not a multiple of the block
    "packed": (8, 2, 45, BlockSizes(16, 16, 16, 16), "packed"),  # ratio 4, packed rows
    "default-blocks": (
        4,
        1,
        20,
        None,
        "padded",
    ),  # each form's default blocks shrunk to a short sequence, MQA
    "group6": (6, 2, 70, BlockSizes(24, 16, 16, 24), "padded"),  # group of 6 (the 1.5B model's), ragged tiles
}


# Every case for the GPU form; for the TPU form (slower to compile in interpret mode) the ragged, packed
# and group-of-6 ones.
@pytest.mark.slow
@pytest.mark.parametrize(
    "case,target",
    [(c, "triton") for c in CASES] + [(c, "tpu") for c in ("ragged", "packed", "group6")],
)
def test_float32_matches_reference(case, target):
    n, k, t, blocks, segments = CASES[case]
    q, kk, v, do = _inputs(2, t, t, n, k, 16, seed=n + k + t)
    seg = _segments(2, t, segments)
    _check(q, kk, v, do, seg, seg, blocks, target, True)


@pytest.mark.slow
def test_per_platform_default_on_cpu():
    """No target: the program picks its form where it is lowered (on the CPU: the interpreted GPU form),
    with a padding that both forms' default tiles divide."""
    q, kk, v, do = _inputs(1, 130, 130, 4, 2, 16, seed=11)
    seg = _segments(1, 130, "padded")
    _check(q, kk, v, do, seg, seg, None)


@pytest.mark.slow
@pytest.mark.parametrize("target,interpret", FORMS, ids=["triton", "tpu"])
def test_queries_aligned_to_the_end_of_the_keys(target, interpret):
    """T < S: the T queries are the last T positions (a cached prefill); forward and gradients."""
    q, k, v, do = _inputs(2, 9, 30, 4, 2, 16, seed=3)
    kseg = _segments(2, 30, "none")
    _check(q, k, v, do, kseg[:, -9:], kseg, BlockSizes(8, 8, 8, 8), target, interpret)


@pytest.mark.slow
def test_bfloat16_within_stated_tolerance():
    """bf16 q/k/v (f32 statistics inside): output within 2e-2 and gradients within 6e-2 of the f32
    reference on the same bf16 inputs."""
    q, k, v, do = _inputs(2, 40, 40, 4, 2, 32, seed=5, dtype=jnp.bfloat16)
    seg = _segments(2, 40, "padded")
    _check(q, k, v, do, seg, seg, BlockSizes(16, 16, 16, 16), "triton", True, atol=2e-2, grad_atol=6e-2)


@pytest.mark.slow
@pytest.mark.parametrize("n,k,t", [(4, 2, 40)])
def test_tpu_interpret_mode(n, k, t):
    """The TPU form under Pallas's TPU interpreter (TPU memory spaces, scratch and DMA semantics simulated
    on CPU)."""
    q, kk, v, do = _inputs(1, t, t, n, k, 16, seed=t)
    seg = _segments(1, t, "padded")
    try:
        _check(q, kk, v, do, seg, seg, BlockSizes(16, 16, 16, 16), "tpu", pltpu.InterpretParams())
    finally:
        pltpu.reset_tpu_interpret_mode_state()


def test_block_sizes_are_validated_and_shapes_checked():
    with pytest.raises(ValueError, match="BlockSizes.block_q must be a positive multiple of 8, got 12"):
        BlockSizes(block_q=12)
    q, k, v, _ = _inputs(1, 8, 8, 3, 2, 8)
    seg = jnp.ones((1, 8), jnp.int32)
    with pytest.raises(ValueError, match="query heads 3 are not a multiple of key/value heads 2"):
        flash_attention(q, k, v, seg, seg)
    with pytest.raises(ValueError, match="unknown kernel target 'mosaic'"):
        flash_attention(q, k[:, :, :1], v[:, :, :1], seg, seg, target="mosaic")


def test_padded_length_is_divisible_by_every_tile_or_covered_by_it():
    from attnrl_jax.kernels.flash_attention import padded_length

    assert padded_length(20, [128, 64, 256]) == 24  # one tile of 24 for every form
    assert padded_length(200, [128, 64, 256]) == 256
    assert padded_length(300, [128, 64, 256]) == 512
    for length in (1, 7, 130, 1000):
        p = padded_length(length, [136, 128])
        assert p >= length and all(p % b == 0 or b >= p for b in (136, 128))
