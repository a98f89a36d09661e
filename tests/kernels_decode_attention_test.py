"""The Pallas decode kernel against its dense reference (generic and TPU interpret mode)."""

import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from attnrl_jax.kernels.decode_attention import decode_attention, decode_attention_reference


@pytest.mark.parametrize("n,k,block", [(4, 2, 16), (8, 2, 8), (2, 2, 128)])
@pytest.mark.parametrize("tpu", [False, True], ids=["interpret", "tpu-interpret"])
def test_decode_attention_matches_reference(n, k, block, tpu):
    rng = np.random.default_rng(n * block)
    b, s, h, c = 3, 45, 16, 6
    q = jnp.asarray(rng.normal(size=(b, n, h)), jnp.float32)
    kk = jnp.asarray(rng.normal(size=(b, s, k, h)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(b, s, k, h)), jnp.float32)
    lengths = jnp.array([45, 17, 1])
    steps = jnp.asarray(rng.integers(-1, 9, (b, s)))  # -1 = none; ids >= c merge into the last bucket
    try:
        out, lse, mass = decode_attention(
            q,
            kk,
            v,
            lengths,
            steps,
            num_steps=c,
            block_k=block,
            interpret=pltpu.InterpretParams() if tpu else True,
        )
    finally:
        if tpu:
            pltpu.reset_tpu_interpret_mode_state()
    ref_out, ref_lse, ref_mass = decode_attention_reference(q, kk, v, lengths, steps, c)
    np.testing.assert_allclose(out, ref_out, atol=1e-5)
    np.testing.assert_allclose(lse, ref_lse, atol=1e-5)
    np.testing.assert_allclose(mass, ref_mass, atol=1e-5)
    # each row's mass over all steps is the attention to keys with a step: at most 1
    assert float(mass.sum(-1).max()) <= 1.0 + 1e-5
