"""Flash attention in Pallas: causal, grouped-query, segment ids, float32 softmax statistics, with a
Pallas backward (dQ and dK/dV kernels) behind a `jax.custom_vjp`.

Two compiled forms (`kernels/target.py`), each written with generic `pl.*` primitives so that it also runs
in interpret mode on a CPU: "triton" (GPU: one program per query tile looping over key tiles read from
global memory) and "tpu" (key tiles a grid axis, running statistics in VMEM scratch, causally invisible
tiles neither fetched nor computed). `flash_attention` picks the form from the platform it is lowered for.

Contract (the attention seam of attnrl_jax.model.attention): q [B, T, N, H], k and v [B, S, K, H] with
N % K == 0; int32 segment ids q_seg [B, T], kv_seg [B, S]; query i (aligned to key i + S - T) attends to
key j iff j <= i + S - T, q_seg[i] == kv_seg[j] and kv_seg[j] != 0. Returns the output [B, T, N, H] and
the per-row log-sum-exp of the scaled logits [B, N, T] (float32; +inf for a row that sees no key, so that
exp(s - lse) is 0 there). Lengths that are not a multiple of the block are padded with segment id 0.

Kernel layout is head-major ([B, N, T, H]); each query head reads its KV head through the BlockSpec index
map (n // G), so K/V are never copied per query head. The dK/dV kernel runs one program per KV block and
visits the G query heads that share it, so no atomics are needed.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from attnrl_jax.kernels import target as tg

MASK_VALUE = -1e30  # finite, so that fully masked blocks never produce inf - inf


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes of the kernels (each a positive multiple of 8; shrunk to short sequences).

    The defaults are the GPU (Triton) tiles: a [128, 128] bfloat16 query tile and [64, 128] key/value
    tiles, two pipeline stages, at 8 warps for head dim 128. XLA:GPU compiles them for an H100 in 96-105 KiB
    of shared memory, and ptxas places them in 160-254 registers without spills
    (`benchmarks/kernel_compile.py`, benchmarks/RESULTS.md). `TPU_BLOCKS` are the TPU tiles.

    Attributes:
      block_q, block_k: query/key tile of the forward kernel.
      block_q_bwd, block_k_bwd: query/key tile of the backward kernels.
    """

    block_q: int = 128
    block_k: int = 64
    block_q_bwd: int = 64
    block_k_bwd: int = 64

    def __post_init__(self):
        for name in ("block_q", "block_k", "block_q_bwd", "block_k_bwd"):
            b = getattr(self, name)
            if not isinstance(b, int) or b <= 0 or b % 8:
                raise ValueError(f"BlockSizes.{name} must be a positive multiple of 8, got {b!r}")


# TPU: 256-wide tiles fill the v6e MXU (two passes of v5e's 128-wide one); one grid step holds a q, k, v
# and output tile (bfloat16, double-buffered), a [256, 128] float32 accumulator and [256, 256] float32
# scores, which Mosaic compiles for v5e and v5p within their VMEM (`benchmarks/kernel_compile.py`).
TPU_BLOCKS = BlockSizes(256, 256, 256, 256)


def default_blocks(target: str) -> BlockSizes:
    return TPU_BLOCKS if target == "tpu" else BlockSizes()


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _fit(block: int, length: int) -> int:
    """The tile to use for a sequence of `length`: the block, or less for short sequences."""
    return min(block, _round_up(length, 8))


def _dot_t(a, b):
    """a @ b.T with float32 accumulation ([m, d] x [n, d] -> [m, n])."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _t_dot(a, b):
    """a.T @ b with float32 accumulation ([m, n] x [m, d] -> [n, d])."""
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _mask(q_start, k_start, bq, bk, offset, qseg, kseg):
    """[bq, bk] visibility of a (query tile, key tile) pair; qseg [bq, 1], kseg [1, bk]."""
    q_pos = q_start + offset + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
    k_pos = k_start + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
    return (q_pos >= k_pos) & (qseg == kseg) & (kseg != 0)


def _causal_hi(q_block, bq, bk, offset, num_k_blocks):
    """Number of key tiles that a query tile can see (the causal upper bound of its loop)."""
    last_q = (q_block + 1) * bq - 1 + offset
    return jnp.clip(last_q // bk + 1, 0, num_k_blocks)


def softmax_step(s, mask, m, denom):
    """The probabilities of one key tile in an online softmax: scores s [R, bk] (visible where `mask`),
    running max m and denominator [R, 1]. Returns (new max, p = exp(s - new max) [R, bk], the factor corr
    that rescales what was accumulated under the old max, new denominator)."""
    s = jnp.where(mask, s, MASK_VALUE)
    m_new = jnp.maximum(m, s.max(axis=1, keepdims=True))
    p = jnp.where(mask, jnp.exp(s - m_new), 0.0)
    corr = jnp.exp(m - m_new)
    return m_new, p, corr, corr * denom + p.sum(axis=1, keepdims=True)


def online_step(s, mask, m, denom, accs, values):
    """One online-softmax update over a key tile (`softmax_step`); each acc [R, X] accumulates p @ value
    ([bk, X]) rescaled to the new max."""
    m_new, p, corr, denom = softmax_step(s, mask, m, denom)
    accs = tuple(
        corr * a + jnp.dot(p.astype(val.dtype), val, preferred_element_type=jnp.float32)
        for a, val in zip(accs, values)
    )
    return m_new, denom, accs


def finish(m, denom, acc):
    """(acc / denom, lse) of an online softmax; rows that saw no key get 0 and lse = +inf."""
    seen = denom > 0
    safe = jnp.where(seen, denom, 1.0)
    return jnp.where(seen, acc / safe, 0.0), jnp.where(seen, m + jnp.log(safe), jnp.inf)


def _init_stats(rows, width):
    return (
        jnp.full((rows, 1), MASK_VALUE, jnp.float32),
        jnp.zeros((rows, 1), jnp.float32),
        jnp.zeros((rows, width), jnp.float32),
    )


def _last_visible(qi, bq, bk, offset, nk):
    """The last key tile that query tile qi sees (TPU index maps clamp to it: no fetch past it)."""
    return jnp.maximum(_causal_hi(qi, bq, bk, offset, nk) - 1, 0)


def _key_tile_maps(g, bq, bk, offset, nk):
    """Index maps of the TPU form's key tiles on a (row, head, query tile, key tile) grid: K/V [B, K, S, H]
    (head n reads KV head n // g) and key segment ids [B, 1, S], clamped to the query tile's last visible
    key tile, so invisible tiles repeat the previous block (no fetch)."""

    def kv_index(bi, ni, qi, kj):
        return bi, ni // g, jnp.minimum(kj, _last_visible(qi, bq, bk, offset, nk)), 0

    def kseg_index(bi, ni, qi, kj):
        return bi, 0, jnp.minimum(kj, _last_visible(qi, bq, bk, offset, nk))

    return kv_index, kseg_index


def _first_visible(kj, bq, bk, offset, nq):
    """The first query tile whose last query sees key tile kj's first key."""
    return jnp.clip((kj * bk - offset) // bq, 0, nq)


# ------------------------------------------------------------------------------------------------------
# Forward


def _fwd_kernel(q_ref, k_ref, v_ref, qseg_ref, kseg_ref, o_ref, lse_ref, *, scale, bk, offset, nk):
    """Triton form: one program per (row, head, query tile), looping over the visible key tiles."""
    iq = pl.program_id(2)
    bq, h = q_ref.shape
    q, qseg = q_ref[...], qseg_ref[...]  # [bq, h], [bq, 1]

    def body(j, carry):
        ks = pl.ds(pl.multiple_of(j * bk, bk), bk)
        mask = _mask(iq * bq, j * bk, bq, bk, offset, qseg, kseg_ref[:, ks])
        m, denom, accs = online_step(
            _dot_t(q, k_ref[ks, :]) * scale, mask, *carry[:2], carry[2:], (v_ref[ks, :],)
        )
        return (m, denom) + accs

    m, denom, acc = lax.fori_loop(0, _causal_hi(iq, bq, bk, offset, nk), body, _init_stats(bq, h))
    o, lse = finish(m, denom, acc)
    o_ref[...] = o.astype(o_ref.dtype)
    lse_ref[...] = lse


def _fwd_kernel_tpu(
    q_ref, k_ref, v_ref, qseg_ref, kseg_ref, o_ref, lse_ref, m_ref, l_ref, acc_ref, *, scale, offset, nk
):
    """TPU form: grid (row, head, query tile, key tile); the statistics carry over key tiles in scratch."""
    iq, jk = pl.program_id(2), pl.program_id(3)
    bq, bk = q_ref.shape[0], k_ref.shape[0]

    @pl.when(jk == 0)
    def _():
        m_ref[...], l_ref[...], acc_ref[...] = _init_stats(*acc_ref.shape)

    @pl.when(jk < _causal_hi(iq, bq, bk, offset, nk))
    def _():
        mask = _mask(iq * bq, jk * bk, bq, bk, offset, qseg_ref[...], kseg_ref[...])
        s = _dot_t(q_ref[...], k_ref[...]) * scale
        m, denom, (acc,) = online_step(s, mask, m_ref[...], l_ref[...], (acc_ref[...],), (v_ref[...],))
        m_ref[...], l_ref[...], acc_ref[...] = m, denom, acc

    @pl.when(jk == nk - 1)
    def _():
        o, lse = finish(m_ref[...], l_ref[...], acc_ref[...])
        o_ref[...] = o.astype(o_ref.dtype)
        lse_ref[...] = lse


def _forward(q, k, v, qseg, kseg, scale, offset, blocks, target, interpret):
    """Head-major padded inputs: q [B, N, T, H], k/v [B, K, S, H], qseg [B, T, 1], kseg [B, 1, S]."""
    b, n, t, h = q.shape
    kv_heads, s = k.shape[1], k.shape[2]
    g = n // kv_heads
    bq, bk = _fit(blocks.block_q, t), _fit(blocks.block_k, s)
    nq, nk = t // bq, s // bk
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, n, t, 1), jnp.float32)]
    if target == "tpu":
        kv_index, kseg_index = _key_tile_maps(g, bq, bk, offset, nk)
        return pl.pallas_call(
            functools.partial(_fwd_kernel_tpu, scale=scale, offset=offset, nk=nk),
            grid=(b, n, nq, nk),
            in_specs=[
                pl.BlockSpec((None, None, bq, h), lambda bi, ni, qi, kj: (bi, ni, qi, 0)),
                pl.BlockSpec((None, None, bk, h), kv_index),
                pl.BlockSpec((None, None, bk, h), kv_index),
                pl.BlockSpec((None, bq, 1), lambda bi, ni, qi, kj: (bi, qi, 0)),
                pl.BlockSpec((None, 1, bk), kseg_index),
            ],
            out_specs=[
                pl.BlockSpec((None, None, bq, h), lambda bi, ni, qi, kj: (bi, ni, qi, 0)),
                pl.BlockSpec((None, None, bq, 1), lambda bi, ni, qi, kj: (bi, ni, qi, 0)),
            ],
            out_shape=out_shape,
            scratch_shapes=_vmem((bq, 1), (bq, 1), (bq, h)),
            compiler_params=tg.compiler_params(
                target, interpret, "parallel", "parallel", "parallel", "arbitrary"
            ),
            interpret=interpret,
            name="flash_attention_fwd",
        )(q, k, v, qseg, kseg)
    return pl.pallas_call(
        functools.partial(_fwd_kernel, scale=scale, bk=bk, offset=offset, nk=nk),
        grid=(b, n, nq),
        in_specs=[
            pl.BlockSpec((None, None, bq, h), lambda bi, ni, qi: (bi, ni, qi, 0)),
            pl.BlockSpec((None, None, s, h), lambda bi, ni, qi: (bi, ni // g, 0, 0)),
            pl.BlockSpec((None, None, s, h), lambda bi, ni, qi: (bi, ni // g, 0, 0)),
            pl.BlockSpec((None, bq, 1), lambda bi, ni, qi: (bi, qi, 0)),
            pl.BlockSpec((None, 1, s), lambda bi, ni, qi: (bi, 0, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, bq, h), lambda bi, ni, qi: (bi, ni, qi, 0)),
            pl.BlockSpec((None, None, bq, 1), lambda bi, ni, qi: (bi, ni, qi, 0)),
        ],
        out_shape=out_shape,
        compiler_params=tg.compiler_params(target, interpret, num_warps=8 if h > 64 else 4),
        interpret=interpret,
        name="flash_attention_fwd",
    )(q, k, v, qseg, kseg)


def _vmem(*shapes):
    """float32 VMEM scratch buffers of the TPU form."""
    from jax.experimental.pallas import tpu as pltpu

    return [pltpu.VMEM(shape, jnp.float32) for shape in shapes]


# ------------------------------------------------------------------------------------------------------
# Backward


def _probs_grad(q, k, v, do, lse, delta, mask, scale):
    """p = exp(s - lse) and ds = p (do v^T - delta) of one (query tile, key tile) pair."""
    p = jnp.where(mask, jnp.exp(_dot_t(q, k) * scale - lse), 0.0)
    return p, p * (_dot_t(do, v) - delta)


def _dq_kernel(
    q_ref, do_ref, lse_ref, delta_ref, qseg_ref, k_ref, v_ref, kseg_ref, dq_ref, *, scale, bk, offset, nk
):
    iq = pl.program_id(2)
    bq, h = q_ref.shape
    q, do = q_ref[...], do_ref[...]
    lse, delta, qseg = lse_ref[...], delta_ref[...], qseg_ref[...]  # [bq, 1] each

    def body(j, dq):
        ks = pl.ds(pl.multiple_of(j * bk, bk), bk)
        k = k_ref[ks, :]
        mask = _mask(iq * bq, j * bk, bq, bk, offset, qseg, kseg_ref[:, ks])
        _, ds = _probs_grad(q, k, v_ref[ks, :], do, lse, delta, mask, scale)
        return dq + jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    dq = lax.fori_loop(0, _causal_hi(iq, bq, bk, offset, nk), body, jnp.zeros((bq, h), jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dq_kernel_tpu(
    q_ref, do_ref, lse_ref, delta_ref, qseg_ref, k_ref, v_ref, kseg_ref, dq_ref, acc_ref, *, scale, offset, nk
):
    iq, jk = pl.program_id(2), pl.program_id(3)
    bq, bk = q_ref.shape[0], k_ref.shape[0]

    @pl.when(jk == 0)
    def _():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when(jk < _causal_hi(iq, bq, bk, offset, nk))
    def _():
        k = k_ref[...]
        mask = _mask(iq * bq, jk * bk, bq, bk, offset, qseg_ref[...], kseg_ref[...])
        _, ds = _probs_grad(q_ref[...], k, v_ref[...], do_ref[...], lse_ref[...], delta_ref[...], mask, scale)
        acc_ref[...] += jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    @pl.when(jk == nk - 1)
    def _():
        dq_ref[...] = (acc_ref[...] * scale).astype(dq_ref.dtype)


def _dkv_kernel(
    q_ref,
    do_ref,
    lse_ref,
    delta_ref,
    qseg_ref,
    k_ref,
    v_ref,
    kseg_ref,
    dk_ref,
    dv_ref,
    *,
    scale,
    bq,
    offset,
    nq,
):
    jk = pl.program_id(2)
    bk, h = k_ref.shape
    g = q_ref.shape[0]
    k, v, kseg = k_ref[...], v_ref[...], kseg_ref[...]
    lo = _first_visible(jk, bq, bk, offset, nq)

    def head(gi, carry):
        def body(i, carry):
            dk, dv = carry
            qs = pl.ds(pl.multiple_of(i * bq, bq), bq)
            q, do = q_ref[gi, qs, :], do_ref[gi, qs, :]
            mask = _mask(i * bq, jk * bk, bq, bk, offset, qseg_ref[qs, :], kseg)
            p, ds = _probs_grad(q, k, v, do, lse_ref[gi, qs, :], delta_ref[gi, qs, :], mask, scale)
            return dk + _t_dot(ds.astype(q.dtype), q), dv + _t_dot(p.astype(do.dtype), do)

        return lax.fori_loop(lo, nq, body, carry)

    zeros = jnp.zeros((bk, h), jnp.float32)
    dk, dv = lax.fori_loop(0, g, head, (zeros, zeros))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dkv_kernel_tpu(
    q_ref,
    do_ref,
    lse_ref,
    delta_ref,
    qseg_ref,
    k_ref,
    v_ref,
    kseg_ref,
    dk_ref,
    dv_ref,
    dk_acc,
    dv_acc,
    *,
    scale,
    offset,
    g,
    nq,
):
    """Grid (row, KV head, key tile, query head of the group, query tile): dK/dV of one key tile
    accumulate in scratch over the group's heads and the visible query tiles."""
    jk, gi, iq = pl.program_id(2), pl.program_id(3), pl.program_id(4)
    bq, bk = q_ref.shape[0], k_ref.shape[0]

    @pl.when((gi == 0) & (iq == 0))
    def _():
        dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
        dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

    @pl.when(iq >= _first_visible(jk, bq, bk, offset, nq))
    def _():
        q, do = q_ref[...], do_ref[...]
        mask = _mask(iq * bq, jk * bk, bq, bk, offset, qseg_ref[...], kseg_ref[...])
        p, ds = _probs_grad(q, k_ref[...], v_ref[...], do, lse_ref[...], delta_ref[...], mask, scale)
        dk_acc[...] += _t_dot(ds.astype(q.dtype), q)
        dv_acc[...] += _t_dot(p.astype(do.dtype), do)

    @pl.when((gi == g - 1) & (iq == nq - 1))
    def _():
        dk_ref[...] = (dk_acc[...] * scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def _backward(q, k, v, qseg, kseg, o, lse, do, dlse, scale, offset, blocks, target, interpret):
    b, n, t, h = q.shape
    kv_heads, s = k.shape[1], k.shape[2]
    g = n // kv_heads
    bq, bk = _fit(blocks.block_q_bwd, t), _fit(blocks.block_k_bwd, s)
    nq, nk = t // bq, s // bk
    # delta_i = sum_h o_ih do_ih; a cotangent of lse enters as ds_ij += p_ij dlse_i.
    delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1, keepdims=True) - dlse
    common = dict(scale=scale, offset=offset)
    dq_args = (q, do, lse, delta, qseg, k, v, kseg)
    dq_shape = jax.ShapeDtypeStruct(q.shape, q.dtype)
    dkv_shape = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)]
    if target == "tpu":
        params = functools.partial(tg.compiler_params, target, interpret)

        kv_index, kseg_index = _key_tile_maps(g, bq, bk, offset, nk)
        q_tile = pl.BlockSpec((None, None, bq, h), lambda bi, ni, qi, kj: (bi, ni, qi, 0))
        row_tile = pl.BlockSpec((None, None, bq, 1), lambda bi, ni, qi, kj: (bi, ni, qi, 0))
        dq = pl.pallas_call(
            functools.partial(_dq_kernel_tpu, nk=nk, **common),
            grid=(b, n, nq, nk),
            in_specs=[
                q_tile,
                q_tile,
                row_tile,
                row_tile,
                pl.BlockSpec((None, bq, 1), lambda bi, ni, qi, kj: (bi, qi, 0)),
                pl.BlockSpec((None, None, bk, h), kv_index),
                pl.BlockSpec((None, None, bk, h), kv_index),
                pl.BlockSpec((None, 1, bk), kseg_index),
            ],
            out_specs=q_tile,
            out_shape=dq_shape,
            scratch_shapes=_vmem((bq, h)),
            compiler_params=params("parallel", "parallel", "parallel", "arbitrary"),
            interpret=interpret,
            name="flash_attention_dq",
        )(*dq_args)

        def q_index(bi, ki, kj, gi, qi):
            return (
                bi,
                ki * g + gi,
                jnp.minimum(jnp.maximum(qi, _first_visible(kj, bq, bk, offset, nq)), nq - 1),
                0,
            )

        def qseg_index(bi, ki, kj, gi, qi):
            return bi, q_index(bi, ki, kj, gi, qi)[2], 0

        kv_tile = pl.BlockSpec((None, None, bk, h), lambda bi, ki, kj, gi, qi: (bi, ki, kj, 0))
        dk, dv = pl.pallas_call(
            functools.partial(_dkv_kernel_tpu, g=g, nq=nq, **common),
            grid=(b, kv_heads, nk, g, nq),
            in_specs=[
                pl.BlockSpec((None, None, bq, h), q_index),
                pl.BlockSpec((None, None, bq, h), q_index),
                pl.BlockSpec((None, None, bq, 1), q_index),
                pl.BlockSpec((None, None, bq, 1), q_index),
                pl.BlockSpec((None, bq, 1), qseg_index),
                kv_tile,
                kv_tile,
                pl.BlockSpec((None, 1, bk), lambda bi, ki, kj, gi, qi: (bi, 0, kj)),
            ],
            out_specs=[kv_tile, kv_tile],
            out_shape=dkv_shape,
            scratch_shapes=_vmem((bk, h), (bk, h)),
            compiler_params=params("parallel", "parallel", "parallel", "arbitrary", "arbitrary"),
            interpret=interpret,
            name="flash_attention_dkv",
        )(*dq_args)
        return dq, dk, dv

    params = tg.compiler_params(target, interpret, num_warps=8 if h > 64 else 4)
    q_tile = pl.BlockSpec((None, None, bq, h), lambda bi, ni, qi: (bi, ni, qi, 0))
    row_tile = pl.BlockSpec((None, None, bq, 1), lambda bi, ni, qi: (bi, ni, qi, 0))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, bk=bk, nk=nk, **common),
        grid=(b, n, nq),
        in_specs=[
            q_tile,
            q_tile,
            row_tile,
            row_tile,
            pl.BlockSpec((None, bq, 1), lambda bi, ni, qi: (bi, qi, 0)),
            pl.BlockSpec((None, None, s, h), lambda bi, ni, qi: (bi, ni // g, 0, 0)),
            pl.BlockSpec((None, None, s, h), lambda bi, ni, qi: (bi, ni // g, 0, 0)),
            pl.BlockSpec((None, 1, s), lambda bi, ni, qi: (bi, 0, 0)),
        ],
        out_specs=q_tile,
        out_shape=dq_shape,
        compiler_params=params,
        interpret=interpret,
        name="flash_attention_dq",
    )(*dq_args)

    group = pl.BlockSpec((None, g, t, h), lambda bi, ki, kj: (bi, ki, 0, 0))
    group_rows = pl.BlockSpec((None, g, t, 1), lambda bi, ki, kj: (bi, ki, 0, 0))
    kv_tile = pl.BlockSpec((None, None, bk, h), lambda bi, ki, kj: (bi, ki, kj, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, bq=bq, nq=nq, **common),
        grid=(b, kv_heads, nk),
        in_specs=[
            group,
            group,
            group_rows,
            group_rows,
            pl.BlockSpec((None, t, 1), lambda bi, ki, kj: (bi, 0, 0)),
            kv_tile,
            kv_tile,
            pl.BlockSpec((None, 1, bk), lambda bi, ki, kj: (bi, 0, kj)),
        ],
        out_specs=[kv_tile, kv_tile],
        out_shape=dkv_shape,
        compiler_params=params,
        interpret=interpret,
        name="flash_attention_dkv",
    )(*dq_args)
    return dq, dk, dv


def _per_target(fn, blocks, target, interpret):
    """fn(..., blocks, target, interpret) for one target, or per lowering platform with that platform's
    blocks (`default_blocks`) when no target and no blocks are given."""

    def build(tgt, interp):
        return lambda *args: fn(*args, blocks or default_blocks(tgt), tgt, interp)

    return build


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9))
def _flash(q, k, v, qseg, kseg, scale, offset, blocks, target, interpret):
    return _flash_fwd(q, k, v, qseg, kseg, scale, offset, blocks, target, interpret)[0]


def _flash_fwd(q, k, v, qseg, kseg, scale, offset, blocks, target, interpret):
    def fwd(*args):
        *arrays, blk, tgt, interp = args
        return _forward(*arrays, scale, offset, blk, tgt, interp)

    o, lse = tg.dispatch(
        _per_target(fwd, blocks, target, interpret), (q, k, v, qseg, kseg), target, interpret
    )
    return (o, lse), (q, k, v, qseg, kseg, o, lse)


def _flash_bwd(scale, offset, blocks, target, interpret, res, cotangents):
    do, dlse = cotangents

    def bwd(*args):
        *arrays, blk, tgt, interp = args
        return _backward(*arrays, scale, offset, blk, tgt, interp)

    dq, dk, dv = tg.dispatch(_per_target(bwd, blocks, target, interpret), (*res, do, dlse), target, interpret)
    return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def padded_length(length: int, tiles) -> int:
    """The smallest length >= `length` (a multiple of 8) that every tile either divides or covers whole:
    each form then fits its tiles to it with `_fit` and needs no padding of its own."""
    p = _round_up(length, 8)
    while True:
        smaller = [b for b in tiles if b < p]
        new = _round_up(length, math.lcm(8, *smaller)) if smaller else p
        if new == p:
            return p
        p = new


def _candidate_blocks(blocks, target, interpret) -> list[BlockSizes]:
    """The block sizes of every form that `dispatch` may run (all of them when per platform)."""
    target, _ = tg.resolve(target, interpret)
    if blocks is not None:
        return [blocks]
    return [default_blocks(t) for t in ((target,) if target else tg.TARGETS)]


@functools.partial(jax.jit, static_argnames=("block_sizes", "target", "interpret"))
def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_segment_ids: jax.Array,
    kv_segment_ids: jax.Array,
    *,
    block_sizes: BlockSizes | None = None,
    target: str | None = None,
    interpret=None,
) -> tuple[jax.Array, jax.Array]:
    """Causal GQA flash attention (module docstring); returns (out [B, T, N, H], lse [B, N, T]).

    Args:
      q, k, v: [B, T, N, H] and [B, S, K, H].
      q_segment_ids, kv_segment_ids: [B, T] and [B, S] ints; 0 = padding.
      block_sizes: tiles (None: each form's default); shrunk for short sequences, lengths padded to a
        multiple of the tiles.
      target: "triton" or "tpu" to force a form; None picks it from the lowering platform
        (`kernels/target.py`; the CPU interprets the "triton" form).
      interpret: True (or `pltpu.InterpretParams()`) to interpret the chosen form.
    """
    b, t, n, h = q.shape
    s, kv_heads = k.shape[1], k.shape[2]
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != h:
        raise ValueError(f"k and v must be [B, S, K, H] matching q {q.shape}; got {k.shape=}, {v.shape=}")
    if n % kv_heads:
        raise ValueError(f"query heads {n} are not a multiple of key/value heads {kv_heads}")
    if q_segment_ids.shape != (b, t) or kv_segment_ids.shape != (b, s):
        raise ValueError(
            f"segment ids must be [B, T]={b, t} and [B, S]={b, s}; "
            f"got {q_segment_ids.shape=}, {kv_segment_ids.shape=}"
        )
    if t > s:
        raise ValueError(f"queries ({t}) must not outnumber keys ({s}): queries are the last T of the keys")
    candidates = _candidate_blocks(block_sizes, target, interpret)
    tp = padded_length(t, [bs for c in candidates for bs in (c.block_q, c.block_q_bwd)])
    sp = padded_length(s, [bs for c in candidates for bs in (c.block_k, c.block_k_bwd)])
    qh = jnp.pad(q.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, tp - t), (0, 0)))
    kh = jnp.pad(k.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, sp - s), (0, 0)))
    vh = jnp.pad(v.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, sp - s), (0, 0)))
    qseg = jnp.pad(q_segment_ids.astype(jnp.int32), ((0, 0), (0, tp - t)))[:, :, None]
    kseg = jnp.pad(kv_segment_ids.astype(jnp.int32), ((0, 0), (0, sp - s)))[:, None, :]
    o, lse = _flash(qh, kh, vh, qseg, kseg, h**-0.5, s - t, block_sizes, target, interpret)
    return o[:, :, :t].transpose(0, 2, 1, 3), lse[:, :, :t, 0]


def attention_reference(q, k, v, q_segment_ids, kv_segment_ids):
    """Dense float32 reference of the same contract: (out [B, T, N, H], lse [B, N, T])."""
    b, t, n, h = q.shape
    s, kv_heads = k.shape[1], k.shape[2]
    kr = jnp.repeat(k.astype(jnp.float32), n // kv_heads, axis=2)  # [B, S, N, H]
    vr = jnp.repeat(v.astype(jnp.float32), n // kv_heads, axis=2)
    logits = jnp.einsum("btnh,bsnh->bnts", q.astype(jnp.float32), kr) * h**-0.5
    causal = (jnp.arange(t)[:, None] + (s - t)) >= jnp.arange(s)[None, :]
    mask = (
        causal & (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]) & (kv_segment_ids[:, None, :] != 0)
    )
    mask = mask[:, None]  # [B, 1, T, S]
    seen = mask.any(-1)
    lse = jax.nn.logsumexp(jnp.where(mask, logits, -jnp.inf), axis=-1)
    lse = jnp.where(seen, lse, jnp.inf)
    p = jnp.where(mask, jnp.exp(logits - lse[..., None]), 0.0)
    out = jnp.einsum("bnts,bsnh->btnh", p, vr)
    return out.astype(q.dtype), lse
