"""The paged KV cache: a pool of pages per shard, a page table per row, and the page reads and writes
the cached forwards (`model/cached.py`) make. The page bookkeeping (which pages are free, who holds them)
is the sampler's (`sampling/pages.py`)."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from attnrl_jax.mesh import Sharder
from attnrl_jax.model.config import ModelConfig
from attnrl_jax.typing import Array


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["k", "v", "table", "lengths"], meta_fields=[]
)
@dataclasses.dataclass(frozen=True)
class KVCache:
    """A paged KV cache: keys and values in pages of a pool, and a page table per row.

    k, v: [X, L, A, page, K H] pools: X shards (the mesh's batch split; each shard's rows use its own A
      pages, so every page a row reads is on the row's device), then per layer, pages, positions in a page,
      and the KV heads' values side by side (head k in [k H, (k + 1) H)): one position's keys are one
      contiguous row, so a token's write is a scatter of whole rows in the pool's own layout (on TPU, with
      the KV heads as an axis of their own, the write wanted another tiled layout and XLA copied the whole
      pool between the two around every write, `kernels/decode_attention.py`).
    table: [B, MB] the page (within the row's shard; rows are split over the shards in order, B / X each)
      that holds row b's positions [m page, (m + 1) page); A marks no page. Rows may share pages: tree
      continuations read the pages of their response's prefix instead of copying them.
    lengths: [B] valid positions of each row.

    k and v hold the compute dtype's values, a 16-bit float's as raw uint16 words (`cache_dtype`): `store`
    writes into them and `load` reads them back. XLA's CPU backend does a bfloat16 scatter in float32,
    converting the whole buffer there and back (two float32 copies of the cache per token written: four
    times the cache in temporaries, `benchmarks/scale_memory.py`), and a bitcast around each write is a
    copy there too; an integer scatter is done in place on every backend.
    """

    k: Array
    v: Array
    table: Array
    lengths: Array

    @property
    def page(self) -> int:
        return self.k.shape[3]

    @property
    def pages(self) -> int:
        """Pages per shard (A); a table entry of A names no page."""
        return self.k.shape[2]

    @property
    def shards(self) -> int:
        return self.k.shape[0]

    @property
    def size(self) -> int:
        """Positions a row can address."""
        return self.table.shape[1] * self.page


def pool_spec(sharder: Sharder, shape: tuple[int, ...], kv_heads: int, q_heads: int):
    """The PartitionSpec of a pool [X, L, A, page, K H]: shards over the batch axes, the KV heads' columns
    over their axis only where it splits whole query-head groups with their KV head (`kernel_axes`)."""
    b = sharder.spec(("batch",), shape[:1])[0]
    _, h = sharder.kernel_axes(shape[0], q_heads, kv_heads)
    return PartitionSpec(b, None, None, None, h)


def cache_dtype(dtype) -> jnp.dtype:
    """The KV cache's storage type for a compute dtype: the 16-bit integer of a 16-bit float (KVCache's
    docstring), else the dtype itself (a float32 scatter is done in place)."""
    dtype = jnp.dtype(dtype)
    return jnp.dtype(jnp.uint16) if dtype.itemsize == 2 else dtype


def store(values: Array, buf_dtype, dtype) -> Array:
    """Values in the cache's storage type (`buf_dtype`) for compute `dtype` (KVCache)."""
    values = values.astype(dtype)
    return values if values.dtype == buf_dtype else jax.lax.bitcast_convert_type(values, buf_dtype)


def load(buf: Array, dtype) -> Array:
    """Cache storage read as `dtype` values."""
    dtype = jnp.dtype(dtype)
    return buf if buf.dtype == dtype else jax.lax.bitcast_convert_type(buf, dtype)


def cache_shards(rows: int, sharder: Sharder | None, shards: int | None = None) -> int:
    """How many shards a pool for `rows` rows has: `shards` if given (1, or the mesh's batch split), else
    the mesh's batch split where it divides the rows (each device then holds its rows' pages), else 1 (the
    pool is replicated over the batch axes)."""
    d = (sharder or Sharder()).batch_parallelism()
    if shards is not None:
        if shards not in (1, d) or rows % shards:
            raise ValueError(
                f"a pool of {rows} rows is split 1 or {d} ways (the mesh's batch split), not {shards}"
            )
        return shards
    return d if rows % d == 0 else 1


def empty_cache(
    cfg: ModelConfig,
    rows: int,
    size: int,
    pages: int,
    page: int,
    sharder: Sharder | None = None,
    shards: int | None = None,
) -> KVCache:
    """A pool of `pages` pages of `page` positions per shard (`cache_shards`) for `rows` rows of up to
    `size` positions, with no page assigned to any row (table entries P) and zero lengths."""
    sharder = sharder or Sharder()
    d = cache_shards(rows, sharder, shards)
    shape = (d, cfg.num_layers, pages, page, cfg.num_kv_heads * cfg.head_dim)
    zeros = jnp.zeros(shape, cache_dtype(cfg.dtype))
    if sharder.active:
        spec = pool_spec(sharder, shape, cfg.num_kv_heads, cfg.num_heads)
        zeros = jax.lax.with_sharding_constraint(zeros, NamedSharding(sharder.mesh, spec))
    mb = -(-size // page)
    table = sharder.constrain(jnp.full((rows, mb), pages, jnp.int32), ("batch", None))
    return KVCache(zeros, zeros, table, jnp.zeros((rows,), jnp.int32))


def init_cache(
    cfg: ModelConfig, batch: int, size: int, sharder: Sharder | None = None, page: int = 16
) -> KVCache:
    """An empty cache of `size` positions per row where every row owns its pages (a contiguous cache)."""
    d = cache_shards(batch, sharder)
    mb, local = -(-size // page), batch // d
    cache = empty_cache(cfg, batch, size, local * mb, page, sharder)
    table = (jnp.arange(batch) % local)[:, None] * mb + jnp.arange(mb)[None, :]
    return dataclasses.replace(cache, table=table.astype(jnp.int32))


def by_shard(x: Array, d: int) -> Array:
    """[B, ...] -> [X, B / X, ...]: the rows of each shard (rows are split over the shards in order)."""
    return x.reshape((d, x.shape[0] // d) + x.shape[1:])


def write_positions(buf: Array, layer, table: Array, positions: Array, values: Array) -> Array:
    """Writes values [B, T, K, H] (storage type) at positions [B, T] of each row into layer `layer` of a
    pool [X, L, A, page, K H] through the page table [B, MB]; a negative position, one past the table or
    one whose page is P writes nothing."""
    d, pages, page = buf.shape[0], buf.shape[2], buf.shape[3]
    mb = table.shape[1]
    ok = (positions >= 0) & (positions < mb * page)
    blk = jnp.take_along_axis(table, jnp.clip(positions // page, 0, mb - 1), axis=1)
    blk = jnp.where(ok, blk, pages)

    def one(b, blk, off, val):  # b [L, A, page, K H]; blk, off [B/X, T]; val [B/X, T, K H]
        return b.at[layer, blk, off].set(val, mode="drop")

    rows = values.reshape(values.shape[:2] + (-1,))  # [B, T, K H]: a position's keys, one row
    return jax.vmap(one)(buf, by_shard(blk, d), by_shard(positions % page, d), by_shard(rows, d))


def write_pages(buf: Array, layer, ids: Array, values: Array) -> Array:
    """Writes whole pages values [X, M, page, K, H] (storage type) into pages ids [X, M] of each shard of
    layer `layer` of a pool [X, L, A, page, K H]; an id of A writes nothing."""

    def one(b, ids, val):  # b [L, A, page, K H]; ids [M]; val [M, page, K H]
        return b.at[layer, ids].set(val, mode="drop")

    return jax.vmap(one)(buf, ids, values.reshape(values.shape[:3] + (-1,)))


def read_positions(buf: Array, layer, table: Array, kv_heads: int) -> Array:
    """[B, MB page, K, H]: layer `layer` of a pool [X, L, A, page, K H] read through each row's page
    table [B, MB] (storage type; positions without a page hold some page's values, which callers mask)."""
    d, pages, page, kh = buf.shape[0], buf.shape[2], buf.shape[3], buf.shape[4]
    g = jax.vmap(lambda b, t: b[layer][jnp.clip(t, 0, pages - 1)])(buf, by_shard(table, d))
    # [X, B/X, MB, page, K H] -> [B, S, K, H]: one copy (the gather's) per layer.
    return g.reshape(table.shape[0], table.shape[1] * page, kv_heads, kh // kv_heads)
