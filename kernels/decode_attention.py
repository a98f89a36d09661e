"""Decode attention in Pallas: one query token per row over a KV cache with per-row lengths, returning the
output, the log-sum-exp and (optionally) the attention mass that the token pays to each key step.

Each program serves the G query heads of one KV head (no K/V copies) and visits only the cache tiles
below the row's length, so the unused tail of the cache is never read. With key step ids it accumulates,
beside p @ V, the per-step mass p @ onehot(steps) ([G, tile] x [tile, R C]) with the same online-softmax
rescaling, so one pass over the cache yields the output and the per-token rows that FCI accumulates while
decoding, for R segmentations at once (`key_steps` [B, S, R], the sampler's default R = 2).

Two forms (`kernels/target.py`): "triton" loops over the row's tiles inside one program per (row, KV
head), with the query-head group and the step buckets padded to powers of two (Triton's block shapes;
the 1.5B model's group is 6, the 7B's 7); "tpu" makes the tiles a grid axis, with the rows' lengths
prefetched into SMEM so that the index maps clamp tiles past a row's length to its last one (no fetch).
`decode_attention_reference` is the dense float32 version of the same contract.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from attnrl_jax.kernels import target as tg
from attnrl_jax.kernels.flash_attention import _dot_t, _init_stats, _round_up, finish, online_step

TRITON_BLOCK_K = 64  # cache tile of the GPU form: [64, 128] bfloat16 K and V tiles, two stages
TPU_BLOCK_K = 256  # cache tile of the TPU form: 64 KiB K and V tiles, a [256, R C] float32 one-hot


def _onehot(steps_col, width):
    """[tile, width] float32 one-hot of (already offset) step ids [tile, 1]; -1 matches nothing."""
    return (steps_col == lax.broadcasted_iota(jnp.int32, (steps_col.shape[0], width), 1)).astype(jnp.float32)


def _step_values(steps_ref, rows, r, width):
    """The one-hot of the tile's key steps over all R segmentations (their buckets are disjoint)."""
    onehot = _onehot(steps_ref[rows, pl.ds(0, 1)], width)
    for i in range(1, r):
        onehot = onehot + _onehot(steps_ref[rows, pl.ds(i, 1)], width)
    return onehot


def _decode_kernel(len_ref, q_ref, k_ref, v_ref, *rest, scale, bk, r, width):
    """Triton form: one program per (row, KV head), looping over the tiles below the row's length."""
    if r:
        steps_ref, o_ref, lse_ref, mass_ref = rest
    else:
        o_ref, lse_ref = rest
    length = len_ref[0, 0]
    q = q_ref[...]  # [Gp, H]
    g, h = q.shape

    def body(j, carry):
        ks = pl.ds(pl.multiple_of(j * bk, bk), bk)
        valid = (j * bk + lax.broadcasted_iota(jnp.int32, (g, bk), 1)) < length
        values = (v_ref[ks, :],) + ((_step_values(steps_ref, ks, r, width),) if r else ())
        m, denom, accs = online_step(
            _dot_t(q, k_ref[ks, :]) * scale, valid, carry[0], carry[1], carry[2:], values
        )
        return (m, denom) + accs

    init = _init_stats(g, h) + ((jnp.zeros((g, width), jnp.float32),) if r else ())
    m, denom, acc, *mass = lax.fori_loop(0, (length + bk - 1) // bk, body, init)
    o, lse = finish(m, denom, acc)
    o_ref[...] = o.astype(o_ref.dtype)
    lse_ref[...] = lse
    if r:
        mass_ref[...] = finish(m, denom, mass[0])[0]


def _decode_kernel_tpu(len_ref, q_ref, k_ref, v_ref, *rest, scale, r, width):
    """TPU form: grid (row, KV head, cache tile); statistics carry over the tiles in VMEM scratch."""
    if r:
        steps_ref, o_ref, lse_ref, mass_ref, m_ref, l_ref, acc_ref, macc_ref = rest
    else:
        o_ref, lse_ref, m_ref, l_ref, acc_ref = rest
    bi, j = pl.program_id(0), pl.program_id(2)
    length = len_ref[bi]
    g = q_ref.shape[0]
    bk = k_ref.shape[0]

    @pl.when(j == 0)
    def _():
        m_ref[...], l_ref[...], acc_ref[...] = _init_stats(*acc_ref.shape)
        if r:
            macc_ref[...] = jnp.zeros(macc_ref.shape, jnp.float32)

    @pl.when(j * bk < length)
    def _():
        valid = (j * bk + lax.broadcasted_iota(jnp.int32, (g, bk), 1)) < length
        rows = slice(None)
        values = (v_ref[...],) + ((_step_values(steps_ref, rows, r, width),) if r else ())
        accs = (acc_ref[...],) + ((macc_ref[...],) if r else ())
        s = _dot_t(q_ref[...], k_ref[...]) * scale
        m, denom, accs = online_step(s, valid, m_ref[...], l_ref[...], accs, values)
        m_ref[...], l_ref[...], acc_ref[...] = m, denom, accs[0]
        if r:
            macc_ref[...] = accs[1]

    @pl.when(j == pl.num_programs(2) - 1)
    def _():
        o, lse = finish(m_ref[...], l_ref[...], acc_ref[...])
        o_ref[...] = o.astype(o_ref.dtype)
        lse_ref[...] = lse
        if r:
            mass_ref[...] = finish(m_ref[...], l_ref[...], macc_ref[...])[0]


def _decode(qg, k, v, lengths, steps, *, block_k, target, interpret, r, width):
    """qg [B, K, G, H], k/v [B, K, S, H] (S a multiple of the tile), lengths [B], steps [B, S, R] or None.
    Returns (out [B, K, G, H], lse [B, K, G, 1], mass [B, K, G, width] or None)."""
    b, kv_heads, g, h = qg.shape
    s = k.shape[2]
    bk = min(block_k, s)
    nk = s // bk
    out_shape = [
        jax.ShapeDtypeStruct(qg.shape, qg.dtype),
        jax.ShapeDtypeStruct((b, kv_heads, g, 1), jnp.float32),
    ] + ([jax.ShapeDtypeStruct((b, kv_heads, g, width), jnp.float32)] if r else [])
    args = [qg, k, v] + ([steps] if r else [])
    if target == "tpu":
        from jax.experimental.pallas import tpu as pltpu

        def tile(bi, ki, j, len_ref):  # tiles past the row's length repeat its last tile: no new fetch
            return jnp.minimum(j, jnp.maximum((len_ref[bi] + bk - 1) // bk - 1, 0))

        head = pl.BlockSpec((None, None, g, h), lambda bi, ki, j, len_ref: (bi, ki, 0, 0))
        kv = pl.BlockSpec(
            (None, None, bk, h), lambda bi, ki, j, len_ref: (bi, ki, tile(bi, ki, j, len_ref), 0)
        )
        in_specs = [head, kv, kv]
        out_specs = [head, pl.BlockSpec((None, None, g, 1), lambda bi, ki, j, len_ref: (bi, ki, 0, 0))]
        scratch = [
            pltpu.VMEM((g, 1), jnp.float32),
            pltpu.VMEM((g, 1), jnp.float32),
            pltpu.VMEM((g, h), jnp.float32),
        ]
        if r:
            in_specs.append(
                pl.BlockSpec((None, bk, r), lambda bi, ki, j, len_ref: (bi, tile(bi, ki, j, len_ref), 0))
            )
            out_specs.append(pl.BlockSpec((None, None, g, width), lambda bi, ki, j, len_ref: (bi, ki, 0, 0)))
            scratch.append(pltpu.VMEM((g, width), jnp.float32))
        grid_spec = pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(b, kv_heads, nk),
            in_specs=in_specs,
            out_specs=out_specs,
            scratch_shapes=scratch,
        )
        return pl.pallas_call(
            functools.partial(_decode_kernel_tpu, scale=h**-0.5, r=r, width=width),
            grid_spec=grid_spec,
            out_shape=out_shape,
            compiler_params=tg.compiler_params(target, interpret, "parallel", "parallel", "arbitrary"),
            interpret=interpret,
            name="decode_attention",
        )(lengths, *args)
    head = pl.BlockSpec((None, None, g, h), lambda bi, ki: (bi, ki, 0, 0))
    in_specs = [
        pl.BlockSpec((None, 1, 1), lambda bi, ki: (bi, 0, 0)),
        head,
        pl.BlockSpec((None, None, s, h), lambda bi, ki: (bi, ki, 0, 0)),
        pl.BlockSpec((None, None, s, h), lambda bi, ki: (bi, ki, 0, 0)),
    ]
    out_specs = [head, pl.BlockSpec((None, None, g, 1), lambda bi, ki: (bi, ki, 0, 0))]
    if r:
        in_specs.append(pl.BlockSpec((None, s, r), lambda bi, ki: (bi, 0, 0)))
        out_specs.append(pl.BlockSpec((None, None, g, width), lambda bi, ki: (bi, ki, 0, 0)))
    return pl.pallas_call(
        functools.partial(_decode_kernel, scale=h**-0.5, bk=bk, r=r, width=width),
        grid=(b, kv_heads),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=tg.compiler_params(target, interpret),
        interpret=interpret,
        name="decode_attention",
    )(lengths.reshape(b, 1, 1), *args)


@functools.partial(jax.jit, static_argnames=("num_steps", "block_k", "target", "interpret"))
def decode_attention(
    q, k, v, lengths, key_steps=None, *, num_steps: int = 0, block_k=None, target=None, interpret=None
):
    """Attention of one query per row over a cache.

    Args:
      q: [B, N, H] (the new token's queries; it has already been written into the cache).
      k, v: [B, S, K, H] caches; positions < lengths[b] are attended to.
      lengths: [B] int32 valid cache length per row (the new token included).
      key_steps: [B, S] step id of each cache position (-1: none; >= num_steps: merged into the last step),
        or [B, S, R] for R segmentations at once.
      num_steps: C; 0 skips the mass.
      block_k: cache tile (a multiple of 8; None: the form's default, `TRITON_BLOCK_K` or `TPU_BLOCK_K`).
      target, interpret: as in `flash_attention`.

    Returns:
      (out [B, N, H], lse [B, N] float32, mass [B, N, C] (or [B, N, R, C]) float32 or None)
    """
    b, n, h = q.shape
    s, kv_heads = k.shape[1], k.shape[2]
    if n % kv_heads or k.shape != v.shape or k.shape[0] != b or k.shape[3] != h:
        raise ValueError(
            f"decode attention needs q [B, N, H] and k/v [B, S, K, H]; got {q.shape}, {k.shape}, {v.shape}"
        )
    if block_k is not None and (block_k <= 0 or block_k % 8):
        raise ValueError(f"block_k must be a positive multiple of 8, got {block_k}")
    if num_steps and (key_steps is None or key_steps.shape[:2] != (b, s) or key_steps.ndim not in (2, 3)):
        shape = None if key_steps is None else key_steps.shape
        raise ValueError(f"key_steps must be [B, S] or [B, S, R] with [B, S]={b, s}; got {shape}")
    squeeze = bool(num_steps) and key_steps.ndim == 2
    if num_steps:
        steps = key_steps[..., None] if squeeze else key_steps  # [B, S, R]
        r = steps.shape[-1]
        # Segmentation i's steps go to buckets [i C, (i + 1) C); no step (-1) matches no bucket.
        steps = jnp.where(steps >= 0, jnp.minimum(steps, num_steps - 1) + num_steps * jnp.arange(r), -1)
        steps = steps.astype(jnp.int32)
    else:
        r, steps = 0, None
    g = n // kv_heads

    def build(tgt, interp):
        bk = block_k or (TPU_BLOCK_K if tgt == "tpu" else TRITON_BLOCK_K)
        bk = min(bk, _round_up(s, 8))
        # Triton block shapes are powers of two (a dot needs at least 16 rows): pad the head group and the
        # step buckets; the TPU form takes them whole.
        gp = max(16, tg.next_pow2(g)) if tgt == "triton" else g
        width = r * num_steps
        width = max(16, tg.next_pow2(width)) if width and tgt == "triton" else width

        def run(q, k, v, lengths, steps=None):
            sp = _round_up(s, bk)
            kh = jnp.pad(k.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, sp - s), (0, 0)))
            vh = jnp.pad(v.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, sp - s), (0, 0)))
            qg = jnp.pad(q.reshape(b, kv_heads, g, h), ((0, 0), (0, 0), (0, gp - g), (0, 0)))
            if steps is not None:
                steps = jnp.pad(steps, ((0, 0), (0, sp - s), (0, 0)), constant_values=-1)
            out, lse, *mass = _decode(
                qg,
                kh,
                vh,
                lengths.astype(jnp.int32),
                steps,
                block_k=bk,
                target=tgt,
                interpret=interp,
                r=r,
                width=width,
            )
            out = out[:, :, :g].reshape(b, n, h)
            lse = lse[:, :, :g].reshape(b, n)
            if not r:
                return out, lse
            return out, lse, mass[0][:, :, :g, : r * num_steps].reshape(b, n, r, num_steps)

        return run

    args = (q, k, v, lengths) + ((steps,) if r else ())
    out, lse, *mass = tg.dispatch(build, args, target, interpret)
    if not r:
        return out, lse, None
    return out, lse, mass[0][:, :, 0] if squeeze else mass[0]


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
