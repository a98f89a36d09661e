"""Decode attention in Pallas over a paged KV cache: one query token per row, its keys and values in pages
that a page table names, returning the output, the log-sum-exp and (optionally) the attention mass that the
token pays to each key step.

The cache is the sampler's page pool, `[L, A, page, K H]` per layer, page, position in the page and the KV
heads' values side by side (KV head k in columns [k H, (k + 1) H)), stacked over layers so that one layer's
kernel reads the pool the layer scan carries (no per-layer slice of it is copied); `layer` picks the layer.
Row b's position s lives in page `table[b, s // page]` at offset `s % page`; rows that share a prefix share
its pages. The pool may hold the compute dtype's values as raw 16-bit words (`model.kv_cache.cache_dtype`):
each page is bitcast on chip. A position's keys are one contiguous row of the pool, so writing a new token is
a scatter of whole rows into the pool's own layout: on TPU the compiler keeps one layout of the pool for
that write, the prefill's page writes and this kernel (with the KV heads as a separate axis the token write
wanted a layout of its own, and XLA copied the whole pool between the two around every write).

Each program serves the G query heads of one KV head (no K/V copies) and visits only the pages below the
row's length, so neither the unused tail of a row nor other rows' pages are read. With key step ids it
also accumulates the per-step mass (the attention the query pays to the keys of each step) with the same
online-softmax rescaling, so one pass over the cache yields the output and the per-token rows that FCI
accumulates while decoding, for Y segmentations at once (`key_steps` [B, Y, S], the sampler's default
Y = 2). Key steps follow the sampler's contract: along a row's positions each segmentation's step ids never
decrease and rise by at most one per position (positions of -1, no step, may sit anywhere: between two
positions with steps, i < j, the id rises by at most j - i).

Two forms (`kernels/target.py`):
* "triton" loops over the row's pages inside one program per (row, KV head), gathering each page by its id,
  `TRITON_TILE` positions at a time (the pool is one block in global memory; only the piece being used is
  loaded), with the query-head group padded to a power of two (Triton's block shapes; the 1.5B model's group
  is 6, the 7B's 7). The step mass is accumulated in a window of `2 x tile` step buckets per segmentation
  that follows the tile's steps (the contract above keeps a tile's steps inside it), held in registers and
  added to the row's raw sums in global memory, with the running maximum it was scaled by, only when the
  steps leave the window; the wrapper rescales the raw sums by the final log-sum-exp. A dense one-hot of
  every bucket ([tile, Y C] float32, 256 KiB at Y = 2, C = 512) does not fit an H100's 227 KiB of shared
  memory per block (XLA:GPU refused it); the window's is [tile, 2 tile] whatever R and C are: the kernel
  compiles for an H100 in 23 KiB of shared memory and 168 registers without spills at Y = 2, C = 512 and
  C = 2048 alike (`benchmarks/kernel_compile.py`).
* "tpu" makes the pages a grid axis, with the layer, the rows' lengths and the page table prefetched into
  SMEM, so that the index map fetches page `table[b, j]` (its KV head's columns) and pages past a row's
  length repeat its last one (no fetch). The mass is p @ onehot(steps) ([G, page] x [page, Y C]) in VMEM.
Key steps come as [B, Y, S], positions last: the lanes of a TPU tile, where [B, S, Y] would pad Y to 128
lanes (64 times the array at Y = 2); pages of fewer than 128 positions are not a lane block, and the TPU form
reads their steps as [B, S, Y] (the built-in tasks' pages of 16: small caches).
A page is the TPU form's tile: a multiple of 16 positions for its bfloat16 tiles; the GPU form's pieces need a
power of two of at least 16 (Triton's dots), so a power of two of at least 16 serves both.
`decode_attention_reference` is the dense float32 version of the same contract.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from attnrl_jax.kernels import target as tg
from attnrl_jax.kernels.flash_attention import (
    MASK_VALUE,
    _dot_t,
    _init_stats,
    finish,
    softmax_step,
)

TRITON_TILE = 32  # positions per step of the GPU form's loop (a page is read in pieces of at most this)
NO_STEP = 1 << 30  # above any step id: the minimum over a tile with no step


def _onehot_t(steps_row, width):
    """[width, tile] float32 one-hot (transposed) of (already offset) step ids [1, tile]; ids outside
    [0, width) match nothing."""
    return (steps_row == lax.broadcasted_iota(jnp.int32, (width, steps_row.shape[1]), 0)).astype(jnp.float32)


def _step_mass(p, steps_ref, r, width, lanes):
    """p [G, page] @ the one-hot of a page's key steps over all Y segmentations (their buckets are
    disjoint): [G, width]. steps_ref is the page's [Y, page] (`lanes`) or [page, Y]."""
    if lanes:
        onehot = sum(_onehot_t(steps_ref[pl.ds(i, 1), :], width) for i in range(r))  # [width, page]
        return _dot_t(p, onehot)
    iota = lax.broadcasted_iota(jnp.int32, (steps_ref.shape[0], width), 1)
    onehot = sum((steps_ref[:, pl.ds(i, 1)] == iota).astype(jnp.float32) for i in range(r))  # [page, width]
    return jnp.dot(p, onehot, preferred_element_type=jnp.float32)


def _as(x, dtype):
    """A loaded page in the compute dtype (the pool may store 16-bit floats as uint16 words)."""
    return x if x.dtype == dtype else lax.bitcast_convert_type(x, dtype)


def _flush(sums_ref, scale_ref, base, win, m):
    """Adds a window of step sums `win` [G, W] (scaled by exp(-m), m [G, 1]) into the row's raw sums at
    buckets [base, base + W), rescaling what is there from the maximum it was stored with."""
    cols = (slice(None), pl.ds(base, win.shape[1]))
    old, old_m = sums_ref[cols], scale_ref[cols]
    sums_ref[cols] = old * jnp.exp(old_m - m) + win
    scale_ref[cols] = jnp.broadcast_to(m, win.shape)


def _decode_kernel(layer_ref, len_ref, table_ref, q_ref, k_ref, v_ref, *rest, scale, r, tile, window):
    """Triton form: one program per (row, KV head), looping over `tile`-position pieces of the pages
    below the row's length; with key steps, the windowed step sums (module docstring)."""
    if r:
        steps_ref, o_ref, lse_ref, sums_ref, scale_ref = rest
    else:
        o_ref, lse_ref = rest
    length, layer, ki = len_ref[0, 0], layer_ref[0], pl.program_id(1)
    page = k_ref.shape[-2]
    per_page = page // tile
    q = q_ref[...]  # [Gp, H]
    g, h = q.shape
    heads = pl.ds(pl.multiple_of(ki * h, h), h)  # this KV head's columns of a pool row

    if r:  # the raw sums start at zero, scaled by nothing yet

        def clear(c, _):
            cols = (slice(None), pl.ds(pl.multiple_of(c * window, window), window))
            sums_ref[cols] = jnp.zeros((g, window), jnp.float32)
            scale_ref[cols] = jnp.full((g, window), MASK_VALUE, jnp.float32)
            return _

        lax.fori_loop(0, sums_ref.shape[1] // window, clear, 0)

    def body(j, carry):
        m, denom, acc = carry[:3]
        blk = table_ref[pl.ds(lax.div(j, per_page), 1)]  # [1] page id (j >= 0: lax's div and rem)
        piece = pl.ds(pl.multiple_of(lax.rem(j, per_page) * tile, tile), tile)
        k = _as(k_ref[layer, blk, piece, heads], q.dtype).reshape(tile, h)
        v = _as(v_ref[layer, blk, piece, heads], q.dtype).reshape(tile, h)
        pos = j * tile + lax.broadcasted_iota(jnp.int32, (g, tile), 1)
        m_new, p, corr, denom = softmax_step(_dot_t(q, k) * scale, pos < length, m, denom)
        acc = corr * acc + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        if not r:
            return m_new, denom, acc
        ks = pl.ds(pl.multiple_of(j * tile, tile), tile)
        seen = (j * tile + lax.broadcasted_iota(jnp.int32, (1, tile), 1)) < length
        out = [m_new, denom, acc]
        for i in range(r):
            base, win = carry[3 + 2 * i], carry[4 + 2 * i]
            st = steps_ref[pl.ds(i, 1), ks]  # [1, tile], offset into segmentation i's buckets
            has = seen & (st >= 0)
            low = jnp.min(jnp.where(has, st, NO_STEP))
            top = jnp.max(jnp.where(has, st, -1))
            leave = top >= base + window  # the tile's steps leave the window: store it, move it

            pl.when(leave)(functools.partial(_flush, sums_ref, scale_ref, base, win, m))

            base = jnp.where(leave, low, base)
            win = jnp.where(leave, 0.0, win) * corr
            win = win + _dot_t(p, _onehot_t(st - base, window))
            out += [base, win]
        return tuple(out)

    init = _init_stats(g, h)
    for _ in range(r):
        init += (jnp.int32(0), jnp.zeros((g, window), jnp.float32))
    m, denom, acc, *wins = lax.fori_loop(0, (length + tile - 1) // tile, body, init)
    o, lse = finish(m, denom, acc)
    o_ref[...] = o.astype(o_ref.dtype)
    lse_ref[...] = lse
    for i in range(r):
        _flush(sums_ref, scale_ref, wins[2 * i], wins[2 * i + 1], m)


def _decode_kernel_tpu(layer_ref, len_ref, table_ref, q_ref, k_ref, v_ref, *rest, scale, r, width, lanes):
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
        s = _dot_t(q, _as(k_ref[...], q.dtype)) * scale
        m, p, corr, denom = softmax_step(s, valid, m_ref[...], l_ref[...])
        v = _as(v_ref[...], q.dtype)
        acc_ref[...] = corr * acc_ref[...] + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        m_ref[...], l_ref[...] = m, denom
        if r:
            macc_ref[...] = corr * macc_ref[...] + _step_mass(p, steps_ref, r, width, lanes)

    @pl.when(j == pl.num_programs(2) - 1)
    def _():
        o, lse = finish(m_ref[...], l_ref[...], acc_ref[...])
        o_ref[...] = o.astype(o_ref.dtype)
        lse_ref[...] = lse
        if r:
            mass_ref[...] = finish(m_ref[...], l_ref[...], macc_ref[...])[0]


def _decode_tpu(qg, k_pages, v_pages, table, lengths, layer, steps, *, interpret, r, width):
    """The TPU form: qg [B, K, G, H], pools [L, A, page, K H]. Returns (out, lse [B, K, G, 1], mass
    [B, K, G, width] or None)."""
    from jax.experimental.pallas import tpu as pltpu

    b, kv_heads, g, h = qg.shape
    page, mb = k_pages.shape[2], table.shape[1]
    out_shape = [
        jax.ShapeDtypeStruct(qg.shape, qg.dtype),
        jax.ShapeDtypeStruct((b, kv_heads, g, 1), jnp.float32),
    ] + ([jax.ShapeDtypeStruct((b, kv_heads, g, width), jnp.float32)] if r else [])

    def visible(bi, j, len_ref):  # pages past the row's length repeat its last page: no new fetch
        return jnp.minimum(j, jnp.maximum((len_ref[bi] + page - 1) // page - 1, 0))

    def kv_index(bi, ki, j, layer_ref, len_ref, table_ref):
        return layer_ref[0], table_ref[bi * mb + visible(bi, j, len_ref)], 0, ki

    head = pl.BlockSpec((None, None, g, h), lambda bi, ki, j, *_: (bi, ki, 0, 0))
    kv = pl.BlockSpec((None, None, page, h), kv_index)
    in_specs = [head, kv, kv]
    out_specs = [head, pl.BlockSpec((None, None, g, 1), lambda bi, ki, j, *_: (bi, ki, 0, 0))]
    scratch = [
        pltpu.VMEM((g, 1), jnp.float32),
        pltpu.VMEM((g, 1), jnp.float32),
        pltpu.VMEM((g, h), jnp.float32),
    ]
    # A page's key steps with its positions in lanes ([Y, page]) where a page fills whole lanes; smaller
    # pages (the built-in tasks' 16) cannot be a lane block, and take them as [page, Y] instead.
    lanes = page % 128 == 0
    if r and lanes:
        in_specs.append(
            pl.BlockSpec((None, r, page), lambda bi, ki, j, _, len_ref, __: (bi, 0, visible(bi, j, len_ref)))
        )
    elif r:
        steps = jnp.swapaxes(steps, 1, 2)
        in_specs.append(
            pl.BlockSpec((None, page, r), lambda bi, ki, j, _, len_ref, __: (bi, visible(bi, j, len_ref), 0))
        )
    if r:
        out_specs.append(pl.BlockSpec((None, None, g, width), lambda bi, ki, j, *_: (bi, ki, 0, 0)))
        scratch.append(pltpu.VMEM((g, width), jnp.float32))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=3,
        grid=(b, kv_heads, mb),
        in_specs=in_specs,
        out_specs=out_specs,
        scratch_shapes=scratch,
    )
    outs = pl.pallas_call(
        functools.partial(_decode_kernel_tpu, scale=h**-0.5, r=r, width=width, lanes=lanes),
        grid_spec=grid_spec,
        out_shape=out_shape,
        compiler_params=tg.compiler_params("tpu", interpret, "parallel", "parallel", "arbitrary"),
        interpret=interpret,
        name="decode_attention",
    )(layer, lengths, table.reshape(-1), qg, k_pages, v_pages, *([steps] if r else []))
    return outs if r else (*outs, None)


def _decode_triton(qg, k_pages, v_pages, table, lengths, layer, steps, *, interpret, r, width):
    """The GPU form: qg [B, K, Gp, H], pools [L, A, page, K H]. Returns (out, lse [B, K, Gp, 1], mass
    [B, K, Gp, width] or None): the raw windowed sums rescaled here by the final log-sum-exp."""
    b, kv_heads, g, h = qg.shape
    page, mb = k_pages.shape[2], table.shape[1]
    tile = min(page, TRITON_TILE)
    window = 2 * tile
    # Bucket b of the sums sits in column b; a window starting at the last bucket reaches window - 1 past it.
    cols = (-(-width // window) + 1) * window
    head = pl.BlockSpec((None, None, g, h), lambda bi, ki: (bi, ki, 0, 0))
    pool = pl.BlockSpec(k_pages.shape, lambda bi, ki: (0,) * 4)  # the whole pool: pages gathered by id
    in_specs = [
        pl.BlockSpec((1,), lambda bi, ki: (0,)),
        pl.BlockSpec((None, 1, 1), lambda bi, ki: (bi, 0, 0)),
        pl.BlockSpec((None, mb), lambda bi, ki: (bi, 0)),
        head,
        pool,
        pool,
    ]
    out_shape = [
        jax.ShapeDtypeStruct(qg.shape, qg.dtype),
        jax.ShapeDtypeStruct((b, kv_heads, g, 1), jnp.float32),
    ]
    out_specs = [head, pl.BlockSpec((None, None, g, 1), lambda bi, ki: (bi, ki, 0, 0))]
    if r:
        in_specs.append(pl.BlockSpec((None, r, mb * page), lambda bi, ki: (bi, 0, 0)))
        sums = pl.BlockSpec((None, None, g, cols), lambda bi, ki: (bi, ki, 0, 0))
        out_specs += [sums, sums]
        out_shape += [jax.ShapeDtypeStruct((b, kv_heads, g, cols), jnp.float32)] * 2
    outs = pl.pallas_call(
        functools.partial(_decode_kernel, scale=h**-0.5, r=r, tile=tile, window=window),
        grid=(b, kv_heads),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=tg.compiler_params("triton", interpret),
        interpret=interpret,
        name="decode_attention",
    )(layer, lengths.reshape(b, 1, 1), table, qg, k_pages, v_pages, *([steps] if r else []))
    if not r:
        return (*outs, None)
    out, lse, raw, scaled_by = outs
    return out, lse, (raw * jnp.exp(scaled_by - lse))[..., :width]


def _check(q, k_pages, v_pages, table, lengths, key_steps, num_steps):
    b, n, h = q.shape
    if (
        k_pages.ndim != 4
        or k_pages.shape != v_pages.shape
        or k_pages.shape[3] % h
        or n % (k_pages.shape[3] // h or 1)
    ):
        raise ValueError(
            "decode attention needs q [B, N, H] and page pools [L, A, page, K H] with N a multiple of K; "
            f"got {q.shape}, {k_pages.shape}, {v_pages.shape}"
        )
    if table.ndim != 2 or table.shape[0] != b or lengths.shape != (b,):
        raise ValueError(f"page table [B, MB] and lengths [B] with B={b}; got {table.shape}, {lengths.shape}")
    s = table.shape[1] * k_pages.shape[2]
    if num_steps and (
        key_steps is None
        or key_steps.ndim not in (2, 3)
        or (key_steps.shape[0], key_steps.shape[-1]) != (b, s)
    ):
        shape = None if key_steps is None else key_steps.shape
        raise ValueError(f"key_steps must be [B, S] or [B, Y, S] with [B, S]={b, s}; got {shape}")


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
      k_pages, v_pages: [L, A, page, K H] page pools (the compute dtype, or its raw 16-bit words).
      table: [B, MB] int32, the page of each row's positions [m page, (m + 1) page); entries at or past
        the row's length are never read (any value).
      lengths: [B] int32 valid length per row (the new token included): positions < lengths[b].
      key_steps: [B, MB page] step id of each position (-1: none; >= num_steps: merged into the last
        step), or [B, Y, MB page] for Y segmentations at once. Along a row's positions below its length
        each segmentation's ids never decrease and rise by at most one per position (module docstring);
        the GPU form drops mass that breaks this, the TPU form and the reference take any ids.
      layer: which layer of the pools (a scalar).
      num_steps: C; 0 skips the mass.
      target, interpret: as in `flash_attention`.

    Returns:
      (out [B, N, H], lse [B, N] float32, mass [B, N, C] (or [B, N, Y, C]) float32 or None)
    """
    _check(q, k_pages, v_pages, table, lengths, key_steps, num_steps)
    b, n, h = q.shape
    kv_heads = k_pages.shape[3] // h
    squeeze = bool(num_steps) and key_steps.ndim == 2
    if num_steps:
        steps = key_steps[:, None] if squeeze else key_steps  # [B, Y, S]
        r = steps.shape[1]
        # Segmentation i's steps go to buckets [i C, (i + 1) C); no step (-1) matches no bucket.
        offset = num_steps * jnp.arange(r)[:, None]
        steps = jnp.where(steps >= 0, jnp.minimum(steps, num_steps - 1) + offset, -1)
        steps = steps.astype(jnp.int32)
    else:
        r, steps = 0, None
    g = n // kv_heads
    # Pages are read by id: an entry past a row's length may hold anything, so keep it inside the pool.
    table = jnp.clip(table, 0, k_pages.shape[1] - 1).astype(jnp.int32)
    layer = jnp.asarray(layer, jnp.int32).reshape(1)
    width = r * num_steps

    def build(tgt, interp):
        # Triton block shapes are powers of two (a dot needs at least 16 rows): pad the head group; the
        # TPU form takes it whole.
        gp = max(16, tg.next_pow2(g)) if tgt == "triton" else g
        form = _decode_triton if tgt == "triton" else _decode_tpu

        def run(q, k_pages, v_pages, table, lengths, layer, steps=None):
            qg = jnp.pad(q.reshape(b, kv_heads, g, h), ((0, 0), (0, 0), (0, gp - g), (0, 0)))
            out, lse, mass = form(
                qg,
                k_pages,
                v_pages,
                table,
                lengths.astype(jnp.int32),
                layer,
                steps,
                interpret=interp,
                r=r,
                width=width,
            )
            out = out[:, :, :g].reshape(b, n, h)
            lse = lse[:, :, :g].reshape(b, n)
            if not r:
                return out, lse
            return out, lse, mass[:, :, :g, :width].reshape(b, n, r, num_steps)

        return run

    args = (q, k_pages, v_pages, table, lengths, layer) + ((steps,) if r else ())
    out, lse, *mass = tg.dispatch(build, args, target, interpret)
    if not r:
        return out, lse, None
    return out, lse, mass[0][:, :, 0] if squeeze else mass[0]


def gather_pages(pages, table, layer=0, heads=None):
    """[B, MB page, K, H]: each row's positions read through its page table from pools [L, A, page, K H]
    (raw words as stored); `heads` K (default: the pool's last axis is one head's values)."""
    g = pages[layer][jnp.clip(table, 0, pages.shape[1] - 1)]  # [B, MB, page, K H]
    b, mb, page, kh = g.shape
    k = heads or 1
    return g.reshape(b, mb * page, k, kh // k)


def decode_attention_reference(
    q, k_pages, v_pages, table, lengths, key_steps=None, num_steps: int = 0, layer=0
):
    """Dense float32 reference of `decode_attention` (the pools in the compute dtype of q, or its words)."""
    _check(q, k_pages, v_pages, table, lengths, key_steps, num_steps)
    b, n, h = q.shape
    heads = k_pages.shape[3] // h
    k = _as(gather_pages(k_pages, table, layer, heads), q.dtype)
    v = _as(gather_pages(v_pages, table, layer, heads), q.dtype)
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
    onehot = jax.nn.one_hot(steps, num_steps, dtype=jnp.float32)  # -1 -> all zeros; [B, (Y,) S, C]
    if key_steps.ndim == 2:
        return out, lse, jnp.einsum("bns,bsc->bnc", p, onehot)
    return out, lse, jnp.einsum("bns,brsc->bnrc", p, onehot)
