"""Page bookkeeping of the sampler's paged KV cache (`model.kv_cache.KVCache`), as pure array functions.

Each shard of the pool has A pages; `refs` [X, A] counts the rows whose page table names each page, and a
page with no reference is free. A prefix's pages are shared by every row that continues it (one reference
each); the page a row's prefix ends in, and every page it fills while decoding, is the row's own.

Admission is by reservation, so a row never waits for a page mid-decode and no row is ever evicted: a row
enters only if the shard's free pages, less what the rows already decoding may still take, cover its
worst case (`pages_spanned`); it takes its pages one at a time as it crosses page boundaries (a row holds
the pages it has written, not its worst case), and gives them back when it ends. The entry P of a page table,
and an id of A anywhere here, means "no page".
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attnrl_jax.typing import Array


def pages_spanned(start: Array, count: Array, page: int) -> Array:
    """Pages that positions [start, start + count) touch (count >= 1): the pages a row whose prefix has
    `start` tokens writes when it samples `count` tokens (each sampled token is fed, the last one too)."""
    return (start + count - 1) // page - start // page + 1


def take_free(refs: Array, ranks: Array, want: Array) -> Array:
    """Free pages by rank: for each shard d and item i with want[d, i], the ranks[d, i]-th free page of the
    shard (0-based, in page order; refs [X, A], ranks and want [X, M]); A where not wanted or where the
    shard has fewer free pages (callers admit rows so that it never does)."""
    cum = jnp.cumsum(refs == 0, axis=1)
    ids = jax.vmap(lambda c, r: jnp.searchsorted(c, r + 1, side="left"))(cum, ranks)
    return jnp.where(want, ids, refs.shape[1]).astype(jnp.int32)


def add_refs(refs: Array, ids: Array, delta) -> Array:
    """refs [X, A] plus `delta` at every id of ids [X, ...] (a page named twice counts twice; A: none)."""
    return jax.vmap(lambda r, i: r.at[i.reshape(-1)].add(delta, mode="drop"))(refs, ids)


def available(refs: Array, reserved: Array) -> Array:
    """[X] pages a shard can promise to new rows: its free pages less the reservations [X, ...] of its
    rows (the pages they may still take)."""
    return jnp.sum(refs == 0, axis=1) - jnp.sum(reserved.reshape(refs.shape[0], -1), axis=1)
