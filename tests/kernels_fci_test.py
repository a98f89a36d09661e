"""The FCI kernel (and its XLA path) against the dense section 5.2 formula on random inputs and random
step layouts; the O(L) memory claim at L = 8192."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from attnrl_jax.fci import fci_step_sums, step_lengths, zero_steps
from attnrl_jax.kernels.fci import fci_column_sums, fci_column_sums_xla, fci_reference
from attnrl_jax.kernels.flash_attention import attention_reference


def _layout(prompt_len, step_lens, total):
    ids = [0] * prompt_len
    for c, n in enumerate(step_lens, 1):
        ids += [c] * n
    assert len(ids) <= total
    return np.array(ids + [-1] * (total - len(ids)))


LAYOUTS = {
    "one-token-steps": lambda: (4, [1] * 20),
    "very-long-steps": lambda: (3, [30, 2, 25, 1, 1, 1]),
    "mixed": lambda: (6, [3, 1, 7, 2, 4, 6, 1, 2, 5, 3]),
    "fewer-than-delta+1-steps": lambda: (5, [6, 2, 9, 3]),  # 4 steps: every y is 0
    "single-step": lambda: (2, [17]),
}


def _dense_attention(q, k, n_valid):
    """Explicit causal softmax maps [1, N, n, n] of one row (numpy, float64)."""
    qq = np.asarray(q[:n_valid], np.float64)
    kk = np.repeat(np.asarray(k[:n_valid], np.float64), q.shape[1] // k.shape[1], axis=1)
    s = np.einsum("tnh,snh->nts", qq, kk) / np.sqrt(q.shape[-1])
    s = np.where(np.tril(np.ones((n_valid, n_valid), bool)), s, -np.inf)
    a = np.exp(s - s.max(-1, keepdims=True))
    return (a / a.sum(-1, keepdims=True))[None]


@pytest.mark.slow
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("impl,target", [("pallas", "triton"), ("pallas", "tpu"), ("xla", None)])
def test_fci_matches_dense_reference(layout, impl, target):
    prompt, lens = LAYOUTS[layout]()
    total = prompt + sum(lens) + 7  # right padding
    rng = np.random.default_rng(len(layout))
    b, n, k, h = 2, 4, 2, 16
    steps = np.stack([_layout(prompt, lens, total), _layout(prompt + 2, lens[::-1], total)])
    q = jnp.asarray(rng.normal(size=(b, total, n, h)), jnp.float32)
    kk = jnp.asarray(rng.normal(size=(b, total, k, h)), jnp.float32)
    seg = jnp.asarray(steps >= 0, jnp.int32)
    _, lse = attention_reference(q, kk, kk, seg, seg)
    num_steps = len(lens) + 1
    ids = jnp.asarray(steps)
    interpret = True if target else None
    y = fci_step_sums(
        q,
        kk,
        lse,
        ids,
        step_lengths(ids),
        num_steps,
        impl=impl,
        target=target,
        interpret=interpret,
        block_q=16,
        block_k=8,
    )
    assert y.shape == (b, n, num_steps)
    for row in range(b):
        valid = int((steps[row] >= 0).sum())
        for think in (-1, 3):
            ref, per_head = fci_reference(_dense_attention(q[row], kk[row], valid), steps[row, :valid], think)
            np.testing.assert_allclose(np.asarray(y[row]), per_head[0], atol=1e-5)
            got = np.asarray(zero_steps(y[row].max(axis=0), think))
            np.testing.assert_allclose(got, ref, atol=1e-5)
    if len(lens) < 5:  # no response step has another one Delta = 4 steps later: all zero after zeroing
        assert float(jnp.abs(zero_steps(y.max(axis=1), -1)).max()) == 0.0


@pytest.mark.slow
def test_fci_kernel_under_tpu_interpret_mode():
    prompt, lens = LAYOUTS["mixed"]()
    total = prompt + sum(lens)
    rng = np.random.default_rng(7)
    q = jnp.asarray(rng.normal(size=(1, total, 2, 16)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(1, total, 1, 16)), jnp.float32)
    ids = jnp.asarray(_layout(prompt, lens, total))[None]
    seg = jnp.ones((1, total), jnp.int32)
    _, lse = attention_reference(q, k, k, seg, seg)
    want = fci_step_sums(q, k, lse, ids, step_lengths(ids), 11, impl="xla")
    try:
        got = fci_step_sums(
            q,
            k,
            lse,
            ids,
            step_lengths(ids),
            11,
            target="tpu",
            interpret=pltpu.InterpretParams(),
            block_q=16,
            block_k=16,
        )
    finally:
        pltpu.reset_tpu_interpret_mode_state()
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_zeroing_rules():
    y = jnp.arange(1.0, 9.0)  # steps 0..7
    np.testing.assert_array_equal(zero_steps(y, -1), [0, 0, 3, 4, 5, 6, 7, 8])
    np.testing.assert_array_equal(zero_steps(y, 5), [0, 0, 3, 4, 5, 0, 0, 0])
    np.testing.assert_array_equal(step_lengths(jnp.array([[0, 0, 1, 2, 2, 2, -1]])), [[2, 2, 1, 3, 3, 3, 0]])


def _fci_temp_bytes(fn, length, n=12, k=2, h=128):
    args = (
        jax.ShapeDtypeStruct((1, length, n, h), jnp.float32),
        jax.ShapeDtypeStruct((1, length, k, h), jnp.float32),
        jax.ShapeDtypeStruct((1, n, length), jnp.float32),
        jax.ShapeDtypeStruct((1, length), jnp.int32),
        jax.ShapeDtypeStruct((1, length), jnp.int32),
    )
    return fn.lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_fci_memory_at_8192_tokens_is_far_below_one_l_by_l_array():
    """The compiled FCI forward of one layer shaped like the 1.5B model's (12 heads, 2 KV heads, head dim
    128) at L = 8192 needs a small fraction of one L x L float32 array of temporary memory, and its memory
    grows linearly in L. (float32 inputs: with bfloat16 ones XLA:CPU hoists a float32 copy of q out of the
    loop, which GPU/TPU do not need.)"""
    l_by_l = 8192 * 8192 * 4
    temp = _fci_temp_bytes(fci_column_sums_xla, 8192)
    print(
        f"\nFCI (XLA path) temp memory at L=8192: {temp / 2**20:.1f} MiB; "
        f"one L x L float32 array: {l_by_l / 2**20:.0f} MiB"
    )
    assert temp < l_by_l / 8
    # Doubling L doubles the memory of both paths (an L x L buffer would quadruple it). The Pallas
    # program here is the kernel as lowered for CPU interpretation: its memory is the head-major copies
    # of q and k that the kernel layout needs.
    for name, fn in (("XLA path", fci_column_sums_xla), ("Pallas kernel", fci_column_sums)):
        small, large = _fci_temp_bytes(fn, 4096), _fci_temp_bytes(fn, 8192)
        print(f"{name}: {small / 2**20:.1f} MiB at L=4096, {large / 2**20:.1f} MiB at L=8192")
        assert large < 2.5 * small
