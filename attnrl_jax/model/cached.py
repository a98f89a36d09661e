"""The cached forwards over the paged KV cache (`model/kv_cache.py`): prefilling prefixes into pages,
and running new tokens after each row's cached ones (the sampler's decode step). Both are the decoder
skeleton (`forward.decoder`) with a layer that also writes the layer's keys and values into the pools.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from attnrl_jax.fci import step_mass
from attnrl_jax.mesh import Sharder
from attnrl_jax.model.attention import attention, attention_mask, paged_decode_attention, prefill_attention
from attnrl_jax.model.config import ModelConfig
from attnrl_jax.model.forward import decoder, out_and_mlp, qkv
from attnrl_jax.model.kv_cache import (
    KVCache,
    by_shard,
    load,
    read_positions,
    store,
    write_pages,
    write_positions,
)
from attnrl_jax.model.params import layer_weights
from attnrl_jax.typing import Array, Params


def forward_cached(
    params: Params,
    tokens: Array,
    cache: KVCache,
    *,
    cfg: ModelConfig,
    valid: Array | None = None,
    key_steps: Array | None = None,
    num_steps: int = 0,
    sharder: Sharder | None = None,
) -> tuple[Array, KVCache, Array | None]:
    """Runs `tokens` [B, T] after each row's cached tokens and appends their keys/values to the cache.

    Token t of row b sits at position cache.lengths[b] + t, in the page the row's table names for it (the
    caller assigns pages); `valid` [B, T] (default: all) marks real tokens (right padding), and each row's
    length grows by its number of valid tokens. Attention is causal over the row's pages: the XLA path of
    the attention seam with per-row query offsets over the pages read through the table, or, for
    single-token decoding with attention_impl "pallas", the paged Pallas decode kernel.

    With `key_steps` [B, S] (the step id of every cache position, -1 for none; or [B, Y, S] for Y
    segmentations at once; S = cache.size; along a row's positions the ids never decrease and rise by at
    most one per position, as `kernels/decode_attention.py` needs) and `num_steps` C, also returns the
    attention mass that each new token pays to each key step, [L, B, N, T, C] (or [L, B, N, T, Y, C])
    summed over the tokens of the step: the per-token rows of the attention matrix that FCI accumulates
    while decoding. key_steps may cover only the first J rows of each of the cache's X shards ([X J, (Y,)
    S], in that order): the mass
    is then computed for those rows alone ([L, X J, ...]), the sampler's rows that track FCI.

    Returns:
      (final hidden states [B, T, D], the updated cache, the attention mass or None)
    """
    sharder = sharder or Sharder()
    b, t = tokens.shape
    valid = jnp.ones((b, t), bool) if valid is None else valid.astype(bool)
    positions = cache.lengths[:, None] + jnp.arange(t)[None, :]  # [B, T]
    new_lengths = cache.lengths + valid.sum(axis=1).astype(jnp.int32)
    track = key_steps is not None
    squeeze = track and key_steps.ndim == 2
    if squeeze:
        key_steps = key_steps[:, None]  # one segmentation
    d = cache.shards
    tracked = key_steps.shape[0] // d if track else 0  # rows of each shard with key steps
    if track and (key_steps.shape[0] % d or not 0 < tracked <= b // d):
        raise ValueError(f"key_steps of {key_steps.shape[0]} rows: not the first rows of each of {d} shards")
    write_pos = jnp.where(valid, positions, -1)  # padding writes nowhere
    step = _CachedLayer(cfg, sharder, cache, valid, write_pos, new_lengths, key_steps, num_steps, tracked)
    h, (ck, cv), mass = decoder(params, tokens, positions, step, (cache.k, cache.v), cfg=cfg, sharder=sharder)
    if squeeze:
        mass = mass[..., 0, :]
    return h, KVCache(ck, cv, cache.table, new_lengths), mass


@dataclasses.dataclass(frozen=True)
class _CachedLayer:
    """The cached forward's layer: writes the new tokens' keys and values at their positions (write_pos
    [B, T], -1 for none), attends over each row's pages (the paged Pallas decode kernel for single-token
    decoding with attention_impl "pallas", else the XLA path over the pages read through the table), and
    returns the attention mass per key step of the first `tracked` rows of each shard ([D tracked, N, T,
    R, C], or None without key steps)."""

    cfg: ModelConfig
    sharder: Sharder
    cache: KVCache
    valid: Array
    write_pos: Array
    new_lengths: Array
    key_steps: Array | None
    num_steps: int
    tracked: int

    def __call__(self, x, pools, lp, li, cos, sin):
        cfg, sharder, cache = self.cfg, self.sharder, self.cache
        dtype, (ck, cv) = jnp.dtype(cfg.dtype), pools
        lp = layer_weights(lp, cfg)
        q, k, v = qkv(cfg, sharder, lp, x, cos, sin)
        ck = write_positions(ck, li, cache.table, self.write_pos, store(k, ck.dtype, dtype))
        cv = write_positions(cv, li, cache.table, self.write_pos, store(v, cv.dtype, dtype))
        track = self.key_steps is not None
        if cfg.attention_impl == "pallas" and x.shape[1] == 1:
            # The paged Pallas decode kernel: reads only the pages below each row's length and returns
            # the per-step attention mass itself. (Rows with no valid token compute values nobody reads.)
            out, mass = paged_decode_attention(
                sharder,
                q[:, 0],
                ck,
                cv,
                li,
                cache.table,
                self.new_lengths,
                self.key_steps,
                self.num_steps,
                self.tracked,
            )
            x = out_and_mlp(cfg, sharder, lp, x, out[:, None])
            return x, (ck, cv), (mass[:, :, None] if track else None)
        k_all = load(read_positions(ck, li, cache.table, cfg.num_kv_heads), dtype)  # [B, S, K, H]
        v_all = load(read_positions(cv, li, cache.table, cfg.num_kv_heads), dtype)
        q_seg = self.valid.astype(jnp.int32)
        kv_seg = (jnp.arange(cache.size)[None, :] < self.new_lengths[:, None]).astype(jnp.int32)  # [B, S]
        a, lse = attention(q, k_all, v_all, q_seg, kv_seg, return_lse=True, q_offsets=cache.lengths)
        x = out_and_mlp(cfg, sharder, lp, x, a)
        if not track:
            return x, (ck, cv), None
        rows = (q, k_all, lse, attention_mask(q_seg, kv_seg, cache.lengths))
        b, d = x.shape[0], cache.shards
        if self.tracked < b // d:  # the tracked rows: the first `tracked` of each shard's B / D
            sub = (jnp.arange(d)[:, None] * (b // d) + jnp.arange(self.tracked)[None, :]).reshape(-1)
            rows = tuple(arr[sub] for arr in rows)
        return x, (ck, cv), step_mass(*rows, self.key_steps, self.num_steps)


def prefill_into_pages(
    params: Params,
    tokens: Array,
    valid: Array,
    cache: KVCache,
    page_ids: Array,
    page_src: Array,
    page_start: Array,
    *,
    cfg: ModelConfig,
    sharder: Sharder | None = None,
    chunk: int = 512,
) -> tuple[Array, KVCache]:
    """Prefills the prefixes `tokens` [R, P] (`valid` [R, P] marks their left-aligned tokens; the R
    prefixes are split over the cache's X shards in order) from position 0, and writes each layer's keys
    and values into whole pages: page page_ids[d, m] of shard d gets positions page_start[d, m] ..
    + page - 1 of the shard's prefix page_src[d, m] (an id of A writes nothing). A prefix's own pages and
    a row's private copy of the page its prefix ends in are both such pages.

    The prefixes attend only to themselves (`attention.prefill_attention`: the flash kernel, or XLA in
    query chunks), never to the cache, and one layer's [R, P] keys exist at a time. Page tables and
    lengths are the caller's.

    Returns (final hidden states [R, P, D], the cache).
    """
    sharder = sharder or Sharder()
    r, p = tokens.shape
    d, page = cache.shards, cache.page
    dtype = jnp.dtype(cfg.dtype)
    seg = valid.astype(jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (r, p))
    cols = jnp.clip(page_start[..., None] + jnp.arange(page), 0, p - 1)  # [X, M, page]

    def pages_of(kv):  # [R, P, K, H] -> [X, M, page, K, H]
        return jax.vmap(lambda x, s, c: x[s[:, None], c])(by_shard(kv, d), page_src, cols)

    def layer(x, pools, lp, li, cos, sin):
        ck, cv = pools
        lp = layer_weights(lp, cfg)
        q, k, v = qkv(cfg, sharder, lp, x, cos, sin)
        a = prefill_attention(q, k, v, seg, impl=cfg.attention_impl, chunk=chunk, sharder=sharder)
        x = out_and_mlp(cfg, sharder, lp, x, a)
        ck = write_pages(ck, li, page_ids, pages_of(store(k, ck.dtype, dtype)))
        cv = write_pages(cv, li, page_ids, pages_of(store(v, cv.dtype, dtype)))
        return x, (ck, cv), None

    h, (ck, cv), _ = decoder(params, tokens, positions, layer, (cache.k, cache.v), cfg=cfg, sharder=sharder)
    return h, KVCache(ck, cv, cache.table, cache.lengths)
