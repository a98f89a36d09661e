"""Decode attention in Pallas: one query token per row over a KV cache with per-row lengths, returning the
output, the log-sum-exp and (optionally) the attention mass that the token pays to each key step.

The grid is (row, KV head); each program serves the G query heads of its KV head (no K/V copies) and loops
only over the cache blocks below the row's length, so the unused tail of the cache is never read. With key
step ids it makes a second pass over the same blocks, recomputing p = exp(s - lse) and reducing it per step
through a one-hot matmul ([G, block] x [block, C]): the per-token rows that FCI accumulates while decoding.
`decode_attention_reference` is the dense float32 version of the same contract.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from attnrl_jax.kernels.flash_attention import MASK_VALUE, _dot_t, _round_up, default_interpret


def _decode_kernel(len_ref, q_ref, k_ref, v_ref, *rest, scale, bk, num_steps):
    if num_steps:
        steps_ref, o_ref, lse_ref, mass_ref = rest
    else:
        o_ref, lse_ref = rest
    length = len_ref[0, 0]
    q = q_ref[...]  # [G, H]
    g, h = q.shape
    nblocks = (length + bk - 1) // bk

    def scores(j):
        ks = pl.ds(pl.multiple_of(j * bk, bk), bk)
        s = _dot_t(q, k_ref[ks, :]) * scale  # [G, bk]
        valid = (j * bk + lax.broadcasted_iota(jnp.int32, (g, bk), 1)) < length
        return ks, s, valid

    def body(j, carry):
        acc, m, denom = carry
        ks, s, valid = scores(j)
        s = jnp.where(valid, s, MASK_VALUE)
        m_new = jnp.maximum(m, s.max(axis=1, keepdims=True))
        p = jnp.where(valid, jnp.exp(s - m_new), 0.0)
        corr = jnp.exp(m - m_new)
        denom = corr * denom + p.sum(axis=1, keepdims=True)
        acc = corr * acc + jnp.dot(p.astype(v_ref.dtype), v_ref[ks, :], preferred_element_type=jnp.float32)
        return acc, m_new, denom

    init = (
        jnp.zeros((g, h), jnp.float32),
        jnp.full((g, 1), MASK_VALUE, jnp.float32),
        jnp.zeros((g, 1), jnp.float32),
    )
    acc, m, denom = lax.fori_loop(0, nblocks, body, init)
    seen = denom > 0
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, denom, 1.0)), jnp.inf)
    o_ref[...] = jnp.where(seen, acc / jnp.where(seen, denom, 1.0), 0.0).astype(o_ref.dtype)
    lse_ref[...] = lse
    if num_steps:

        def mass_body(j, mass):
            ks, s, valid = scores(j)
            p = jnp.where(valid, jnp.exp(s - lse), 0.0)  # [G, bk]
            onehot = (steps_ref[ks, :] == lax.broadcasted_iota(jnp.int32, (bk, num_steps), 1)).astype(
                jnp.float32
            )
            return mass + jnp.dot(p, onehot, preferred_element_type=jnp.float32)

        mass_ref[...] = lax.fori_loop(0, nblocks, mass_body, jnp.zeros((g, num_steps), jnp.float32))


@functools.partial(jax.jit, static_argnames=("num_steps", "block_k", "interpret"))
def decode_attention(
    q, k, v, lengths, key_steps=None, *, num_steps: int = 0, block_k: int = 128, interpret=None
):
    """Attention of one query per row over a cache.

    Args:
      q: [B, N, H] (the new token's queries; it has already been written into the cache).
      k, v: [B, S, K, H] caches; positions < lengths[b] are attended to.
      lengths: [B] int32 valid cache length per row (the new token included).
      key_steps: [B, S] step id of each cache position (-1: none; >= num_steps: merged into the last step),
        or [B, S, R] for R segmentations at once.
      num_steps: C; 0 skips the mass.
      block_k: cache tile (multiple of 8).
      interpret: as in `flash_attention`.

    Returns:
      (out [B, N, H], lse [B, N] float32, mass [B, N, C] (or [B, N, R, C]) float32 or None)
    """
    b, n, h = q.shape
    s, kv_heads = k.shape[1], k.shape[2]
    g = n // kv_heads
    if n % kv_heads or k.shape != v.shape or k.shape[0] != b:
        raise ValueError(
            f"decode attention needs q [B, N, H] and k/v [B, S, K, H]; got {q.shape}, {k.shape}, {v.shape}"
        )
    if block_k % 8:
        raise ValueError(f"block_k must be a multiple of 8, got {block_k}")
    if interpret is None:
        interpret = default_interpret()
    bk = min(block_k, _round_up(s, 8))
    sp = _round_up(s, bk)
    kh = jnp.pad(k.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, sp - s), (0, 0)))
    vh = jnp.pad(v.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, sp - s), (0, 0)))
    qg = q.reshape(b, kv_heads, g, h)
    args = [lengths.astype(jnp.int32).reshape(b, 1, 1), qg, kh, vh]
    in_specs = [
        pl.BlockSpec((None, 1, 1), lambda bi, ki: (bi, 0, 0)),
        pl.BlockSpec((None, None, g, h), lambda bi, ki: (bi, ki, 0, 0)),
        pl.BlockSpec((None, None, sp, h), lambda bi, ki: (bi, ki, 0, 0)),
        pl.BlockSpec((None, None, sp, h), lambda bi, ki: (bi, ki, 0, 0)),
    ]
    out_specs = [
        pl.BlockSpec((None, None, g, h), lambda bi, ki: (bi, ki, 0, 0)),
        pl.BlockSpec((None, None, g, 1), lambda bi, ki: (bi, ki, 0, 0)),
    ]
    out_shape = [
        jax.ShapeDtypeStruct(qg.shape, q.dtype),
        jax.ShapeDtypeStruct((b, kv_heads, g, 1), jnp.float32),
    ]
    squeeze = num_steps and key_steps.ndim == 2
    if num_steps:
        steps = key_steps[..., None] if squeeze else key_steps  # [B, S, R]
        r = steps.shape[-1]
        steps = jnp.where(steps >= 0, jnp.minimum(steps, num_steps - 1) + num_steps * jnp.arange(r), -1)
        args.append(jnp.pad(steps.astype(jnp.int32), ((0, 0), (0, sp - s), (0, 0)), constant_values=-1))
        in_specs.append(pl.BlockSpec((None, sp, r), lambda bi, ki: (bi, 0, 0)))
        out_specs.append(pl.BlockSpec((None, None, g, r * num_steps), lambda bi, ki: (bi, ki, 0, 0)))
        out_shape.append(jax.ShapeDtypeStruct((b, kv_heads, g, r * num_steps), jnp.float32))
    outs = pl.pallas_call(
        functools.partial(_decode_kernel, scale=h**-0.5, bk=bk, num_steps=num_steps),
        grid=(b, kv_heads),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        interpret=interpret,
        name="decode_attention",
    )(*args)
    out, lse = outs[0].reshape(b, n, h), outs[1].reshape(b, n)
    mass = None
    if num_steps:
        mass = outs[2].reshape(b, n, -1, num_steps)
        mass = mass[:, :, 0] if squeeze else mass
    return out, lse, mass


def decode_attention_reference(q, k, v, lengths, key_steps=None, num_steps: int = 0):
    """Dense float32 reference of `decode_attention`."""
    b, n, h = q.shape
    s, kv_heads = k.shape[1], k.shape[2]
    kr = jnp.repeat(k.astype(jnp.float32), n // kv_heads, axis=2)
    vr = jnp.repeat(v.astype(jnp.float32), n // kv_heads, axis=2)
    logits = jnp.einsum("bnh,bsnh->bns", q.astype(jnp.float32), kr) * h**-0.5
    valid = (jnp.arange(s)[None, :] < lengths[:, None])[:, None, :]
    lse = jax.nn.logsumexp(jnp.where(valid, logits, -jnp.inf), axis=-1)
    p = jnp.where(valid, jnp.exp(logits - lse[..., None]), 0.0)
    out = jnp.einsum("bns,bsnh->bnh", p, vr).astype(q.dtype)
    if not num_steps:
        return out, lse, None
    steps = jnp.where(key_steps >= 0, jnp.minimum(key_steps, num_steps - 1), -1)
    onehot = jax.nn.one_hot(steps, num_steps, dtype=jnp.float32)  # -1 -> all zeros; [B, S, (R,) C]
    return out, lse, jnp.einsum("bns,bs...->bn...", p, onehot)
