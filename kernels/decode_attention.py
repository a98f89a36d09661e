"""Decode attention in Pallas over a paged KV cache: one query token per row, its keys and values in pages
that a page table names, returning the output, the log-sum-exp and (optionally) the attention mass that the
token pays to each key step.

The cache is the sampler's page pool, `[L, K, P, page, H]` per layer, KV head, page, position in the page
and head dimension, stacked over layers so that one layer's kernel reads the pool the layer scan carries
(no per-layer slice of it is copied); `layer` picks the layer. Row b's position s lives in page
`table[b, s // page]` at offset `s % page`; rows that share a prefix share its pages. The pool may hold the
compute dtype's values as raw 16-bit words (`model.transformer.cache_dtype`): each page is bitcast on chip.

Each program serves the G query heads of one KV head (no K/V copies) and visits only the pages below the
row's length, so neither the unused tail of a row nor other rows' pages are read. With key step ids it
accumulates, beside p @ V, the per-step mass p @ onehot(steps) ([G, page] x [page, R C]) with the same
online-softmax rescaling, so one pass over the cache yields the output and the per-token rows that FCI
accumulates while decoding, for R segmentations at once (`key_steps` [B, S, R], the sampler's default R = 2).

Two forms (`kernels/target.py`): "triton" loops over the row's pages inside one program per (row, KV head),
gathering each page by its id, `TRITON_TILE` positions at a time (the pool is one block in global memory;
only the piece being used is loaded), with the query-head group and the step buckets padded to powers of
two (Triton's block shapes; the 1.5B model's group is 6, the 7B's 7); "tpu" makes the pages a grid axis,
with the layer, the rows' lengths and the page table prefetched into SMEM, so that the index map fetches
page `table[b, j]` and pages past a row's length repeat its last one (no fetch). A page is the TPU form's
tile: a multiple of 16 positions for its bfloat16 tiles; the GPU form's pieces need a power of two of at
least 16 (Triton's dots), so a power of two of at least 16 serves both.
`decode_attention_reference` is the dense float32 version of the same contract.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from attnrl_jax.kernels import target as tg
from attnrl_jax.kernels.flash_attention import _dot_t, _init_stats, finish, online_step

TRITON_TILE = 64  # positions per step of the GPU form's loop (a page is read in pieces of at most this)


def _onehot(steps_col, width):
    """[tile, width] float32 one-hot of (already offset) step ids [tile, 1]; -1 matches nothing."""
    return (steps_col == lax.broadcasted_iota(jnp.int32, (steps_col.shape[0], width), 1)).astype(jnp.float32)


def _step_values(steps_ref, rows, r, width):
    """The one-hot of the tile's key steps over all R segmentations (their buckets are disjoint)."""
    onehot = _onehot(steps_ref[rows, pl.ds(0, 1)], width)
    for i in range(1, r):
        onehot = onehot + _onehot(steps_ref[rows, pl.ds(i, 1)], width)
    return onehot


def _as(x, dtype):
    """A loaded page in the compute dtype (the pool may store 16-bit floats as uint16 words)."""
    return x if x.dtype == dtype else lax.bitcast_convert_type(x, dtype)


def _decode_kernel(layer_ref, len_ref, table_ref, q_ref, k_ref, v_ref, *rest, scale, r, width, tile):
    """Triton form: one program per (row, KV head), looping over `tile`-position pieces of the pages
    below the row's length."""
    if r:
        steps_ref, o_ref, lse_ref, mass_ref = rest
    else:
        o_ref, lse_ref = rest
    length, layer, ki = len_ref[0, 0], layer_ref[0], pl.program_id(1)
    page, h = k_ref.shape[-2:]
    per_page = page // tile
    q = q_ref[...]  # [Gp, H]
    g = q.shape[0]

    def body(j, carry):
        blk = table_ref[pl.ds(lax.div(j, per_page), 1)]  # [1] page id (j >= 0: lax's div and rem)
        piece = pl.ds(pl.multiple_of(lax.rem(j, per_page) * tile, tile), tile)
        k = _as(k_ref[layer, ki, blk, piece], q.dtype).reshape(tile, h)
        v = _as(v_ref[layer, ki, blk, piece], q.dtype).reshape(tile, h)
        valid = (j * tile + lax.broadcasted_iota(jnp.int32, (g, tile), 1)) < length
        ks = pl.ds(pl.multiple_of(j * tile, tile), tile)
        values = (v,) + ((_step_values(steps_ref, ks, r, width),) if r else ())
        m, denom, accs = online_step(_dot_t(q, k) * scale, valid, carry[0], carry[1], carry[2:], values)
        return (m, denom) + accs

    init = _init_stats(g, h) + ((jnp.zeros((g, width), jnp.float32),) if r else ())
    m, denom, acc, *mass = lax.fori_loop(0, (length + tile - 1) // tile, body, init)
    o, lse = finish(m, denom, acc)
    o_ref[...] = o.astype(o_ref.dtype)
    lse_ref[...] = lse
    if r:
        mass_ref[...] = finish(m, denom, mass[0])[0]


def _decode_kernel_tpu(layer_ref, len_ref, table_ref, q_ref, k_ref, v_ref, *rest, scale, r, width):
    """TPU form: grid (row, KV head, page); statistics carry over the pages in VMEM scratch."""
    if r:
        steps_ref, o_ref, lse_ref, mass_ref, m_ref, l_ref, acc_ref, macc_ref = rest
    else:
        o_ref, lse_ref, m_ref, l_ref, acc_ref = rest
    bi, j = pl.program_id(0), pl.program_id(2)
    length = len_ref[bi]
    g = q_ref.shape[0]
    page = k_ref.shape[0]

    @pl.when(j == 0)
    def _():
        m_ref[...], l_ref[...], acc_ref[...] = _init_stats(*acc_ref.shape)
        if r:
            macc_ref[...] = jnp.zeros(macc_ref.shape, jnp.float32)

    @pl.when(j * page < length)
    def _():
        q = q_ref[...]
        valid = (j * page + lax.broadcasted_iota(jnp.int32, (g, page), 1)) < length
        values = (_as(v_ref[...], q.dtype),) + (
            (_step_values(steps_ref, slice(None), r, width),) if r else ()
        )
        accs = (acc_ref[...],) + ((macc_ref[...],) if r else ())
        s = _dot_t(q, _as(k_ref[...], q.dtype)) * scale
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


def _decode(qg, k_pages, v_pages, table, lengths, layer, steps, *, target, interpret, r, width):
    """qg [B, K, G, H], pools [L, K, P, page, H], table [B, MB], lengths [B], layer [1], steps [B, S, R] or
    None. Returns (out [B, K, G, H], lse [B, K, G, 1], mass [B, K, G, width] or None)."""
    b, kv_heads, g, h = qg.shape
    page = k_pages.shape[3]
    mb = table.shape[1]
    out_shape = [
        jax.ShapeDtypeStruct(qg.shape, qg.dtype),
        jax.ShapeDtypeStruct((b, kv_heads, g, 1), jnp.float32),
    ] + ([jax.ShapeDtypeStruct((b, kv_heads, g, width), jnp.float32)] if r else [])
    kernel_args = [qg, k_pages, v_pages] + ([steps] if r else [])
    if target == "tpu":
        from jax.experimental.pallas import tpu as pltpu

        def visible(bi, j, len_ref):  # pages past the row's length repeat its last page: no new fetch
            return jnp.minimum(j, jnp.maximum((len_ref[bi] + page - 1) // page - 1, 0))

        def kv_index(bi, ki, j, layer_ref, len_ref, table_ref):
            return layer_ref[0], ki, table_ref[bi * mb + visible(bi, j, len_ref)], 0, 0

        head = pl.BlockSpec((None, None, g, h), lambda bi, ki, j, *_: (bi, ki, 0, 0))
        kv = pl.BlockSpec((None, None, None, page, h), kv_index)
        in_specs = [head, kv, kv]
        out_specs = [head, pl.BlockSpec((None, None, g, 1), lambda bi, ki, j, *_: (bi, ki, 0, 0))]
        scratch = [
            pltpu.VMEM((g, 1), jnp.float32),
            pltpu.VMEM((g, 1), jnp.float32),
            pltpu.VMEM((g, h), jnp.float32),
        ]
        if r:
            in_specs.append(
                pl.BlockSpec(
                    (None, page, r), lambda bi, ki, j, _, len_ref, __: (bi, visible(bi, j, len_ref), 0)
                )
            )
            out_specs.append(pl.BlockSpec((None, None, g, width), lambda bi, ki, j, *_: (bi, ki, 0, 0)))
            scratch.append(pltpu.VMEM((g, width), jnp.float32))
        grid_spec = pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(b, kv_heads, mb),
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
        )(layer, lengths, table.reshape(-1), *kernel_args)
    head = pl.BlockSpec((None, None, g, h), lambda bi, ki: (bi, ki, 0, 0))
    pool = pl.BlockSpec(k_pages.shape, lambda bi, ki: (0,) * 5)  # the whole pool: pages gathered by id
    in_specs = [
        pl.BlockSpec((1,), lambda bi, ki: (0,)),
        pl.BlockSpec((None, 1, 1), lambda bi, ki: (bi, 0, 0)),
        pl.BlockSpec((None, mb), lambda bi, ki: (bi, 0)),
        head,
        pool,
        pool,
    ]
    out_specs = [head, pl.BlockSpec((None, None, g, 1), lambda bi, ki: (bi, ki, 0, 0))]
    if r:
        in_specs.append(pl.BlockSpec((None, mb * page, r), lambda bi, ki: (bi, 0, 0)))
        out_specs.append(pl.BlockSpec((None, None, g, width), lambda bi, ki: (bi, ki, 0, 0)))
    return pl.pallas_call(
        functools.partial(_decode_kernel, scale=h**-0.5, r=r, width=width, tile=min(page, TRITON_TILE)),
        grid=(b, kv_heads),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=tg.compiler_params(target, interpret),
        interpret=interpret,
        name="decode_attention",
    )(layer, lengths.reshape(b, 1, 1), table, *kernel_args)


def _check(q, k_pages, v_pages, table, lengths, key_steps, num_steps):
    b, n, h = q.shape
    if k_pages.ndim != 5 or k_pages.shape != v_pages.shape or k_pages.shape[4] != h or n % k_pages.shape[1]:
        raise ValueError(
            "decode attention needs q [B, N, H] and page pools [L, K, P, page, H] with N a multiple of K; "
            f"got {q.shape}, {k_pages.shape}, {v_pages.shape}"
        )
    if table.ndim != 2 or table.shape[0] != b or lengths.shape != (b,):
        raise ValueError(f"page table [B, MB] and lengths [B] with B={b}; got {table.shape}, {lengths.shape}")
    s = table.shape[1] * k_pages.shape[3]
    if num_steps and (key_steps is None or key_steps.shape[:2] != (b, s) or key_steps.ndim not in (2, 3)):
        shape = None if key_steps is None else key_steps.shape
        raise ValueError(f"key_steps must be [B, S] or [B, S, R] with [B, S]={b, s}; got {shape}")


@functools.partial(jax.jit, static_argnames=("num_steps", "target", "interpret"))
def decode_attention(
    q,
    k_pages,
    v_pages,
    table,
    lengths,
    key_steps=None,
    layer=0,
    *,
    num_steps: int = 0,
    target=None,
    interpret=None,
):
    """Attention of one query per row over a paged cache.

    Args:
      q: [B, N, H] (the new token's queries; it has already been written into the cache).
      k_pages, v_pages: [L, K, P, page, H] page pools (the compute dtype, or its raw 16-bit words).
      table: [B, MB] int32, the page of each row's positions [m page, (m + 1) page); entries at or past
        the row's length are never read (any value).
      lengths: [B] int32 valid length per row (the new token included): positions < lengths[b].
      key_steps: [B, MB page] step id of each position (-1: none; >= num_steps: merged into the last
        step), or [B, MB page, R] for R segmentations at once.
      layer: which layer of the pools (a scalar).
      num_steps: C; 0 skips the mass.
      target, interpret: as in `flash_attention`.

    Returns:
      (out [B, N, H], lse [B, N] float32, mass [B, N, C] (or [B, N, R, C]) float32 or None)
    """
    _check(q, k_pages, v_pages, table, lengths, key_steps, num_steps)
    b, n, h = q.shape
    kv_heads = k_pages.shape[1]
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
    # Pages are read by id: an entry past a row's length may hold anything, so keep it inside the pool.
    table = jnp.clip(table, 0, k_pages.shape[2] - 1).astype(jnp.int32)
    layer = jnp.asarray(layer, jnp.int32).reshape(1)

    def build(tgt, interp):
        # Triton block shapes are powers of two (a dot needs at least 16 rows): pad the head group and the
        # step buckets; the TPU form takes them whole.
        gp = max(16, tg.next_pow2(g)) if tgt == "triton" else g
        width = r * num_steps
        width = max(16, tg.next_pow2(width)) if width and tgt == "triton" else width

        def run(q, k_pages, v_pages, table, lengths, layer, steps=None):
            qg = jnp.pad(q.reshape(b, kv_heads, g, h), ((0, 0), (0, 0), (0, gp - g), (0, 0)))
            out, lse, *mass = _decode(
                qg,
                k_pages,
                v_pages,
                table,
                lengths.astype(jnp.int32),
                layer,
                steps,
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

    args = (q, k_pages, v_pages, table, lengths, layer) + ((steps,) if r else ())
    out, lse, *mass = tg.dispatch(build, args, target, interpret)
    if not r:
        return out, lse, None
    return out, lse, mass[0][:, :, 0] if squeeze else mass[0]


def gather_pages(pages, table, layer=0):
    """[B, MB page, K, H]: each row's positions read through its page table from pools [L, K, P, page, H]
    (raw words as stored)."""
    g = pages[layer][:, jnp.clip(table, 0, pages.shape[2] - 1)]  # [K, B, MB, page, H]
    k, b, mb, page, h = g.shape
    return g.transpose(1, 2, 3, 0, 4).reshape(b, mb * page, k, h)


def decode_attention_reference(
    q, k_pages, v_pages, table, lengths, key_steps=None, num_steps: int = 0, layer=0
):
    """Dense float32 reference of `decode_attention` (the pools in the compute dtype of q, or its words)."""
    _check(q, k_pages, v_pages, table, lengths, key_steps, num_steps)
    b, n, h = q.shape
    k = _as(gather_pages(k_pages, table, layer), q.dtype)
    v = _as(gather_pages(v_pages, table, layer), q.dtype)
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
