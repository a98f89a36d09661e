"""Flash attention in Pallas: causal, grouped-query, segment ids, float32 softmax statistics, with a
Pallas backward (dQ and dK/dV kernels) behind a `jax.custom_vjp`.

Written with generic `pl.*` primitives only, so one source runs under `interpret=True` on CPU, under TPU
interpret mode (`interpret=pltpu.InterpretParams()`), and lowers on GPU and TPU.

Contract (the attention seam of attnrl_jax.model.attention): q [B, T, N, H], k and v [B, S, K, H] with
N % K == 0; int32 segment ids q_seg [B, T], kv_seg [B, S]; query i (aligned to key i + S - T) attends to
key j iff j <= i + S - T, q_seg[i] == kv_seg[j] and kv_seg[j] != 0. Returns the output [B, T, N, H] and
the per-row log-sum-exp of the scaled logits [B, N, T] (float32; +inf for a row that sees no key, so that
exp(s - lse) is 0 there). Lengths that are not a multiple of the block are padded with segment id 0.

Kernel layout is head-major ([B, N, T, H]); each query head reads its KV head through the BlockSpec index
map (n // G), so K/V are never copied per query head. The dK/dV kernel runs one program per KV block and
loops over the G query heads that share it, so no atomics are needed.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

MASK_VALUE = -1e30  # finite, so that fully masked blocks never produce inf - inf


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes of the kernels (each a positive multiple of 8; shrunk to short sequences).

    Attributes:
      block_q, block_k: query/key tile of the forward kernel.
      block_q_bwd, block_k_bwd: query/key tile of the backward kernels.
    """

    block_q: int = 128
    block_k: int = 128
    block_q_bwd: int = 128
    block_k_bwd: int = 128

    def __post_init__(self):
        for name in ("block_q", "block_k", "block_q_bwd", "block_k_bwd"):
            b = getattr(self, name)
            if not isinstance(b, int) or b <= 0 or b % 8:
                raise ValueError(f"BlockSizes.{name} must be a positive multiple of 8, got {b!r}")


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


# ------------------------------------------------------------------------------------------------------
# Forward


def _fwd_kernel(q_ref, k_ref, v_ref, qseg_ref, kseg_ref, o_ref, lse_ref, *, scale, bk, offset, nk):
    iq = pl.program_id(2)
    bq, h = q_ref.shape
    q = q_ref[...]
    qseg = qseg_ref[...]  # [bq, 1]

    def body(j, carry):
        acc, m, denom = carry
        ks = pl.ds(pl.multiple_of(j * bk, bk), bk)
        s = _dot_t(q, k_ref[ks, :]) * scale  # [bq, bk]
        mask = _mask(iq * bq, j * bk, bq, bk, offset, qseg, kseg_ref[:, ks])
        s = jnp.where(mask, s, MASK_VALUE)
        m_new = jnp.maximum(m, s.max(axis=1, keepdims=True))
        p = jnp.where(mask, jnp.exp(s - m_new), 0.0)
        corr = jnp.exp(m - m_new)
        denom = corr * denom + p.sum(axis=1, keepdims=True)
        acc = corr * acc + jnp.dot(p.astype(v_ref.dtype), v_ref[ks, :], preferred_element_type=jnp.float32)
        return acc, m_new, denom

    init = (
        jnp.zeros((bq, h), jnp.float32),
        jnp.full((bq, 1), MASK_VALUE, jnp.float32),
        jnp.zeros((bq, 1), jnp.float32),
    )
    acc, m, denom = lax.fori_loop(0, _causal_hi(iq, bq, bk, offset, nk), body, init)
    seen = denom > 0
    o_ref[...] = jnp.where(seen, acc / jnp.where(seen, denom, 1.0), 0.0).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m + jnp.log(jnp.where(seen, denom, 1.0)), jnp.inf)


def _forward(q, k, v, qseg, kseg, scale, offset, bq, bk, interpret):
    """Head-major padded inputs: q [B, N, T, H], k/v [B, K, S, H], qseg [B, T, 1], kseg [B, 1, S]."""
    b, n, t, h = q.shape
    kv_heads, s = k.shape[1], k.shape[2]
    g = n // kv_heads
    kernel = functools.partial(_fwd_kernel, scale=scale, bk=bk, offset=offset, nk=s // bk)
    return pl.pallas_call(
        kernel,
        grid=(b, n, t // bq),
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
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((b, n, t, 1), jnp.float32),
        ],
        interpret=interpret,
        name="flash_attention_fwd",
    )(q, k, v, qseg, kseg)


# ------------------------------------------------------------------------------------------------------
# Backward


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
        p = jnp.where(mask, jnp.exp(_dot_t(q, k) * scale - lse), 0.0)
        dp = _dot_t(do, v_ref[ks, :])
        ds = p * (dp - delta)
        return dq + jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    dq = lax.fori_loop(0, _causal_hi(iq, bq, bk, offset, nk), body, jnp.zeros((bq, h), jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


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
    # The first query tile whose last query can see this key tile's first key.
    lo = jnp.clip((jk * bk - offset) // bq, 0, nq)

    def head(gi, carry):
        def body(i, carry):
            dk, dv = carry
            qs = pl.ds(pl.multiple_of(i * bq, bq), bq)
            q, do = q_ref[gi, qs, :], do_ref[gi, qs, :]
            mask = _mask(i * bq, jk * bk, bq, bk, offset, qseg_ref[qs, :], kseg)
            p = jnp.where(mask, jnp.exp(_dot_t(q, k) * scale - lse_ref[gi, qs, :]), 0.0)  # [bq, bk]
            dv = dv + _t_dot(p.astype(do.dtype), do)
            ds = p * (_dot_t(do, v) - delta_ref[gi, qs, :])
            dk = dk + _t_dot(ds.astype(q.dtype), q)
            return dk, dv

        return lax.fori_loop(lo, nq, body, carry)

    zeros = jnp.zeros((bk, h), jnp.float32)
    dk, dv = lax.fori_loop(0, g, head, (zeros, zeros))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _backward(q, k, v, qseg, kseg, o, lse, do, dlse, scale, offset, bq, bk, interpret):
    b, n, t, h = q.shape
    kv_heads, s = k.shape[1], k.shape[2]
    g = n // kv_heads
    # delta_i = sum_h o_ih do_ih; a cotangent of lse enters as ds_ij += p_ij dlse_i.
    delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1, keepdims=True) - dlse
    common = dict(scale=scale, offset=offset)
    q_tile = pl.BlockSpec((None, None, bq, h), lambda bi, ni, qi: (bi, ni, qi, 0))
    row_tile = pl.BlockSpec((None, None, bq, 1), lambda bi, ni, qi: (bi, ni, qi, 0))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, bk=bk, nk=s // bk, **common),
        grid=(b, n, t // bq),
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
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        interpret=interpret,
        name="flash_attention_dq",
    )(q, do, lse, delta, qseg, k, v, kseg)

    group = pl.BlockSpec((None, g, t, h), lambda bi, ki, kj: (bi, ki, 0, 0))
    group_rows = pl.BlockSpec((None, g, t, 1), lambda bi, ki, kj: (bi, ki, 0, 0))
    kv_tile = pl.BlockSpec((None, None, bk, h), lambda bi, ki, kj: (bi, ki, kj, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, bq=bq, nq=t // bq, **common),
        grid=(b, kv_heads, s // bk),
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
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        interpret=interpret,
        name="flash_attention_dkv",
    )(q, do, lse, delta, qseg, k, v, kseg)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9, 10, 11))
def _flash(q, k, v, qseg, kseg, scale, offset, bq, bk, bq_bwd, bk_bwd, interpret):
    return _forward(q, k, v, qseg, kseg, scale, offset, bq, bk, interpret)


def _flash_fwd(q, k, v, qseg, kseg, scale, offset, bq, bk, bq_bwd, bk_bwd, interpret):
    o, lse = _forward(q, k, v, qseg, kseg, scale, offset, bq, bk, interpret)
    return (o, lse), (q, k, v, qseg, kseg, o, lse)


def _flash_bwd(scale, offset, bq, bk, bq_bwd, bk_bwd, interpret, res, cotangents):
    q, k, v, qseg, kseg, o, lse = res
    do, dlse = cotangents
    dq, dk, dv = _backward(q, k, v, qseg, kseg, o, lse, do, dlse, scale, offset, bq_bwd, bk_bwd, interpret)
    return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def default_interpret() -> bool:
    """Interpret mode where no GPU/TPU backend can compile the kernels (the CPU)."""
    return jax.default_backend() == "cpu"


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_segment_ids: jax.Array,
    kv_segment_ids: jax.Array,
    *,
    block_sizes: BlockSizes = BlockSizes(),
    interpret=None,
) -> tuple[jax.Array, jax.Array]:
    """Causal GQA flash attention (module docstring); returns (out [B, T, N, H], lse [B, N, T]).

    Args:
      q, k, v: [B, T, N, H] and [B, S, K, H].
      q_segment_ids, kv_segment_ids: [B, T] and [B, S] ints; 0 = padding.
      block_sizes: tiles; shrunk for short sequences, lengths padded to a multiple of the tile.
      interpret: False to compile, True (or `pltpu.InterpretParams()`) to interpret; None picks
        `default_interpret()`.
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
    if interpret is None:
        interpret = default_interpret()
    bq, bk = _fit(block_sizes.block_q, t), _fit(block_sizes.block_k, s)
    bq_bwd, bk_bwd = _fit(block_sizes.block_q_bwd, t), _fit(block_sizes.block_k_bwd, s)
    tp = _round_up(t, max(bq, bq_bwd) if max(bq, bq_bwd) % min(bq, bq_bwd) == 0 else bq * bq_bwd)
    sp = _round_up(s, max(bk, bk_bwd) if max(bk, bk_bwd) % min(bk, bk_bwd) == 0 else bk * bk_bwd)
    qh = jnp.pad(q.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, tp - t), (0, 0)))
    kh = jnp.pad(k.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, sp - s), (0, 0)))
    vh = jnp.pad(v.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, sp - s), (0, 0)))
    qseg = jnp.pad(q_segment_ids.astype(jnp.int32), ((0, 0), (0, tp - t)))[:, :, None]
    kseg = jnp.pad(kv_segment_ids.astype(jnp.int32), ((0, 0), (0, sp - s)))[:, None, :]
    o, lse = _flash(qh, kh, vh, qseg, kseg, h**-0.5, s - t, bq, bk, bq_bwd, bk_bwd, interpret)
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
