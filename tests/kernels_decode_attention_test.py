"""The Pallas decode kernel against its dense reference: both compiled forms under generic interpretation,
the TPU form also under TPU interpret mode; one and two segmentations of the key steps, query-head groups
that are not powers of two, cache lengths that are not multiples of the tile."""

import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from attnrl_jax.kernels.decode_attention import decode_attention, decode_attention_reference

FORMS = {
    "triton": ("triton", True),
    "tpu": ("tpu", True),
    "tpu-interpret": ("tpu", pltpu.InterpretParams()),
    "per-platform": (None, None),
}


@pytest.mark.parametrize("n,k,block", [(4, 2, 16), (12, 2, 8), (7, 1, None)])
@pytest.mark.parametrize(
    "segmentations,form",
    [(r, f) for r in (0, 1, 2) for f in ("triton", "tpu", "tpu-interpret")] + [(2, "per-platform")],
)
def test_decode_attention_matches_reference(n, k, block, segmentations, form):
    target, interpret = FORMS[form]
    rng = np.random.default_rng(n * (block or 3) + segmentations)
    b, s, h, c = 3, 45, 16, 6
    q = jnp.asarray(rng.normal(size=(b, n, h)), jnp.float32)
    kk = jnp.asarray(rng.normal(size=(b, s, k, h)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(b, s, k, h)), jnp.float32)
    lengths = jnp.array([45, 17, 1])
    shape = (b, s) if segmentations == 0 else (b, s, segmentations)
    steps = jnp.asarray(rng.integers(-1, 9, shape))  # -1 = none; ids >= c merge into the last bucket
    try:
        out, lse, mass = decode_attention(
            q, kk, v, lengths, steps, num_steps=c, block_k=block, target=target, interpret=interpret
        )
    finally:
        if form == "tpu-interpret":
            pltpu.reset_tpu_interpret_mode_state()
    ref_out, ref_lse, ref_mass = decode_attention_reference(q, kk, v, lengths, steps, c)
    assert mass.shape == ref_mass.shape == (b, n, *shape[2:], c)
    np.testing.assert_allclose(out, ref_out, atol=1e-5)
    np.testing.assert_allclose(lse, ref_lse, atol=1e-5)
    np.testing.assert_allclose(mass, ref_mass, atol=1e-5)
    # each row's mass over all steps of one segmentation is the attention to keys with a step: at most 1
    assert float(mass.sum(-1).max()) <= 1.0 + 1e-5


@pytest.mark.parametrize("form", ["triton", "tpu"])
def test_without_steps_and_bad_step_shapes(form):
    target, interpret = FORMS[form]
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(2, 6, 16)), jnp.float32)
    kk = jnp.asarray(rng.normal(size=(2, 20, 2, 16)), jnp.float32)
    lengths = jnp.array([20, 3])
    out, lse, mass = decode_attention(q, kk, kk, lengths, target=target, interpret=interpret)
    ref_out, ref_lse, _ = decode_attention_reference(q, kk, kk, lengths)
    assert mass is None
    np.testing.assert_allclose(out, ref_out, atol=1e-5)
    np.testing.assert_allclose(lse, ref_lse, atol=1e-5)
    with pytest.raises(
        ValueError, match=r"key_steps must be \[B, S\] or \[B, S, R\] with \[B, S\]=\(2, 20\)"
    ):
        decode_attention(q, kk, kk, lengths, jnp.zeros((2, 19), jnp.int32), num_steps=4)
