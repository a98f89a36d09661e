"""The device-side generation loop: prefill shared prefixes once into a paged KV cache, decode the rows in
a fixed number of slots with continuous batching, and accumulate each response's FCI while decoding.

Rows and sources. `src_tokens` [R, P] holds the prefixes to prefill (right-padded, `src_lens` valid
tokens); every generated row b continues source `row_src[b]` after its first `row_prefix_len[b]` tokens.
An initial response is a row whose prefix is its prompt; a tree continuation is a row whose prefix is the
prompt plus the response's first o tokens. Several rows may share a source, and a continuation at a shorter
offset reads the same prefilled cache (the cache of a prefix is a prefix of the cache), so each response is
prefilled once for all of its branch points. Initial and continuation rows mix freely in one call (the
one-step off-policy pipeline of ALGORITHM.md section 10).

Paged cache. Keys and values live in pages of `settings.page_size` positions in a pool
(`model.transformer.KVCache`), and each slot has a page table. A source's prefix is written once into pages
that all of its rows' tables name (a continuation reads its response's prefix, it does not copy it); a row
gets its own copy of the page its prefix ends in, and a fresh page whenever it crosses a page boundary
while decoding, so a row holds the pages it has written. Pages are counted by reference and freed when
their last row ends; a row enters only if the pages it may still need are free (`sampling.pages`), so
decoding never waits for a page. Under a mesh the pool is split over the batch axes: shard d takes the
sources j with j mod D = d and decodes their rows in its own slots over its own pages, so every page a row
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
[R, layers, heads, C] (plus the key step of every cache position) per FCI slot: only the first
`fci_slots` slots of each shard carry it, rows with `row_fci` decode in those, and the attention mass is
computed for them alone (tree continuations, which need no FCI, take the other slots). Steps numbered
C - 1 or more share the last bucket (counted in `step_overflow`).
R = 2 segmentations are tracked side by side when `separators` is [V, 2] ("\\n\\n" and the "\\n"
fallback of section 4): a row uses the "\\n\\n" one if it has such a separator, else the "\\n" one.
A response with neither (every token its own step in section 4) is flagged `needs_fallback`.
At the end the sums are maximised over layers and heads and the zeroing rules applied.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from attnrl_jax.kernels.fci import zero_steps
from attnrl_jax.mesh import Sharder
from attnrl_jax.model.config import ModelConfig
from attnrl_jax.model.transformer import (
    KVCache,
    cache_shards,
    empty_cache,
    forward_cached,
    logits_from_hidden,
    prefill_into_pages,
)
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
        "key_steps",
        "cur_step",
        "cur_len",
        "step_len",
        "cur_mass",
        "fci",
        "think_step",
        "has_sep",
    ],
    meta_fields=[],
)
@dataclasses.dataclass(frozen=True)
class FciState:
    """FCI while decoding, for the slots that track it (the first of each shard's slots, `fci_slots`); a
    leading F axis (one per such slot) and an R axis (one per tracked segmentation)."""

    key_steps: Array  # [F, R, S] step id of each cache position (-1: none)
    cur_step: Array  # [F, R] 1-based step of the next response token
    cur_len: Array  # [F, R] tokens of the current step so far
    step_len: Array  # [F, R, C] tokens per step bucket
    cur_mass: Array  # [L, F, N, R, C] attention mass of the current step to each key step
    fci: Array  # [F, R, L, N, C] FCI sums of closed steps
    think_step: Array  # [F, R] step of the last </think>, or -1
    has_sep: Array  # [F, R] a separator of this segmentation occurred


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
    refs: Array  # [D, P] slots whose page table names each page (0: free)
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


def _results(s: LoopState, sl: Slots, m: int, c: int, fci_slot: Array, fci_of: Array) -> dict[str, Array]:
    """Each slot's finished row as the caller sees it ([n, ...] per output of `generate`); the FCI outputs
    come from the slot's FCI state (fci_of [n]: its index there, F for none; fci_slot [F]: the inverse)
    for rows that track FCI, and are empty (0, -1) for the others."""
    n = s.n_gen.shape[0]
    f = s.f
    nf, nseg, size = f.key_steps.shape
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
            "fci": jnp.zeros((n, c), jnp.float32),
            "think_step": zero - 1,
            "step_ids": jnp.full((n, m), -1, jnp.int32),
            "num_steps": zero,
            "step_overflow": zero,
            "needs_fallback": jnp.zeros((n,), bool),
        }
    # Per row, the "\n\n" segmentation if it has such a separator, else the "\n" fallback if tracked.
    use = jnp.where(f.has_sep[:, 0] | (nseg == 1), 0, 1)

    def pick(x):
        return jnp.take_along_axis(x, use.reshape((nf, 1) + (1,) * (x.ndim - 2)), axis=1)[:, 0]

    offs = sl.prefix[fci_slot][:, None] + jnp.arange(m)[None, :]
    chosen_steps = jnp.take_along_axis(f.key_steps, use[:, None, None], axis=1)[:, 0]  # [F, S]
    step_ids = jnp.take_along_axis(chosen_steps, jnp.minimum(offs, size - 1), axis=1)
    step_ids = jnp.where(jnp.arange(m)[None, :] < s.n_gen[fci_slot][:, None], step_ids, -1)
    think_step = pick(f.think_step)
    cur_step = pick(f.cur_step)
    # [L, F, N, R, C] -> the chosen segmentation's sums, maximised over layers and heads: [F, C] (a
    # select, not a gather: the sums keep their one layout)
    which = (jnp.arange(nseg) == use[:, None])[None, :, None, :, None]
    chosen = jnp.where(which, f.fci, 0.0).sum(axis=3)
    fci = zero_steps(chosen.max(axis=(0, 2)), think_step)
    has = (fci_of < nf) & sl.fci  # the slot tracks FCI for its row
    i = jnp.minimum(fci_of, nf - 1)
    return out | {
        "fci": jnp.where(has[:, None], fci[i], 0.0),
        "think_step": jnp.where(has, think_step[i], -1),
        "step_ids": jnp.where(has[:, None], step_ids[i], -1),
        "num_steps": jnp.where(has, cur_step[i] - 1, 0),
        "step_overflow": jnp.where(has, jnp.maximum(cur_step[i] - 1 - (c - 1), 0), 0),
        "needs_fallback": has & ~jnp.any(f.has_sep, axis=1)[i],
    }


def _take(x: Array, idx: Array) -> Array:
    """x[d, idx[d, ...]] per shard (x [D, G, ...], idx [D, ...] int)."""
    return jax.vmap(lambda a, i: a[i])(x, idx)


def default_pages(slots: int, cache_size: int, page: int, shards: int) -> int:
    """Pages per shard that hold every slot's rows at their longest (`cache_size` positions each): what a
    call without a page budget gets."""
    return slots // shards * -(-cache_size // page)


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
        ALGORITHM.md section 3: a continuation branched at offset o of a response may add
        max_new_tokens - o tokens, so that the response it completes stays within the length limit; what
        it samples up to there equals the official run's continuation cut after generation.
      cfg, settings, sharder: static model config, loop settings and activation sharding.
      slots: decode slots (None or >= B: B), split over the pool's shards.
      cache_size: positions a row can address (rounded up to pages), at least P and every row's prefix
        plus limit (None: P + max_new_tokens).
      insert_sources: sources prefilled per insertion, over all shards (None: all R, one insertion when
        they fit).
      insert_rows: rows set up per insertion at most, over all shards (None: `slots`).
      pages: pages per shard (None: `default_pages`, every slot at `cache_size`).
      shards: how many ways the slots and the page pool are split: 1, or the mesh's batch split
        (`model.transformer.cache_shards`; None: the latter where it divides the slots). Every source's
        rows must fit one shard's slots and pages (the host checks it, `Sampler.plan`: a source that does
        not is never inserted and its rows come back empty, length 0).
      fci_slots: slots that carry FCI state, over all shards (the first of each shard's; None: all). Rows
        with row_fci decode only in them, the other rows in the others first; the attention mass is
        computed for these slots alone. A shard must have as many as one of its sources has FCI rows.
      rows_per_shard: the rows come in D blocks of this many (B = D rows_per_shard), block d holding, in
        queue order, the rows of the sources shard d decodes (source j with j mod D = d, in increasing j;
        a source's rows contiguous) and padding rows (row_src < 0) after them (`sampler.block_layout`
        arranges them so). The outputs then come back in that layout with their rows split over the
        batch axes: each device writes and holds only its own rows, where the default (None: rows in
        any order) gathers every row's outputs into one array that every device holds.

    Returns:
      dict: tokens [B, M] (pad after the end), logprobs and entropies [B, M] float32, lengths [B] (sampled
      tokens, stop token included), finish_reason [B] (1 eos, 2 length), fci [B, C] float32 (rows with
      row_fci), think_step [B], step_ids [B, M] (1-based step of each response token, -1 after the end),
      num_steps [B], step_overflow [B] (steps merged into the last bucket), needs_fallback [B]; the last
      five for rows with row_fci (-1, 0 or False for the others).
    """
    sharder = sharder or Sharder()
    m, c, delta, page = settings.max_new_tokens, settings.num_steps, settings.delta, settings.page_size
    b = row_src.shape[0]
    r, p = src_tokens.shape
    n = b if slots is None else max(1, min(slots, b))
    size = p + m if cache_size is None else cache_size
    if size < p:
        raise ValueError(f"cache_size {size} is shorter than the {p}-token prefixes")
    d = cache_shards(n, sharder, shards)
    nl, mb = n // d, -(-size // page)
    size = mb * page
    npages = default_pages(n, size, page, d) if pages is None else pages
    fl = nl if fci_slots is None else max(0, min(-(-fci_slots // d), nl))  # FCI slots per shard
    nf = d * fl
    fci_slot = (jnp.arange(d)[:, None] * nl + jnp.arange(fl)[None, :]).reshape(-1)  # [F] their slots
    # Each slot's index among the FCI slots (F: none), the inverse of fci_slot, by arithmetic: as a scatter
    # of arange into fci_slot it is one whose indices and updates are the same iota on a single shard,
    # which libtpu's scatter fusion aborts on ("Check failed: operand_indices.size() == 1").
    local = jnp.arange(n) % nl
    fci_of = jnp.where(local < fl, jnp.arange(n) // nl * fl + local, nf).astype(jnp.int32)
    g = -(-r // d) if insert_sources is None else -(-max(1, min(insert_sources, r)) // d)
    w = nl if insert_rows is None else max(1, min(-(-insert_rows // d), nl))
    mpg = -(-p // page)  # pages of a prefix
    src_tokens = jnp.pad(src_tokens, ((0, 0), (0, mpg * page - p)), constant_values=settings.pad_id)
    layers, heads = cfg.num_layers, cfg.num_heads
    seps = separators[:, None] if separators.ndim == 1 else separators  # [V, R]
    nseg = seps.shape[1]
    limit = (
        jnp.full((b,), m, jnp.int32) if row_max_new is None else jnp.clip(row_max_new, 1, m).astype(jnp.int32)
    )

    # Sources in queue order: shard d's are j = d, d + D, ... (the first `used`; later ones are bucket
    # padding), at queue positions [q_beg[d], q_end[d]). Rows in queue order of their sources, so
    # a source's rows are contiguous: [row_beg[q], row_end[q]) for queue position q.
    used = jnp.max(row_src) + 1
    j = jnp.arange(r)
    queue = jnp.argsort(jnp.where(j < used, (j % d) * r + j, d * r + j))  # queue position -> source
    rank = jnp.argsort(queue)  # source -> queue position
    per_shard = jnp.sum((j[None, :] < used) & (j[None, :] % d == jnp.arange(d)[:, None]), axis=1)
    q_end = jnp.cumsum(per_shard)
    q_beg = q_end - per_shard
    row_q = jnp.where(row_src >= 0, rank[jnp.maximum(row_src, 0)], r)
    if rows_per_shard is None:
        order = jnp.argsort(row_q, stable=True)
    elif rows_per_shard * d != b:
        raise ValueError(f"{b} rows are not {d} blocks of rows_per_shard={rows_per_shard}")
    else:
        order = jnp.arange(b)  # already in queue order, block by block (padding rows inside the blocks)
    o_q, o_prefix, o_fci = row_q[order], row_prefix_len[order].astype(jnp.int32), row_fci[order]
    key_impl = jax.random.key_impl(row_keys)
    o_key, o_stop, o_limit = jax.random.key_data(row_keys)[order], stop_ids[order], limit[order]
    # Each queue position's rows are contiguous: [row_beg, row_end) (padding rows, o_q = r, may sit
    # between blocks, so these are segment reductions, not a search of sorted positions).
    src_count = jax.ops.segment_sum(jnp.ones((b,), jnp.int32), o_q, num_segments=r + 1)[:r]
    first_row = jax.ops.segment_min(jnp.arange(b, dtype=jnp.int32), o_q, num_segments=r + 1)[:r]
    row_beg = jnp.where(src_count > 0, first_row, 0).astype(jnp.int32)
    row_end = row_beg + src_count
    o_worst = jnp.where(o_q < r, pages_spanned(o_prefix, o_limit, page), 0)
    # Per queue position: the pages its rows share (every full page of the longest prefix they read) and
    # the pages it needs to enter (those plus each row's worst case).
    shared = jnp.maximum(jax.ops.segment_max(o_prefix, o_q, num_segments=r + 1)[:r], 0) // page
    need = shared + jax.ops.segment_sum(o_worst, o_q, num_segments=r + 1)[:r]
    src_rows = row_end - row_beg
    src_fci_rows = jax.ops.segment_sum(o_fci.astype(jnp.int32), o_q, num_segments=r + 1)[:r]

    def is_stop(tok, stop):
        return jnp.any(tok[:, None] == stop, axis=1)

    def sample(logits, keys, n_gen):
        keys = jax.vmap(jax.random.fold_in)(jax.random.wrap_key_data(keys, impl=key_impl), n_gen)
        return sample_tokens(logits, keys, settings.sampling)

    # The FCI sums in the layout the layer scan gives the decode kernel's mass ([L, F, N, R, C]): adding
    # a step's mass needs no transpose of this, the largest per-slot state (two [L, N, R, C] per slot).
    zeros_lnc = jnp.zeros((layers, nf, heads, nseg, c), jnp.float32)
    state = LoopState(
        cache=empty_cache(cfg, n, size, npages, page, sharder, d),
        refs=jnp.zeros((d, npages), jnp.int32),
        reserve=jnp.zeros((n,), jnp.int32),
        cur_token=jnp.zeros((n,), jnp.int32),
        n_gen=jnp.zeros((n,), jnp.int32),
        done=jnp.ones((n,), bool),
        fed_final=jnp.ones((n,), bool),  # free slots count as finished
        reason=jnp.zeros((n,), jnp.int32),
        tokens=jnp.full((n, m), settings.pad_id, jnp.int32),
        logprobs=jnp.zeros((n, m), jnp.float32),
        entropies=jnp.zeros((n, m), jnp.float32),
        f=FciState(
            key_steps=jnp.full((nf, nseg, size), -1, jnp.int32),
            cur_step=jnp.ones((nf, nseg), jnp.int32),
            cur_len=jnp.zeros((nf, nseg), jnp.int32),
            step_len=jnp.zeros((nf, nseg, c), jnp.int32),
            cur_mass=zeros_lnc,
            fci=zeros_lnc,
            think_step=jnp.full((nf, nseg), -1, jnp.int32),
            has_sep=jnp.zeros((nf, nseg), bool),
        ),
    )
    free_slots = Slots(
        row=jnp.full((n,), -1, jnp.int32),
        key=jnp.zeros((n,) + o_key.shape[1:], o_key.dtype),
        fci=jnp.zeros((n,), bool),
        stop=jnp.full((n, stop_ids.shape[1]), -1, stop_ids.dtype),
        limit=jnp.ones((n,), jnp.int32),
        prefix=jnp.ones((n,), jnp.int32),
    )

    def split(x, axis=0):
        """x with its axis `axis` (slots, FCI slots or block-laid-out rows) split over the batch axes like
        the shards: each device holds its own slots' state (and rows' outputs)."""
        if d == 1:
            return x
        return sharder.constrain(x, (None,) * axis + ("batch",) + (None,) * (x.ndim - axis - 1))

    def pin(s: LoopState) -> LoopState:
        """The per-slot state that grows with the slots, split like them (tokens and log-probs [n, M], the
        FCI sums [L, F, N, R, C] and key steps [F, R, S])."""
        f = dataclasses.replace(
            s.f, key_steps=split(s.f.key_steps), cur_mass=split(s.f.cur_mass, 1), fci=split(s.f.fci, 1)
        )
        return dataclasses.replace(
            s, tokens=split(s.tokens), logprobs=split(s.logprobs), entropies=split(s.entropies), f=f
        )

    state = pin(state)
    shapes = jax.eval_shape(lambda: _results(state, free_slots, m, c, fci_slot, fci_of))
    blocks = rows_per_shard is not None
    out0 = {
        k: jnp.full(
            (b,) + v.shape[1:], settings.pad_id if k == "tokens" else (-1 if k == "step_ids" else 0), v.dtype
        )
        for k, v in shapes.items()
    }
    out0 = {k: split(v) for k, v in out0.items()} if blocks else out0

    def plan(s: LoopState, nxt):
        """Per shard ([D] each): whether its next group enters now, how many sources and rows it brings."""
        idle = s.fed_final.reshape(d, nl)  # free or finished (harvested first)
        idle_fci = jnp.sum(idle[:, :fl], axis=1)
        avail = available(s.refs, jnp.where(s.fed_final, 0, s.reserve))
        qs = nxt[:, None] + jnp.arange(g)  # [D, G]
        inside = qs < q_end[:, None]
        qc = jnp.minimum(qs, r - 1)
        rows = jnp.cumsum(jnp.where(inside, src_rows[qc], 0), axis=1)
        fci_rows = jnp.cumsum(jnp.where(inside, src_fci_rows[qc], 0), axis=1)
        pgs = jnp.cumsum(jnp.where(inside, need[qc], 0), axis=1)
        fits = inside & (rows <= jnp.minimum(idle.sum(axis=1), w)[:, None]) & (pgs <= avail[:, None])
        fits &= fci_rows <= idle_fci[:, None]  # FCI rows take FCI slots; the others any slot
        count = jnp.sum(fits, axis=1)  # the group's sources are a prefix of it: sums only grow
        rows_in = jnp.where(
            count > 0, jnp.take_along_axis(rows, jnp.maximum(count - 1, 0)[:, None], 1)[:, 0], 0
        )
        whole = count == jnp.minimum(g, q_end - nxt)
        go = (nxt < q_end) & (count > 0) & (whole | jnp.all(idle, axis=1))
        return go, jnp.where(go, count, 0), jnp.where(go, rows_in, 0)

    def harvest(s: LoopState, sl: Slots, out):
        fin = s.fed_final & (sl.row >= 0)
        res = _results(s, sl, m, c, fci_slot, fci_of)
        if blocks:  # shard d's slots write its own block of rows, on its own device
            local = jnp.where(fin, sl.row - jnp.arange(n) // nl * rows_per_shard, rows_per_shard)

            def write(o, v):
                o, v = o.reshape((d, rows_per_shard) + o.shape[1:]), v.reshape((d, nl) + v.shape[1:])
                o = jax.vmap(lambda a, i, x: a.at[i].set(x, mode="drop"))(o, local.reshape(d, nl), v)
                return split(o.reshape((b,) + o.shape[2:]))

            out = {k: write(out[k], res[k]) for k in out}
        else:
            dest = jnp.where(fin, sl.row, b)
            out = {k: out[k].at[dest].set(res[k], mode="drop") for k in out}
        return dataclasses.replace(sl, row=jnp.where(fin, -1, sl.row)), out

    def insert(carry):
        s, sl, out, nxt = carry
        _, count, rows_in = plan(s, nxt)
        sl, out = harvest(s, sl, out)
        # Queue positions nxt .. nxt + count - 1 of each shard enter: their prefixes are prefilled into
        # fresh pages, and their rows take the shard's first free slots in index order.
        qs = jnp.minimum(nxt[:, None] + jnp.arange(g), r - 1)  # [D, G]
        src_in = jnp.arange(g)[None, :] < count[:, None]
        js = queue[qs]
        valid = (jnp.arange(mpg * page) < jnp.where(src_in, src_lens[js], 0)[..., None]).reshape(d * g, -1)
        tokens = src_tokens[js.reshape(-1)]
        # Rows: the i-th row entering shard d is row i - first of source gi of its group.
        rr = jnp.arange(w)
        row_ok = rr[None, :] < rows_in[:, None]  # [D, W]
        counts = jnp.where(src_in, src_rows[qs], 0)
        ends = jnp.cumsum(counts, axis=1)
        gi = jnp.minimum(jax.vmap(lambda e: jnp.searchsorted(e, rr, side="right"))(ends), g - 1)
        cand = _take(row_beg[qs], gi) + rr - _take(ends - counts, gi)
        cand = jnp.where(row_ok, jnp.minimum(cand, b - 1), 0)  # [D, W] ordered rows
        prefix = o_prefix[cand]
        full, own = prefix // page, row_ok & (prefix % page != 0)
        # Pages: each source's shared ones first, then each row's copy of the page its prefix ends in.
        n_shared = jnp.where(src_in, shared[qs], 0)
        blk = jnp.arange(mpg)
        ranks = jnp.concatenate(
            [
                ((jnp.cumsum(n_shared, axis=1) - n_shared)[..., None] + blk).reshape(d, g * mpg),
                n_shared.sum(axis=1, keepdims=True) + jnp.cumsum(own, axis=1) - own,
            ],
            axis=1,
        )
        want = jnp.concatenate([(blk < n_shared[..., None]).reshape(d, g * mpg), own], axis=1)
        ids = take_free(s.refs, ranks, want)  # [D, G mpg + W]
        src_pages, own_page = ids[:, : g * mpg].reshape(d, g, mpg), ids[:, g * mpg :]
        col = jnp.arange(mb)
        table = _take(src_pages, gi)[..., jnp.minimum(col, mpg - 1)]  # [D, W, MB]
        table = jnp.where(
            col < full[..., None], table, jnp.where(col == full[..., None], own_page[..., None], npages)
        )
        table = jnp.where(row_ok[..., None], table, npages)
        refs = add_refs(s.refs, table, 1)  # shared pages no row reads stay free
        page_src = jnp.concatenate(
            [jnp.broadcast_to(jnp.repeat(jnp.arange(g), mpg), (d, g * mpg)), gi], axis=1
        )
        page_start = jnp.concatenate(
            [jnp.broadcast_to(jnp.tile(blk * page, g), (d, g * mpg)), full * page], 1
        )
        h, cache = prefill_into_pages(
            params, tokens, valid, s.cache, ids, page_src, page_start, cfg=cfg, sharder=sharder
        )
        # Slots: FCI rows take the shard's free FCI slots in index order; the other rows its other free
        # slots first, then the FCI slots the FCI rows leave.
        free = sl.row.reshape(d, nl) < 0
        free_fci = free & (jnp.arange(nl) < fl)
        is_fci = row_ok & o_fci[cand]
        rest = row_ok & ~is_fci
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
        dest = jnp.where(row_ok, local + jnp.arange(d)[:, None] * nl, n).reshape(-1)  # n: dropped
        fdest = jnp.where(dest < n, fci_of[jnp.minimum(dest, n - 1)], nf)  # F: dropped
        h_row = jax.vmap(lambda hs, i, t: hs[i, t])(h.reshape((d, g) + h.shape[1:]), gi, prefix - 1)
        cand, prefix, own = cand.reshape(-1), prefix.reshape(-1), own.reshape(-1)
        logits = logits_from_hidden(params, h_row.reshape(d * w, 1, -1), cfg=cfg, sharder=sharder)[:, 0]
        tok, lp, ent = sample(logits, o_key[cand], jnp.zeros((d * w,), jnp.int32))
        stop = is_stop(tok, o_stop[cand])
        lim = o_limit[cand]
        nw = d * w

        def put(x, v):
            return x.at[dest].set(v, mode="drop")

        def put_f(x, v):
            return x.at[fdest].set(v, mode="drop")

        # FCI slots taking a new row: their [L, F, N, R, C] sums start again
        fresh = jnp.zeros((nf,), bool).at[fdest].set(True, mode="drop")[None, :, None, None, None]

        cache = KVCache(cache.k, cache.v, put(cache.table, table.reshape(nw, mb)), put(cache.lengths, prefix))
        ks = jnp.where(jnp.arange(size)[None, :] < prefix[:, None], 0, -1).astype(jnp.int32)
        f = s.f
        s = LoopState(
            cache=cache,
            refs=refs,
            reserve=put(s.reserve, o_worst[cand] - own),
            cur_token=put(s.cur_token, tok),
            n_gen=put(s.n_gen, jnp.ones((nw,), jnp.int32)),
            done=put(s.done, stop | (lim == 1)),
            fed_final=put(s.fed_final, jnp.zeros((nw,), bool)),
            reason=put(s.reason, jnp.where(stop, EOS, jnp.where(lim == 1, LENGTH, 0)).astype(jnp.int32)),
            tokens=put(s.tokens, jnp.full((nw, m), settings.pad_id, jnp.int32).at[:, 0].set(tok)),
            logprobs=put(s.logprobs, jnp.zeros((nw, m), jnp.float32).at[:, 0].set(lp)),
            entropies=put(s.entropies, jnp.zeros((nw, m), jnp.float32).at[:, 0].set(ent)),
            f=FciState(
                key_steps=put_f(f.key_steps, jnp.repeat(ks[:, None, :], nseg, axis=1)),
                cur_step=put_f(f.cur_step, jnp.ones((nw, nseg), jnp.int32)),
                cur_len=put_f(f.cur_len, jnp.zeros((nw, nseg), jnp.int32)),
                step_len=put_f(
                    f.step_len, jnp.zeros((nw, nseg, c), jnp.int32).at[:, :, 0].set(prefix[:, None])
                ),
                cur_mass=jnp.where(fresh, 0.0, f.cur_mass),
                fci=jnp.where(fresh, 0.0, f.fci),
                think_step=put_f(f.think_step, jnp.full((nw, nseg), -1, jnp.int32)),
                has_sep=put_f(f.has_sep, jnp.zeros((nw, nseg), bool)),
            ),
        )
        sl = Slots(
            row=put(sl.row, cand),
            key=put(sl.key, o_key[cand]),
            fci=put(sl.fci, o_fci[cand]),
            stop=put(sl.stop, o_stop[cand]),
            limit=put(sl.limit, lim),
            prefix=put(sl.prefix, prefix),
        )
        return pin(s), sl, out, nxt + count

    def fci_step(f: FciState, key_steps, mass, track, token, done) -> FciState:
        """One decode step of FCI for the FCI slots (track [F]: the slot's row is active and tracks FCI;
        token: the fed token; done: it is the row's last): the fed token's attention row (mass [L, F, N,
        R, C]) joins its step, and a closing step is added to the sums."""
        cur_mass = f.cur_mass + jnp.where(track[None, :, None, None, None], mass, 0.0)
        track = track[:, None]  # [F, 1]
        bucket = jnp.minimum(f.cur_step, c - 1)  # [F, R]
        step_len = f.step_len + track[..., None] * jax.nn.one_hot(bucket, c, dtype=jnp.int32)
        cur_len = f.cur_len + track
        sep = seps[token]  # [F, R]
        close = track & (sep | done[:, None])
        key_len = jnp.maximum(step_len, 1).astype(jnp.float32)  # [F, R, C]
        earlier = jnp.arange(c) <= (f.cur_step - delta)[..., None]  # key steps c <= a - Delta
        scale = jnp.where(earlier, 1.0 / (jnp.maximum(cur_len, 1)[..., None] * key_len), 0.0)  # [F, R, C]
        closing = close[None, :, None, :, None]  # [1, F, 1, R, 1] against the sums [L, F, N, R, C]
        return FciState(
            key_steps=key_steps,
            cur_step=f.cur_step + close,
            cur_len=jnp.where(close, 0, cur_len),
            step_len=step_len,
            cur_mass=jnp.where(closing, 0.0, cur_mass),
            fci=f.fci + jnp.where(closing, cur_mass * scale[None, :, None], 0.0),
            think_step=jnp.where(track & (token == think_id)[:, None], f.cur_step, f.think_step),
            has_sep=f.has_sep | (track & sep),
        )

    def decode(carry):
        s, sl, out, nxt = carry
        slot_ids = jnp.arange(n)
        active = ~s.fed_final
        pos = s.cache.lengths
        # ---- a row about to write the first position of a page takes a free page of its shard.
        opening = (active & (pos % page == 0)).reshape(d, nl)
        new_page = take_free(s.refs, jnp.cumsum(opening, axis=1) - opening, opening)  # [D, nl]
        blk = jnp.minimum(pos // page, mb - 1)
        opened = opening.reshape(-1)
        # (a select over the table, rather than a scatter of what a gather of it read)
        opens = opened[:, None] & (jnp.arange(mb)[None, :] == blk[:, None])
        table = jnp.where(opens, new_page.reshape(-1, 1), s.cache.table)
        cache = KVCache(s.cache.k, s.cache.v, table, s.cache.lengths)
        # ---- the FCI slots' key steps: the fed token's position joins its row's current step.
        track = (active & sl.fci)[fci_slot]  # [F]
        bucket = jnp.minimum(s.f.cur_step, c - 1)
        key_steps = s.f.key_steps.at[jnp.arange(nf), :, pos[fci_slot]].set(
            jnp.where(track[:, None], bucket, -1), mode="drop"
        )
        h, cache, mass = forward_cached(
            params,
            s.cur_token[:, None],
            cache,
            cfg=cfg,
            valid=active[:, None],
            key_steps=key_steps if nf else None,
            num_steps=c,
            sharder=sharder,
        )
        f = s.f
        if nf:
            mass = mass[:, :, :, 0]  # [L, F, N, T = 1, R, C] -> [L, F, N, R, C]: the sums' layout
            f = fci_step(f, key_steps, mass, track, s.cur_token[fci_slot], s.done[fci_slot])
        # ---- sample the next token for rows that are still generating.
        gen = active & ~s.done
        logits = logits_from_hidden(params, h, cfg=cfg, sharder=sharder)[:, 0]
        tok, lp, ent = sample(logits, sl.key, s.n_gen)
        write = jnp.where(gen, s.n_gen, m)  # finished rows write nowhere (dropped)
        n_gen = s.n_gen + gen
        stop = gen & is_stop(tok, sl.stop)
        hit_len = gen & ~stop & (n_gen >= sl.limit)
        # ---- a row whose last token was fed this step ends: its pages go back.
        ending = active & s.done
        refs = add_refs(s.refs, new_page, 1)
        refs = add_refs(refs, jnp.where(ending[:, None], cache.table, npages).reshape(d, -1), -1)
        cache = dataclasses.replace(cache, table=jnp.where(ending[:, None], npages, cache.table))
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
        return pin(s), sl, out, nxt

    # Insert, decode until some shard's next group fits (or every row ended), insert again: two nested
    # loops rather than a `lax.cond` per step, whose branches would each need their own copy of the cache.
    def go(carry):
        return jnp.any(plan(carry[0], carry[3])[0])

    def decoding(carry):
        return jnp.any(~carry[0].fed_final) & ~go(carry)

    def insert_then_decode(carry):
        return jax.lax.while_loop(decoding, decode, insert(carry))

    carry = (state, free_slots, out0, q_beg.astype(jnp.int32))
    s, sl, out, _ = jax.lax.while_loop(go, insert_then_decode, carry)
    _, out = harvest(s, sl, out)
    if rows_per_shard is not None:
        return out  # the callers' block layout, each device's rows on it
    inv = jnp.argsort(order)  # back to the callers' row order
    return {k: v[inv] for k, v in out.items()}
