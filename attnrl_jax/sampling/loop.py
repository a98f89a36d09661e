"""The device-side generation loop: prefill shared prefixes once into a paged KV cache, decode the rows in
a fixed number of slots with continuous batching, and accumulate each response's FCI while decoding.

Rows and sources. `src_tokens` [R, P] holds the prefixes to prefill (right-padded, `src_lens` valid
tokens); every generated row b continues source `row_src[b]` after its first `row_prefix_len[b]` tokens.
An initial response is a row whose prefix is its prompt; a tree continuation is a row whose prefix is the
prompt plus the response's first o tokens. Several rows may share a source, and a continuation at a shorter
offset reads the same prefilled cache (the cache of a prefix is a prefix of the cache), so each response is
prefilled once for all of its branch points. Initial and continuation rows mix freely in one call (the
one-step off-policy pipeline of docs/algorithm.md section 10).

Paged cache. Keys and values live in pages of `settings.page_size` positions in a pool
(`model.kv_cache.KVCache`), and each slot has a page table. A source's prefix is written once into pages
that all of its rows' tables name (a continuation reads its response's prefix, it does not copy it); a row
gets its own copy of the page its prefix ends in, and a fresh page whenever it crosses a page boundary
while decoding, so a row holds the pages it has written. Pages are counted by reference and freed when
their last row ends; a row enters only if the pages it may still need are free (`sampling.pages`), so
decoding never waits for a page. Under a mesh the pool is split over the batch axes: shard d takes the
sources j with j mod X = d and decodes their rows in its own slots over its own pages, so every page a row
reads is on its device.

Slots. The rows decode in `slots` slots (split over the shards). Two nested `jax.lax.while_loop`s
alternate: an insertion prefills, in every shard whose next group of sources fits (rows in free slots,
pages in free pages), that group (rows are taken source by source, in source order), and sets up each of
their rows in a free slot; decode steps then run until some shard's next group fits (or every row has
ended). A finished row's outputs are copied to its place in the result when its slot is reused, or at the
end. With as many slots and pages as the rows need, one insertion takes everything: static batching.

RNG. Row b draws its t-th token with fold_in(row_keys[b], t), so a row's tokens depend only on its key,
prefix and the weights, not on the batch, slot, shard or pages it is in (shared-prefix and re-prefilled
continuations agree, and continuous batching gives the static result).

FCI while decoding (section 5.2, for rows with `row_fci`): feeding response token i computes its attention
row over the cache, which the model reduces to the mass paid to each key step. The mass of the current
query step a is summed; when the step closes (right after a separator token, or at the row's last token)
it is divided by |U_a| |U_c| and added to the FCI sums of every key step c <= a - Delta. The state is
[Y, layers, heads, C] (plus the key step of every cache position) per FCI slot: only the first
`fci_slots` slots of each shard carry it, rows with `row_fci` decode in those, and the attention mass is
computed for them alone (tree continuations, which need no FCI, take the other slots). Steps numbered
C - 1 or more share the last bucket (counted in `step_overflow`).
Y = 2 segmentations are tracked side by side when `separators` is [V, 2] ("\\n\\n" and the "\\n"
fallback of section 4): a row uses the "\\n\\n" one if it has such a separator, else the "\\n" one.
A response with neither (every token its own step in section 4) is flagged `needs_fallback`.
At the end the sums are maximised over layers and heads and the zeroing rules applied.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from attnrl_jax.fci import FciState, accumulate, key_steps_after
from attnrl_jax.fci import finish as fci_finish
from attnrl_jax.fci import start_rows as fci_start_rows
from attnrl_jax.mesh import Sharder
from attnrl_jax.model.cached import forward_cached, prefill_into_pages
from attnrl_jax.model.config import ModelConfig
from attnrl_jax.model.forward import logits_from_hidden
from attnrl_jax.model.kv_cache import KVCache, cache_shards, empty_cache
from attnrl_jax.sampling.pages import add_refs, available, pages_spanned, take_free
from attnrl_jax.sampling.sampling import SamplingParams, sample_tokens
from attnrl_jax.typing import Array, Params

EOS, LENGTH = 1, 2  # finish reasons (0: still running)


@dataclasses.dataclass(frozen=True)
class LoopSettings:
    """Static settings of one compiled loop (hashable).

    Attributes:
      max_new_tokens: tokens sampled per row at most.
      sampling: temperature / top-k / top-p.
      num_steps: C, FCI buckets per row (step 0 is the prompt).
      delta: the FCI step gap Delta.
      pad_id: written after a row finishes.
      page_size: positions per page of the KV cache (the unit in which rows share prefixes and take
        memory; the decode kernel's tile: a power of two of at least 16 for the GPU form, a multiple of 16
        for the TPU form).
    """

    max_new_tokens: int
    sampling: SamplingParams = SamplingParams()
    num_steps: int = 64
    delta: int = 4
    pad_id: int = 0
    page_size: int = 64

    def __post_init__(self):
        if self.max_new_tokens < 1 or self.num_steps < 2 or self.delta < 1 or self.page_size < 1:
            raise ValueError(
                f"need max_new_tokens >= 1, num_steps >= 2, delta >= 1, page_size >= 1; got {self}"
            )


def check_page_size(key: str, page: int) -> None:
    """A KV page is the decode kernel's tile: a power of two of at least 16 positions serves both of its
    compiled forms (Triton's dots need 16 rows and power-of-two shapes, the TPU's bfloat16 tiles 16)."""
    if not isinstance(page, int) or page < 16 or page & (page - 1):
        raise ValueError(f"{key} must be a power of two of at least 16 positions, got {page!r}")


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=[
        "cache",
        "refs",
        "reserve",
        "cur_token",
        "n_gen",
        "done",
        "fed_final",
        "reason",
        "tokens",
        "logprobs",
        "entropies",
        "f",
    ],
    meta_fields=[],
)
@dataclasses.dataclass(frozen=True)
class LoopState:
    """Decode state of the n slots."""

    cache: KVCache  # the page pool, each slot's page table and length
    refs: Array  # [X, A] slots whose page table names each page (0: free)
    reserve: Array  # [n] pages each slot's row may still take (its worst case less what it took)
    cur_token: Array  # [n] the last sampled token, fed next
    n_gen: Array  # [n] tokens sampled so far
    done: Array  # [n] the last token has been sampled
    fed_final: Array  # [n] ... and fed (its attention row counted): the row is finished
    reason: Array  # [n] EOS / LENGTH
    tokens: Array  # [n, M]
    logprobs: Array  # [n, M] float32
    entropies: Array  # [n, M] float32
    f: FciState  # the FCI slots' state


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["row", "key", "fci", "stop", "limit", "prefix"],
    meta_fields=[],
)
@dataclasses.dataclass(frozen=True)
class Slots:
    """Which row each decode slot holds (-1: free) and that row's settings."""

    row: Array  # [n] index into the ordered rows, -1 for a free slot
    key: Array  # [n, 2] uint32 key data of the row's PRNG stream
    fci: Array  # [n] bool, accumulate FCI
    stop: Array  # [n, K] stop token ids
    limit: Array  # [n] tokens the row may sample
    prefix: Array  # [n] prefix length (cache positions before the first sampled token)


def default_pages(slots: int, cache_size: int, page: int, shards: int) -> int:
    """Pages per shard that hold every slot's rows at their longest (`cache_size` positions each): what a
    call without a page budget gets."""
    return slots // shards * -(-cache_size // page)


@dataclasses.dataclass(frozen=True)
class Layout:
    """The static sizes of one compiled call (hashable; `Layout.of` derives them from `generate`'s
    arguments). Per shard d of the X shards: `per_shard` slots (d nl .. (d + 1) nl - 1), the first
    `fci_per_shard` of them FCI slots, `pages` pages, up to `group` sources and `rows_in` rows entering per
    insertion. From `generate`'s static arguments:

    slots: decode slots (None or >= B: B), split over the pool's shards.
    cache_size: positions a row can address (rounded up to pages), at least P and every row's prefix
      plus limit (None: P + max_new_tokens).
    insert_sources: sources prefilled per insertion, over all shards (None: all R, one insertion when
      they fit).
    insert_rows: rows set up per insertion at most, over all shards (None: `slots`).
    pages: pages per shard (None: `default_pages`, every slot at `cache_size`).
    shards: how many ways the slots and the page pool are split: 1, or the mesh's batch split
      (`model.kv_cache.cache_shards`; None: the latter where it divides the slots). Every source's
      rows must fit one shard's slots and pages (the host checks it, `Sampler.plan`: a source that does
      not is never inserted and its rows come back empty, length 0).
    fci_slots: slots that carry FCI state, over all shards (the first of each shard's; None: all). Rows
      with row_fci decode only in them, the other rows in the others first; the attention mass is
      computed for these slots alone. A shard must have as many as one of its sources has FCI rows.
    rows_per_shard: the rows come in X blocks of this many (B = X rows_per_shard), block d holding, in
      queue order, the rows of the sources shard d decodes (source j with j mod X = d, in increasing j;
      a source's rows contiguous) and padding rows (row_src < 0) after them (`sampler.block_layout`
      arranges them so). The outputs then come back in that layout with their rows split over the
      batch axes: each device writes and holds only its own rows, where the default (None: rows in
      any order) gathers every row's outputs into one array that every device holds.
    """

    cfg: ModelConfig
    settings: LoopSettings
    sharder: Sharder
    key_impl: object  # the rows' PRNG implementation
    rows: int  # B
    sources: int  # R
    slots: int  # n
    shards: int  # D
    size: int  # positions a row can address (whole pages)
    pages: int  # pages per shard
    fci_per_shard: int
    group: int
    rows_in: int
    prefix_pages: int  # pages of a (padded) prefix
    segs: int  # segmentations tracked (R of the FCI state)
    rows_per_shard: int | None  # the callers' block layout (`generate`), or None

    @classmethod
    def of(
        cls,
        cfg,
        settings,
        sharder,
        key_impl,
        b,
        r,
        p,
        segs,
        slots,
        cache_size,
        insert_sources,
        insert_rows,
        pages,
        shards,
        fci_slots,
        rows_per_shard,
    ) -> Layout:
        page, m = settings.page_size, settings.max_new_tokens
        n = b if slots is None else max(1, min(slots, b))
        size = p + m if cache_size is None else cache_size
        if size < p:
            raise ValueError(f"cache_size {size} is shorter than the {p}-token prefixes")
        d = cache_shards(n, sharder, shards)
        nl, size = n // d, -(-size // page) * page
        if rows_per_shard is not None and rows_per_shard * d != b:
            raise ValueError(f"{b} rows are not {d} blocks of rows_per_shard={rows_per_shard}")
        pages = default_pages(n, size, page, d) if pages is None else pages
        fl = nl if fci_slots is None else max(0, min(-(-fci_slots // d), nl))
        g = -(-r // d) if insert_sources is None else -(-max(1, min(insert_sources, r)) // d)
        w = nl if insert_rows is None else max(1, min(-(-insert_rows // d), nl))
        sizes = (b, r, n, d, size, pages, fl, g, w, -(-p // page), segs, rows_per_shard)  # the fields' order
        return cls(cfg, settings, sharder, key_impl, *sizes)

    @property
    def per_shard(self) -> int:
        return self.slots // self.shards

    @property
    def table_width(self) -> int:
        """Pages a row's table names at most (MB)."""
        return self.size // self.settings.page_size

    @property
    def fci_rows(self) -> int:
        """J: the FCI slots over all shards."""
        return self.shards * self.fci_per_shard

    def fci_slot(self) -> Array:
        """[J] the slot of each FCI slot (the first `fci_per_shard` of each shard's)."""
        nl, fl = self.per_shard, self.fci_per_shard
        return (jnp.arange(self.shards)[:, None] * nl + jnp.arange(fl)[None, :]).reshape(-1)

    def fci_of(self) -> Array:
        """[n] each slot's index among the FCI slots (J: none), the inverse of `fci_slot`, by arithmetic:
        as a scatter of arange into fci_slot it is one whose indices and updates are the same iota on a
        single shard, which libtpu's scatter fusion aborts on ("Check failed: operand_indices.size() ==
        1")."""
        nl, fl = self.per_shard, self.fci_per_shard
        local = jnp.arange(self.slots) % nl
        return jnp.where(local < fl, jnp.arange(self.slots) // nl * fl + local, self.fci_rows).astype(
            jnp.int32
        )

    def split(self, x: Array, axis: int = 0) -> Array:
        """x with its axis `axis` (slots, FCI slots or block-laid-out rows) split over the batch axes like
        the shards: each device holds its own slots' state (and rows' outputs)."""
        if self.shards == 1:
            return x
        return self.sharder.constrain(x, (None,) * axis + ("batch",) + (None,) * (x.ndim - axis - 1))

    def pin(self, s: LoopState) -> LoopState:
        """The per-slot state that grows with the slots, split like them (tokens and log-probs [n, M], the
        FCI sums [L, J, N, Y, C] and key steps [J, Y, S])."""
        split = self.split
        f = dataclasses.replace(
            s.f, key_steps=split(s.f.key_steps), cur_mass=split(s.f.cur_mass, 1), fci=split(s.f.fci, 1)
        )
        return dataclasses.replace(
            s, tokens=split(s.tokens), logprobs=split(s.logprobs), entropies=split(s.entropies), f=f
        )


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=[
        "queue",
        "q_beg",
        "q_end",
        "order",
        "row_beg",
        "src_rows",
        "src_fci_rows",
        "shared",
        "need",
        "prefix",
        "fci",
        "key",
        "stop",
        "limit",
        "worst",
        "src_tokens",
        "src_lens",
        "separators",
        "think_id",
    ],
    meta_fields=[],
)
@dataclasses.dataclass(frozen=True)
class Queue:
    """What enters when, computed once per call. Sources in queue order: shard d's are j = d, d + X, ...
    (the used ones; later ones are bucket padding), at queue positions [q_beg[d], q_end[d]). Rows ("ordered
    rows") in queue order of their sources, a source's rows contiguous: [row_beg[q], row_beg[q] +
    src_rows[q]) for queue position q."""

    queue: Array  # [R] queue position -> source
    q_beg: Array  # [X]
    q_end: Array  # [X]
    order: Array  # [B] ordered row -> the caller's row
    row_beg: Array  # [R] per queue position: its first ordered row,
    src_rows: Array  # [R] ... its rows,
    src_fci_rows: Array  # [R] ... those of them with FCI,
    shared: Array  # [R] ... the pages its rows share (every full page of the longest prefix they read),
    need: Array  # [R] ... and the pages it needs to enter (those plus each row's worst case)
    prefix: Array  # [B] per ordered row: its prefix length,
    fci: Array  # [B] ... whether it tracks FCI,
    key: Array  # [B, 2] ... its PRNG key data,
    stop: Array  # [B, K] ... stop ids,
    limit: Array  # [B] ... tokens it may sample,
    worst: Array  # [B] ... and the pages it may take while decoding at most
    src_tokens: Array  # [R, prefix_pages page] the prefixes, padded to whole pages
    src_lens: Array  # [R]
    separators: Array  # [V, segs]
    think_id: Array  # scalar


def make_queue(
    lay: Layout,
    src_tokens,
    src_lens,
    row_src,
    row_prefix_len,
    row_keys,
    row_fci,
    stop_ids,
    row_max_new,
    separators,
    think_id,
) -> Queue:
    """The queue of `generate`'s sources and rows (arguments as there)."""
    b, r, d, page, m = lay.rows, lay.sources, lay.shards, lay.settings.page_size, lay.settings.max_new_tokens
    limit = jnp.full((b,), m, jnp.int32) if row_max_new is None else jnp.clip(row_max_new, 1, m)
    used = jnp.max(row_src) + 1
    j = jnp.arange(r)
    queue = jnp.argsort(jnp.where(j < used, (j % d) * r + j, d * r + j))
    per_shard = jnp.sum((j[None, :] < used) & (j[None, :] % d == jnp.arange(d)[:, None]), axis=1)
    q_end = jnp.cumsum(per_shard)
    row_q = jnp.where(row_src >= 0, jnp.argsort(queue)[jnp.maximum(row_src, 0)], r)
    # In the block layout the rows are already in queue order, block by block (padding rows inside).
    order = jnp.argsort(row_q, stable=True) if lay.rows_per_shard is None else jnp.arange(b)
    o_q, o_prefix, o_fci = row_q[order], row_prefix_len[order].astype(jnp.int32), row_fci[order]
    o_limit = limit.astype(jnp.int32)[order]
    o_worst = jnp.where(o_q < r, pages_spanned(o_prefix, o_limit, page), 0)

    def per_source(reduce, x):  # a segment reduction over each queue position's rows (padding: r)
        return reduce(x, o_q, num_segments=r + 1)[:r]

    # Padding rows (o_q = r) may sit between blocks, so these are segment reductions, not a search.
    src_rows = per_source(jax.ops.segment_sum, jnp.ones((b,), jnp.int32))
    first_row = per_source(jax.ops.segment_min, jnp.arange(b, dtype=jnp.int32))
    shared = jnp.maximum(per_source(jax.ops.segment_max, o_prefix), 0) // page
    pad = lay.prefix_pages * page - src_tokens.shape[1]
    return Queue(
        queue=queue,
        q_beg=(q_end - per_shard).astype(jnp.int32),
        q_end=q_end,
        order=order,
        row_beg=jnp.where(src_rows > 0, first_row, 0).astype(jnp.int32),
        src_rows=src_rows,
        src_fci_rows=per_source(jax.ops.segment_sum, o_fci.astype(jnp.int32)),
        shared=shared,
        need=shared + per_source(jax.ops.segment_sum, o_worst),
        prefix=o_prefix,
        fci=o_fci,
        key=jax.random.key_data(row_keys)[order],
        stop=stop_ids[order],
        limit=o_limit,
        worst=o_worst,
        src_tokens=jnp.pad(src_tokens, ((0, 0), (0, pad)), constant_values=lay.settings.pad_id),
        src_lens=src_lens,
        separators=separators[:, None] if separators.ndim == 1 else separators,
        think_id=think_id,
    )


def init_state(lay: Layout, q: Queue) -> tuple[LoopState, Slots]:
    """Every slot free (counted as finished) and every page free."""
    n, m, c, pad = lay.slots, lay.settings.max_new_tokens, lay.settings.num_steps, lay.settings.pad_id
    cfg, page = lay.cfg, lay.settings.page_size
    state = LoopState(
        cache=empty_cache(cfg, n, lay.size, lay.pages, page, lay.sharder, lay.shards),
        refs=jnp.zeros((lay.shards, lay.pages), jnp.int32),
        reserve=jnp.zeros((n,), jnp.int32),
        cur_token=jnp.zeros((n,), jnp.int32),
        n_gen=jnp.zeros((n,), jnp.int32),
        done=jnp.ones((n,), bool),
        fed_final=jnp.ones((n,), bool),  # free slots count as finished
        reason=jnp.zeros((n,), jnp.int32),
        tokens=jnp.full((n, m), pad, jnp.int32),
        logprobs=jnp.zeros((n, m), jnp.float32),
        entropies=jnp.zeros((n, m), jnp.float32),
        f=FciState.empty(lay.fci_rows, lay.segs, lay.size, c, cfg.num_layers, cfg.num_heads),
    )
    free = Slots(
        row=jnp.full((n,), -1, jnp.int32),
        key=jnp.zeros((n,) + q.key.shape[1:], q.key.dtype),
        fci=jnp.zeros((n,), bool),
        stop=jnp.full((n, q.stop.shape[1]), -1, q.stop.dtype),
        limit=jnp.ones((n,), jnp.int32),
        prefix=jnp.ones((n,), jnp.int32),
    )
    return lay.pin(state), free


def slot_results(lay: Layout, s: LoopState, sl: Slots) -> dict[str, Array]:
    """Each slot's finished row as the caller sees it ([n, ...] per output of `generate`); the FCI outputs
    come from the slot's FCI state for rows that track FCI, and are empty (0, -1) for the others."""
    n, nf = lay.slots, lay.fci_rows
    out = {
        "tokens": s.tokens,
        "logprobs": s.logprobs,
        "entropies": s.entropies,
        "lengths": s.n_gen,
        "finish_reason": s.reason,
    }
    if nf == 0:
        zero = jnp.zeros((n,), jnp.int32)
        return out | {
            "fci": jnp.zeros((n, lay.settings.num_steps), jnp.float32),
            "think_step": zero - 1,
            "step_ids": jnp.full((n, lay.settings.max_new_tokens), -1, jnp.int32),
            "num_steps": zero,
            "step_overflow": zero,
            "needs_fallback": jnp.zeros((n,), bool),
        }
    fci_slot, fci_of = lay.fci_slot(), lay.fci_of()
    res = fci_finish(s.f, sl.prefix[fci_slot], s.n_gen[fci_slot], lay.settings.max_new_tokens)
    has = (fci_of < nf) & sl.fci  # the slot tracks FCI for its row
    i = jnp.minimum(fci_of, nf - 1)
    empty = {"fci": 0.0, "think_step": -1, "step_ids": -1, "num_steps": 0, "step_overflow": 0}
    empty["needs_fallback"] = False
    return out | {
        k: jnp.where(has.reshape((n,) + (1,) * (v.ndim - 1)), v[i], empty[k]) for k, v in res.items()
    }


def empty_outputs(lay: Layout, s: LoopState, sl: Slots) -> dict[str, Array]:
    """The outputs before any row finished: padding tokens, -1 step ids, zeros."""
    shapes = jax.eval_shape(lambda: slot_results(lay, s, sl))
    pad = lay.settings.pad_id
    out = {
        k: jnp.full(
            (lay.rows,) + v.shape[1:], pad if k == "tokens" else (-1 if k == "step_ids" else 0), v.dtype
        )
        for k, v in shapes.items()
    }
    return {k: lay.split(v) for k, v in out.items()} if lay.rows_per_shard is not None else out


def plan(lay: Layout, q: Queue, s: LoopState, nxt: Array):
    """Per shard ([X] each, nxt: its next queue position): whether its next group enters now, how many
    sources and rows it brings. The group is the longest run of sources from nxt (up to `group`) whose rows
    fit the shard's idle slots (FCI rows its idle FCI slots) and `rows_in`, and whose pages fit its
    available pages; it enters when it is whole, or when every slot of the shard is idle."""
    d, nl, g, r = lay.shards, lay.per_shard, lay.group, lay.sources
    idle = s.fed_final.reshape(d, nl)  # free or finished (harvested first)
    idle_fci = jnp.sum(idle[:, : lay.fci_per_shard], axis=1)
    avail = available(s.refs, jnp.where(s.fed_final, 0, s.reserve))
    qs = nxt[:, None] + jnp.arange(g)  # [X, Q]
    inside = qs < q.q_end[:, None]
    qc = jnp.minimum(qs, r - 1)

    def running(x):
        return jnp.cumsum(jnp.where(inside, x[qc], 0), axis=1)

    rows, fci_rows, pgs = running(q.src_rows), running(q.src_fci_rows), running(q.need)
    fits = inside & (rows <= jnp.minimum(idle.sum(axis=1), lay.rows_in)[:, None]) & (pgs <= avail[:, None])
    fits &= fci_rows <= idle_fci[:, None]  # FCI rows take FCI slots; the others any slot
    count = jnp.sum(fits, axis=1)  # the group's sources are a prefix of it: sums only grow
    rows_in = jnp.where(count > 0, jnp.take_along_axis(rows, jnp.maximum(count - 1, 0)[:, None], 1)[:, 0], 0)
    whole = count == jnp.minimum(g, q.q_end - nxt)
    go = (nxt < q.q_end) & (count > 0) & (whole | jnp.all(idle, axis=1))
    return go, jnp.where(go, count, 0), jnp.where(go, rows_in, 0)


def harvest(lay: Layout, s: LoopState, sl: Slots, out: dict) -> tuple[Slots, dict]:
    """Copies each finished row's outputs to its place in the result and frees its slot."""
    n, b, d, nl = lay.slots, lay.rows, lay.shards, lay.per_shard
    fin = s.fed_final & (sl.row >= 0)
    res = slot_results(lay, s, sl)
    if lay.rows_per_shard is not None:  # shard d's slots write its own block of rows, on its own device
        rps = lay.rows_per_shard
        local = jnp.where(fin, sl.row - jnp.arange(n) // nl * rps, rps)

        def write(o, v):
            o, v = o.reshape((d, rps) + o.shape[1:]), v.reshape((d, nl) + v.shape[1:])
            o = jax.vmap(lambda a, i, x: a.at[i].set(x, mode="drop"))(o, local.reshape(d, nl), v)
            return lay.split(o.reshape((b,) + o.shape[2:]))

        out = {k: write(out[k], res[k]) for k in out}
    else:
        dest = jnp.where(fin, sl.row, b)
        out = {k: out[k].at[dest].set(res[k], mode="drop") for k in out}
    return dataclasses.replace(sl, row=jnp.where(fin, -1, sl.row)), out


def _take(x: Array, idx: Array) -> Array:
    """x[d, idx[d, ...]] per shard (x [X, Q, ...], idx [X, ...] int)."""
    return jax.vmap(lambda a, i: a[i])(x, idx)


class Entry(NamedTuple):
    """One insertion's entering sources and rows, per shard: queue positions qs [X, Q] (src_in: entering),
    and rows [X, W] (row_ok: entering; cand: the ordered row; gi: its source's index in the group; prefix,
    and full / own: its prefix's whole pages and whether it takes a copy of the page its prefix ends in)."""

    qs: Array
    src_in: Array
    row_ok: Array
    cand: Array
    gi: Array
    prefix: Array
    full: Array
    own: Array


def entering(lay: Layout, q: Queue, nxt: Array, count: Array, rows_in: Array) -> Entry:
    """Queue positions nxt .. nxt + count - 1 of each shard enter; the i-th row entering shard d is row
    i - first of source gi of its group."""
    g, w, b, page = lay.group, lay.rows_in, lay.rows, lay.settings.page_size
    qs = jnp.minimum(nxt[:, None] + jnp.arange(g), lay.sources - 1)  # [X, Q]
    src_in = jnp.arange(g)[None, :] < count[:, None]
    rr = jnp.arange(w)
    row_ok = rr[None, :] < rows_in[:, None]  # [X, W]
    counts = jnp.where(src_in, q.src_rows[qs], 0)
    ends = jnp.cumsum(counts, axis=1)
    gi = jnp.minimum(jax.vmap(lambda e: jnp.searchsorted(e, rr, side="right"))(ends), g - 1)
    cand = _take(q.row_beg[qs], gi) + rr - _take(ends - counts, gi)
    cand = jnp.where(row_ok, jnp.minimum(cand, b - 1), 0)  # [X, W] ordered rows
    prefix = q.prefix[cand]
    return Entry(qs, src_in, row_ok, cand, gi, prefix, prefix // page, row_ok & (prefix % page != 0))


def take_pages(lay: Layout, q: Queue, refs: Array, e: Entry):
    """The entering rows' pages: each source's shared ones first, then each row's copy of the page its
    prefix ends in. Returns (page ids [X, Q mpg + W] with the source and start position each is written
    from, the rows' page tables [X, W, MB], the reference counts with them)."""
    d, g, mpg, page, mb = lay.shards, lay.group, lay.prefix_pages, lay.settings.page_size, lay.table_width
    n_shared = jnp.where(e.src_in, q.shared[e.qs], 0)
    blk = jnp.arange(mpg)
    ranks = jnp.concatenate(
        [
            ((jnp.cumsum(n_shared, axis=1) - n_shared)[..., None] + blk).reshape(d, g * mpg),
            n_shared.sum(axis=1, keepdims=True) + jnp.cumsum(e.own, axis=1) - e.own,
        ],
        axis=1,
    )
    want = jnp.concatenate([(blk < n_shared[..., None]).reshape(d, g * mpg), e.own], axis=1)
    ids = take_free(refs, ranks, want)  # [X, Q mpg + W]
    src_pages, own_page = ids[:, : g * mpg].reshape(d, g, mpg), ids[:, g * mpg :]
    col = jnp.arange(mb)
    table = _take(src_pages, e.gi)[..., jnp.minimum(col, mpg - 1)]  # [X, W, MB]
    full = e.full[..., None]
    table = jnp.where(col < full, table, jnp.where(col == full, own_page[..., None], lay.pages))
    table = jnp.where(e.row_ok[..., None], table, lay.pages)
    page_src = jnp.concatenate([jnp.broadcast_to(jnp.repeat(jnp.arange(g), mpg), (d, g * mpg)), e.gi], 1)
    page_start = jnp.concatenate([jnp.broadcast_to(jnp.tile(blk * page, g), (d, g * mpg)), e.full * page], 1)
    return (ids, page_src, page_start), table, add_refs(refs, table, 1)  # shared pages no row reads: free


def free_slots_for(lay: Layout, q: Queue, sl: Slots, e: Entry) -> Array:
    """The slot [X W] (n: none) of each entering row: FCI rows take the shard's free FCI slots in index
    order; the other rows its other free slots first, then the FCI slots the FCI rows leave."""
    d, nl, n = lay.shards, lay.per_shard, lay.slots
    free = sl.row.reshape(d, nl) < 0
    free_fci = free & (jnp.arange(nl) < lay.fci_per_shard)
    is_fci = e.row_ok & q.fci[e.cand]
    rest = e.row_ok & ~is_fci
    spare = free_fci & (jnp.cumsum(free_fci, axis=1) > is_fci.sum(axis=1, keepdims=True))
    slot = jnp.arange(nl)
    by_fci = jnp.argsort(jnp.where(free_fci, slot, nl + slot), axis=1)
    by_rest = jnp.argsort(
        jnp.where(free & ~free_fci, slot, jnp.where(spare, nl + slot, 2 * nl + slot)), axis=1
    )
    local = jnp.where(
        is_fci,
        jnp.take_along_axis(by_fci, jnp.cumsum(is_fci, axis=1) - is_fci, axis=1),
        jnp.take_along_axis(by_rest, jnp.cumsum(rest, axis=1) - rest, axis=1),
    )
    return jnp.where(e.row_ok, local + jnp.arange(d)[:, None] * nl, n).reshape(-1)


def _is_stop(tok: Array, stop: Array) -> Array:
    return jnp.any(tok[:, None] == stop, axis=1)


def sample_next(lay: Layout, params: Params, h: Array, keys: Array, n_gen: Array):
    """Token n_gen[b] of each row from its hidden state h [B, 1, D]: drawn with fold_in(key, n_gen), so a
    row's tokens depend only on its key, prefix and the weights. Returns (tokens, log-probs, entropies)."""
    logits = logits_from_hidden(params, h, cfg=lay.cfg, sharder=lay.sharder)[:, 0]
    keys = jax.random.wrap_key_data(keys, impl=lay.key_impl)
    return sample_tokens(logits, jax.vmap(jax.random.fold_in)(keys, n_gen), lay.settings.sampling)


def insert(lay: Layout, params: Params, q: Queue, carry):
    """An insertion: harvest finished rows, prefill each shard's entering sources into fresh pages, set
    up their rows in free slots and sample each row's first token."""
    s, sl, out, nxt = carry
    _, count, rows_in = plan(lay, q, s, nxt)
    sl, out = harvest(lay, s, sl, out)
    e = entering(lay, q, nxt, count, rows_in)
    d, g, mpg, page = lay.shards, lay.group, lay.prefix_pages, lay.settings.page_size
    (ids, page_src, page_start), table, refs = take_pages(lay, q, s.refs, e)
    js = q.queue[e.qs]
    valid = jnp.arange(mpg * page) < jnp.where(e.src_in, q.src_lens[js], 0)[..., None]
    h, cache = prefill_into_pages(
        params,
        q.src_tokens[js.reshape(-1)],
        valid.reshape(d * g, -1),
        s.cache,
        ids,
        page_src,
        page_start,
        cfg=lay.cfg,
        sharder=lay.sharder,
    )
    h_row = jax.vmap(lambda hs, i, t: hs[i, t])(h.reshape((d, g) + h.shape[1:]), e.gi, e.prefix - 1)
    cand, prefix = e.cand.reshape(-1), e.prefix.reshape(-1)
    nw = cand.shape[0]
    tok, lp, ent = sample_next(
        lay, params, h_row.reshape(nw, 1, -1), q.key[cand], jnp.zeros((nw,), jnp.int32)
    )
    dest = free_slots_for(lay, q, sl, e)
    s = start_rows(lay, q, s, dest, cand, prefix, e.own.reshape(-1), tok, lp, ent)
    cache = KVCache(
        cache.k, cache.v, _put(cache.table, dest, table.reshape(nw, -1)), _put(cache.lengths, dest, prefix)
    )
    s = dataclasses.replace(s, cache=cache, refs=refs)
    sl = Slots(
        row=_put(sl.row, dest, cand),
        key=_put(sl.key, dest, q.key[cand]),
        fci=_put(sl.fci, dest, q.fci[cand]),
        stop=_put(sl.stop, dest, q.stop[cand]),
        limit=_put(sl.limit, dest, q.limit[cand]),
        prefix=_put(sl.prefix, dest, prefix),
    )
    return lay.pin(s), sl, out, nxt + count


def _put(x: Array, dest: Array, v) -> Array:
    return x.at[dest].set(v, mode="drop")


def start_rows(lay: Layout, q: Queue, s: LoopState, dest, cand, prefix, own, tok, lp, ent) -> LoopState:
    """The decode state of the rows cand [W] entering slots dest [W] (n: none) with their first token."""
    m, nw = lay.settings.max_new_tokens, cand.shape[0]
    stop, lim = _is_stop(tok, q.stop[cand]), q.limit[cand]
    fci_of = lay.fci_of()
    fdest = jnp.where(dest < lay.slots, fci_of[jnp.minimum(dest, lay.slots - 1)], lay.fci_rows)  # J: none

    def put(x, v):
        return _put(x, dest, v)

    return dataclasses.replace(
        s,
        reserve=put(s.reserve, q.worst[cand] - own),
        cur_token=put(s.cur_token, tok),
        n_gen=put(s.n_gen, jnp.ones((nw,), jnp.int32)),
        done=put(s.done, stop | (lim == 1)),
        fed_final=put(s.fed_final, jnp.zeros((nw,), bool)),
        reason=put(s.reason, jnp.where(stop, EOS, jnp.where(lim == 1, LENGTH, 0)).astype(jnp.int32)),
        tokens=put(s.tokens, jnp.full((nw, m), lay.settings.pad_id, jnp.int32).at[:, 0].set(tok)),
        logprobs=put(s.logprobs, jnp.zeros((nw, m), jnp.float32).at[:, 0].set(lp)),
        entropies=put(s.entropies, jnp.zeros((nw, m), jnp.float32).at[:, 0].set(ent)),
        f=fci_start_rows(s.f, fdest, prefix),
    )


def open_pages(lay: Layout, s: LoopState):
    """A row about to write the first position of a page takes a free page of its shard. Returns (the
    cache with them in the tables, the pages taken [X, nl] (A: none), which rows took one [n])."""
    d, nl, page, mb = lay.shards, lay.per_shard, lay.settings.page_size, lay.table_width
    pos = s.cache.lengths
    opening = (~s.fed_final & (pos % page == 0)).reshape(d, nl)
    new_page = take_free(s.refs, jnp.cumsum(opening, axis=1) - opening, opening)  # [X, nl]
    blk = jnp.minimum(pos // page, mb - 1)
    opened = opening.reshape(-1)
    # (a select over the table, rather than a scatter of what a gather of it read)
    opens = opened[:, None] & (jnp.arange(mb)[None, :] == blk[:, None])
    table = jnp.where(opens, new_page.reshape(-1, 1), s.cache.table)
    return dataclasses.replace(s.cache, table=table), new_page, opened


def fci_decode_step(lay: Layout, params: Params, q: Queue, s: LoopState, sl: Slots, cache: KVCache):
    """The model on every slot's last token (appending it to the cache) with FCI accumulation for the FCI
    slots: the fed token's position joins its row's current step, and its attention row's mass per key
    step joins that step's sums (`fci.accumulate`). Returns (hidden states [n, 1, D], cache, FCI state)."""
    nf, active = lay.fci_rows, ~s.fed_final
    fci_slot = lay.fci_slot()
    track = (active & sl.fci)[fci_slot]  # [J]
    key_steps = key_steps_after(s.f, s.cache.lengths[fci_slot], track)
    h, cache, mass = forward_cached(
        params,
        s.cur_token[:, None],
        cache,
        cfg=lay.cfg,
        valid=active[:, None],
        key_steps=key_steps if nf else None,
        num_steps=lay.settings.num_steps,
        sharder=lay.sharder,
    )
    if not nf:
        return h, cache, s.f
    mass = mass[:, :, :, 0]  # [L, J, N, T = 1, Y, C] -> [L, J, N, Y, C]: the sums' layout
    f = accumulate(
        s.f,
        key_steps,
        mass,
        track,
        s.cur_token[fci_slot],
        s.done[fci_slot],
        q.separators,
        q.think_id,
        lay.settings.delta,
    )
    return h, cache, f


def decode(lay: Layout, params: Params, q: Queue, carry):
    """One decode step of every slot: feed the last token, sample the next for rows still generating, and
    end the rows whose last token was fed (their pages go back)."""
    s, sl, out, nxt = carry
    n, m, npages = lay.slots, lay.settings.max_new_tokens, lay.pages
    active = ~s.fed_final
    cache, new_page, opened = open_pages(lay, s)
    h, cache, f = fci_decode_step(lay, params, q, s, sl, cache)
    gen = active & ~s.done
    tok, lp, ent = sample_next(lay, params, h, sl.key, s.n_gen)
    write = jnp.where(gen, s.n_gen, m)  # finished rows write nowhere (dropped)
    n_gen = s.n_gen + gen
    stop = gen & _is_stop(tok, sl.stop)
    hit_len = gen & ~stop & (n_gen >= sl.limit)
    ending = active & s.done
    refs = add_refs(s.refs, new_page, 1)
    refs = add_refs(refs, jnp.where(ending[:, None], cache.table, npages).reshape(lay.shards, -1), -1)
    cache = dataclasses.replace(cache, table=jnp.where(ending[:, None], npages, cache.table))
    slot_ids = jnp.arange(n)
    s = LoopState(
        cache=cache,
        refs=refs,
        reserve=jnp.where(ending, 0, s.reserve - opened),
        cur_token=jnp.where(gen, tok, s.cur_token),
        n_gen=n_gen,
        done=s.done | stop | hit_len,
        fed_final=s.fed_final | ending,
        reason=jnp.where(stop, EOS, jnp.where(hit_len, LENGTH, s.reason)),
        tokens=s.tokens.at[slot_ids, write].set(tok, mode="drop"),
        logprobs=s.logprobs.at[slot_ids, write].set(lp, mode="drop"),
        entropies=s.entropies.at[slot_ids, write].set(ent, mode="drop"),
        f=f,
    )
    return lay.pin(s), sl, out, nxt


def run_loop(lay: Layout, params: Params, q: Queue) -> dict[str, Array]:
    """Insert, decode until some shard's next group fits (or every row ended), insert again: two nested
    loops rather than a `lax.cond` per step, whose branches would each need their own copy of the cache.
    Returns the outputs in ordered-row order."""

    def go(carry):
        return jnp.any(plan(lay, q, carry[0], carry[3])[0])

    def decoding(carry):
        return jnp.any(~carry[0].fed_final) & ~go(carry)

    def insert_then_decode(carry):
        return jax.lax.while_loop(
            decoding, functools.partial(decode, lay, params, q), insert(lay, params, q, carry)
        )

    state, free = init_state(lay, q)
    carry = (state, free, empty_outputs(lay, state, free), q.q_beg)
    s, sl, out, _ = jax.lax.while_loop(go, insert_then_decode, carry)
    return harvest(lay, s, sl, out)[1]


@functools.partial(
    jax.jit,
    static_argnames=(
        "cfg",
        "settings",
        "sharder",
        "slots",
        "cache_size",
        "insert_sources",
        "insert_rows",
        "pages",
        "shards",
        "fci_slots",
        "rows_per_shard",
    ),
)
def generate(
    params: Params,
    src_tokens: Array,
    src_lens: Array,
    row_src: Array,
    row_prefix_len: Array,
    row_keys: Array,
    row_fci: Array,
    stop_ids: Array,
    separators: Array,
    think_id: Array,
    row_max_new: Array | None = None,
    *,
    cfg: ModelConfig,
    settings: LoopSettings,
    sharder: Sharder | None = None,
    slots: int | None = None,
    cache_size: int | None = None,
    insert_sources: int | None = None,
    insert_rows: int | None = None,
    pages: int | None = None,
    shards: int | None = None,
    fci_slots: int | None = None,
    rows_per_shard: int | None = None,
) -> dict[str, Array]:
    """Samples every row to EOS/stop or its length limit (module docstring), `slots` rows at a time.

    Continuous batching: the rows decode in `slots` slots; a source's rows enter together (its prefix is
    prefilled once into shared pages) as soon as enough slots and pages are free, and a finished row's
    slot and pages are reused, so the decode work follows the tokens generated rather than rows x the
    longest row. Up to `insert_sources` sources are prefilled per insertion; the next group waits until
    all of its rows fit (or its shard's slots are all idle). With slots >= rows (the default) and the
    default pages, every row enters at once: static batching. A row's tokens depend only on its key,
    prefix and the weights, so the result does not depend on `slots`, `insert_sources`, `pages` or the
    page size (up to float rounding of the batched matmuls).

    Args:
      params: model parameters.
      src_tokens, src_lens: [R, P] prefixes to prefill and their valid lengths [R].
      row_src, row_prefix_len: [B] source of each row and how many of its tokens the row continues from
        (1 <= row_prefix_len[b] <= src_lens[row_src[b]]); a row with row_src < 0 is padding, never sampled
        (length 0).
      row_keys: [B] PRNG keys (one stream per row).
      row_fci: [B] bool, accumulate FCI for this row (initial responses: prefix = prompt only).
      stop_ids: [B, K] token ids that end each row (-1 pads), EOS included.
      separators: [V] bool, the "\\n\\n" separator table (`algo.SeparatorTable.double_newline`), or
        [V, 2] with the "\\n" table as the fallback segmentation.
      think_id: scalar id of `</think>` (-1 for none).
      row_max_new: [B] tokens each row may sample (clipped to 1..max_new_tokens; None: max_new_tokens).
        docs/algorithm.md section 3: a continuation branched at offset o of a response may add
        max_new_tokens - o tokens, so that the response it completes stays within the length limit; what
        it samples up to there equals the official run's continuation cut after generation.
      cfg, settings, sharder: static model config, loop settings and activation sharding.
      slots, cache_size, insert_sources, insert_rows, pages, shards, fci_slots, rows_per_shard: the
        call's static shape (`Layout`, whose docstring says what each one is).

    Returns:
      dict: tokens [B, M] (pad after the end), logprobs and entropies [B, M] float32, lengths [B] (sampled
      tokens, stop token included), finish_reason [B] (1 eos, 2 length), fci [B, C] float32 (rows with
      row_fci), think_step [B], step_ids [B, M] (1-based step of each response token, -1 after the end),
      num_steps [B], step_overflow [B] (steps merged into the last bucket), needs_fallback [B]; the last
      five for rows with row_fci (-1, 0 or False for the others).
    """
    sizes = (row_src.shape[0], *src_tokens.shape, 1 if separators.ndim == 1 else separators.shape[1])
    knobs = (slots, cache_size, insert_sources, insert_rows, pages, shards, fci_slots, rows_per_shard)
    lay = Layout.of(cfg, settings, sharder or Sharder(), jax.random.key_impl(row_keys), *sizes, *knobs)
    arrays = (src_tokens, src_lens, row_src, row_prefix_len, row_keys, row_fci, stop_ids, row_max_new)
    q = make_queue(lay, *arrays, separators, think_id)
    out = run_loop(lay, params, q)
    if rows_per_shard is not None:
        return out  # the callers' block layout, each device's rows on it
    inv = jnp.argsort(q.order)  # back to the callers' row order
    return {k: v[inv] for k, v in out.items()}
