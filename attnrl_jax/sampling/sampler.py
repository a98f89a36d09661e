"""Host-side sampler: strings, chat template and tokenizer on the host; arrays only on the device.

`Sampler.generate` samples n responses per prompt (with their FCI); `Sampler.sample_mixed` samples new
prompts' initial responses and earlier responses' tree continuations in one device call (docs/algorithm.md
sections 3, 6 and 10). Batch and prefix shapes are rounded up to buckets so that repeated calls reuse one
compiled program.

Memory: `plan_call` sizes each call to a per-device budget (`cache_gib`, config.sampler.cache_gib) of decode
slots and KV pages: the rows of a prefix share its pages and each takes pages of its own as it generates, so
the budget holds as many rows as the call's mean need allows, and when a call has more rows than fit the loop
batches continuously (a finished row's slot and pages take the next waiting prefix). A row can address the
longest row's prompt bucket plus max_new_tokens positions (a continuation at offset o may add
max_new_tokens - o tokens).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from attnrl_jax.algo.segmentation import SeparatorTable
from attnrl_jax.distributed import fetch
from attnrl_jax.mesh import Sharder
from attnrl_jax.model.config import ModelConfig
from attnrl_jax.sampling.loop import EOS, LoopSettings, generate
from attnrl_jax.sampling.pages import pages_spanned
from attnrl_jax.typing import Params


@dataclasses.dataclass(frozen=True)
class Sample:
    """One generated row (initial response or continuation)."""

    tokens: np.ndarray  # sampled tokens, stop token included
    logprobs: np.ndarray  # float32 behaviour log-probs at the sampling temperature
    entropies: np.ndarray
    finish_reason: str  # "eos" or "length"
    text: str | None = None
    fci: np.ndarray | None = None  # [num_steps + 1] step FCI (index 0 = prompt), initial responses only
    step_ids: np.ndarray | None = None  # 1-based step of each token
    think_step: int = -1
    needs_fallback: bool = False  # no separator of any tracked kind: its every-token-step FCI is not computed
    step_overflow: int = 0  # steps beyond the FCI buckets, merged into the last one (initial responses)


@dataclasses.dataclass(frozen=True)
class ContinuationRequest:
    """Continuations of one response: T samples from each offset (tokens of the response before the cut)."""

    prompt: Sequence[int]
    response: Sequence[int]
    offsets: Sequence[int]
    samples_per_offset: int = 2


def _bucket(n: int, minimum: int) -> int:
    """The smallest power of two >= max(n, minimum)."""
    return max(minimum, 1 << max(int(n) - 1, 0).bit_length())


GiB = 2**30


@dataclasses.dataclass(frozen=True)
class CallShape:
    """The compiled shape of one sampler call (`plan_call`)."""

    batch: int  # rows, padding included
    sources: int  # prefixes prefilled (after `chunk_sources`), padding included
    prefix: int  # tokens per prefix
    cache_size: int  # KV positions a row can address (a multiple of the page size)
    slots: int  # rows decoding at once
    insert_sources: int | None  # prefixes prefilled per insertion (None: all at once)
    insert_rows: int | None  # rows set up per insertion at most (None: all slots)
    pages: int | None = None  # KV pages per shard (None: every slot at cache_size)
    shards: int = 1  # ways the slots and pages are split (the mesh's batch split, or 1)
    rows_per_source: int = 0  # rows of one prefix at most (`chunk_sources`; 0: no limit)
    fci_slots: int | None = None  # slots with FCI state (None: all)
    rows_per_shard: int | None = None  # rows come in `shards` blocks of this many (`block_layout`)

    def loop_args(self) -> dict:
        """The static arguments of `sampling.loop.generate` for a call of this shape."""
        return dict(
            slots=self.slots,
            cache_size=self.cache_size,
            insert_sources=self.insert_sources,
            insert_rows=self.insert_rows,
            pages=self.pages,
            shards=self.shards,
            fci_slots=self.fci_slots,
            rows_per_shard=self.rows_per_shard,
        )


def page_bytes(cfg: ModelConfig, settings: LoopSettings) -> int:
    """Device bytes of one KV page: keys and values of every layer for `settings.page_size` positions."""
    per_position = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(cfg.dtype).itemsize
    return per_position * settings.page_size


def slot_bytes(
    cfg: ModelConfig, settings: LoopSettings, cache_size: int, segmentations: int, fci: bool = True
) -> int:
    """Device bytes one decode slot holds besides its pages: its page table and outputs, and, for a slot
    that tracks FCI (`fci`), its FCI state (the per-layer, per-head sums and step ids)."""
    table = cache_size // settings.page_size * 4
    outputs = 2 * settings.max_new_tokens * 12  # tokens, log-probs, entropies: the slot's and its row's
    if not fci:
        return table + outputs
    sums = 2 * segmentations * cfg.num_layers * cfg.num_heads * settings.num_steps * 4
    steps = cache_size * segmentations * 4
    return table + outputs + sums + steps


def chunk_sources(num_sources: int, row_src: Sequence[int], cap: int) -> tuple[list[int], list[int]]:
    """Splits every source with more than `cap` rows into equal chunks of at most `cap` rows, each a source
    of its own (the same prefix, prefilled once per chunk), so that every source's rows fit one shard's
    slots. Returns the original source of each new source and each row's new source; rows keep their
    order within a source. `cap` 0: no split."""
    counts = np.bincount(np.asarray(row_src, np.int64), minlength=num_sources)
    pieces = np.maximum(1, -(-counts // cap)) if cap > 0 else np.ones(num_sources, np.int64)
    size = np.maximum(1, -(-counts // pieces))
    first = np.concatenate([[0], np.cumsum(pieces)[:-1]])
    source_of = np.repeat(np.arange(num_sources), pieces).tolist()
    seen = np.zeros(num_sources, np.int64)
    new_src = []
    for s in row_src:
        new_src.append(int(first[s] + seen[s] // size[s]))
        seen[s] += 1
    return source_of, new_src


def block_layout(row_src: Sequence[int], shards: int, min_rows: int = 1) -> tuple[int, np.ndarray]:
    """The loop's row blocks (`generate(rows_per_shard=...)`): shard d decodes the sources j with
    j mod shards = d, so its block holds their rows, source by source in increasing j (each source's rows
    in their order), then padding. Returns (rows per block: the fullest shard's rows rounded up to a power
    of two of at least `min_rows`, each row's position in the blocks)."""
    row_src = np.asarray(row_src, np.int64)
    shard = row_src % shards
    order = np.lexsort((np.arange(len(row_src)), row_src, shard))  # by shard, source, then row
    counts = np.bincount(shard, minlength=shards)
    per = _bucket(int(counts.max()), min_rows)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    pos = np.empty(len(row_src), np.int64)
    ranked = np.arange(len(row_src)) - starts[shard[order]]
    pos[order] = shard[order] * per + ranked
    return per, pos


def plan_rows(
    source_lens: Sequence[int], rows: Sequence[tuple], **plan_kw
) -> tuple[CallShape, list[int], list[int], np.ndarray]:
    """`plan_call`, then the sources split to fit one shard's slots (`chunk_sources`) and the rows laid out
    in the loop's blocks (`block_layout`), so that each device writes and holds only its own rows' outputs.
    Returns (the call's shape, the original source of each source, each row's source, each row's position
    in the blocks)."""
    shape = plan_call(source_lens, rows, **plan_kw)
    source_of, row_src = chunk_sources(len(source_lens), [r[0] for r in rows], shape.rows_per_source)
    per, pos = block_layout(row_src, shape.shards, max(plan_kw.get("min_batch", 8) // shape.shards, 1))
    shape = dataclasses.replace(shape, batch=per * shape.shards, rows_per_shard=per)
    return shape, source_of, row_src, pos


def plan_call(
    source_lens: Sequence[int],
    rows: Sequence[tuple[int, int, int] | tuple[int, int, int, bool]],
    *,
    cfg: ModelConfig,
    settings: LoopSettings,
    segmentations: int = 2,
    cache_gib: float = 0.0,
    parallelism: int = 1,
    min_batch: int = 8,
    min_prefix: int = 64,
) -> CallShape:
    """The shape of a call over prefixes of `source_lens` tokens with `rows` (source, prefix length, token
    limit, and whether it tracks FCI: default True) each.

    `cache_gib` is the per-device budget of the decode slots and their KV pages (`slot_bytes`,
    `page_bytes`; 0: no limit, every row decodes at once). A row takes the pages of its prefix that it
    shares with the other rows of its source once, and at most `pages_spanned(prefix, limit)` of its own,
    so the budget buys as many slots as rows of the call's mean need fit, and the pages left beside them.
    The slots and pages are split `parallelism` ways (the mesh's batch split: each device holds its slots'
    pages, and a prefix's rows decode on one device); a prefix with more rows than a device's slots (a few
    prompts with many samples each on a large mesh, or a small budget) is split into chunks that fit
    (`rows_per_source`, `chunk_sources`). Only as many slots as a device's prefixes have rows that track
    FCI carry FCI state (`fci_slots`). A budget too small for one row is a ValueError naming it.
    """
    if not rows:
        raise ValueError("a sampler call needs at least one row")
    m, page = settings.max_new_tokens, settings.page_size
    rows = _Rows(
        list(source_lens),
        [tuple(r[:3]) for r in rows],
        [bool(r[3]) if len(r) > 3 else True for r in rows],
        page,
    )
    batch = _bucket(len(rows.rows), min_batch)
    longest_row = max(prefix + limit for _, prefix, limit in rows.rows)
    cache_size = -(-(_bucket(max(longest_row - m, 1), min_prefix) + m) // page) * page
    prefix = min(_bucket(max(source_lens), min_prefix), cache_size)  # sources end before their rows do
    if cache_gib <= 0:
        shards = parallelism if batch % parallelism == 0 else 1
        count, _, _, tracked = rows.chunked(batch // shards)
        fl = _fci_slots(tracked, shards, batch // shards, max(min_batch // shards, 1))
        sources = _bucket(count, min_batch)
        return CallShape(
            batch, sources, prefix, cache_size, batch, None, None, None, shards, batch // shards, fl
        )
    per_page = page_bytes(cfg, settings)
    per_slot = slot_bytes(cfg, settings, cache_size, segmentations, fci=False)
    per_fci = slot_bytes(cfg, settings, cache_size, segmentations) - per_slot  # a slot's FCI state
    sizes = (batch, prefix, cache_size, min_batch)
    return _budgeted(rows, sizes, int(cache_gib * GiB), (per_page, per_slot, per_fci), parallelism, cache_gib)


@dataclasses.dataclass(frozen=True)
class _Rows:
    """A call's prefixes (their lengths), rows (source, prefix length, token limit) and which rows track
    FCI, with the page size."""

    source_lens: list[int]
    rows: list[tuple[int, int, int]]
    fci: list[bool]
    page: int

    def chunked(self, cap: int):
        """(number of sources, rows per source at most, pages each source needs to enter: the full pages
        of its longest prefix, once, plus each row's own; its rows that track FCI) after splitting the
        sources into chunks of `cap` rows (`chunk_sources`; 0: no split)."""
        page = self.page
        source_of, row_src = chunk_sources(len(self.source_lens), [s for s, *_ in self.rows], cap)
        shared = np.zeros(len(source_of), np.int64)
        need = np.zeros(len(source_of), np.int64)
        tracked = np.zeros(len(source_of), np.int64)
        for s, (_, pre, limit), f in zip(row_src, self.rows, self.fci):
            shared[s] = max(shared[s], pre // page)
            need[s] += int(pages_spanned(pre, limit, page))
            tracked[s] += f
        return len(source_of), int(np.bincount(row_src).max()), need + shared, tracked


def _fci_slots(tracked, shards: int, local: int, minimum: int | None = None) -> int:
    """FCI slots: each shard's (prefix j decodes in shard j mod shards) rows that track FCI, all at once if
    its slots allow; without a budget, bucketed to a power of two >= `minimum`, so that calls of one batch
    bucket reuse their program (under a budget the slots follow the rows already)."""
    most = max(int(tracked[d::shards].sum()) for d in range(shards))
    return min(most if minimum is None else _bucket(most, minimum), local) * shards


def _budgeted(rows: _Rows, sizes, budget: int, per, parallelism: int, cache_gib: float) -> CallShape:
    """`plan_call` under a budget of `budget` bytes per device: as many slots as rows of the call's mean
    need fit, the pages left beside them (fewer rows per source chunk while a chunk does not fit), then
    static batching if everything fits at once, else continuous batching."""
    (batch, prefix, cache_size, min_batch), (per_page, per_slot, per_fci) = sizes, per
    n = len(rows.rows)
    mean_row = rows.chunked(0)[2].sum() / n * per_page + per_slot + per_fci * sum(rows.fci) / n
    local = min(-(-n // parallelism), int(budget // mean_row))  # slots per device
    slots = min(batch, local * parallelism)
    shards = parallelism if slots % parallelism == 0 else 1
    cap = max(slots // shards, 1)

    def fit(cap):  # the chunking, FCI slots per shard, and the pages beside every slot and its FCI state
        count, per_source, need, tracked = rows.chunked(cap)
        fl = _fci_slots(tracked, shards, slots // shards) // shards
        return count, per_source, need, fl, (budget - slots // shards * per_slot - fl * per_fci) // per_page

    count, per_source, need, fl, pages = fit(cap)
    while cap > 1 and need.max() > pages:  # a prefix's rows that do not fit the pages: smaller chunks
        cap //= 2
        count, per_source, need, fl, pages = fit(cap)
    if local < 1 or need.max() > pages:
        raise ValueError(
            f"a sampler cache budget of {cache_gib} GiB per device (config.sampler.cache_gib; "
            f"config.eval.cache_gib in eval.py) holds {local} decode slots and {max(pages, 0)} KV pages of "
            f"{rows.page} positions ({per_page / GiB:.4f} GiB each) per device, and one row needs a slot and "
            f"{int(rows.chunked(1)[2].max())} pages; raise the budget"
        )
    sources = _bucket(count, min_batch)
    # No shard needs more pages than all of its prefixes' rows at once (the loop gives prefix j to shard
    # j mod shards): a small model under a large budget gets the pool it uses, not the budget.
    most = int(max(need[d::shards].sum() for d in range(shards)))
    if slots >= n and most <= pages:
        # Static: every prefix prefilled and every row set up in one insertion.
        return CallShape(
            batch, sources, prefix, cache_size, slots, None, None, most, shards, cap, fl * shards
        )
    # Continuous: insertions of about an eighth of the slots, so slots wait little for a group to fit, in
    # groups of prefixes that the mesh splits (a smaller group's prefill is repeated on every device).
    group = max(1, slots // (8 * per_source))
    group = min(-(-group // shards) * shards, max(1, slots // per_source))
    pages = min(pages, most)
    return CallShape(
        batch,
        sources,
        prefix,
        cache_size,
        slots,
        group,
        min(slots, group * per_source),
        pages,
        shards,
        cap,
        fl * shards,
    )


class Sampler:
    """Generation with one model graph, on the host side.

    Args:
      params, cfg: the model.
      tokenizer: a transformers tokenizer (chat template, decoding, separator table, EOS).
      settings: loop settings (max new tokens, sampling, FCI buckets, Delta).
      sharder: mesh sharding of activations (params should already be placed).
      stop_ids: extra stop token ids (the tokenizer's EOS is always one).
      min_batch, min_prefix: the smallest batch and prefix buckets.
      newline_fallback: also track the "\\n" segmentation, used by responses without any "\\n\\n"
        (section 4); doubles the FCI state of the loop.
    """

    def __init__(
        self,
        params: Params,
        cfg: ModelConfig,
        tokenizer,
        settings: LoopSettings,
        *,
        sharder: Sharder | None = None,
        stop_ids: Sequence[int] = (),
        min_batch: int = 8,
        min_prefix: int = 64,
        separators: SeparatorTable | None = None,
        newline_fallback: bool = True,
        cache_gib: float = 0.0,
    ):
        self.params, self.cfg, self.tokenizer, self.settings = params, cfg, tokenizer, settings
        self.sharder = sharder or Sharder()
        self.table = separators or SeparatorTable.from_tokenizer(tokenizer, cfg.vocab_size)
        eos = [tokenizer.eos_token_id] if tokenizer is not None and tokenizer.eos_token_id is not None else []
        self.stop_ids = sorted(set(eos) | set(stop_ids))
        if not self.stop_ids:
            raise ValueError("no stop token: the tokenizer has no EOS and no stop_ids were given")
        self.min_batch, self.min_prefix, self.cache_gib = min_batch, min_prefix, cache_gib
        tables = [self.table.double_newline] + ([self.table.newline] if newline_fallback else [])
        self._separators = np.stack(tables, axis=-1)  # [V, 1 or 2]

    def encode_prompt(self, content: str) -> list[int]:
        """A user message through the tokenizer's chat template (generation prompt added)."""
        out = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=True
        )
        return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)

    def generate(
        self, prompts: Sequence[Sequence[int] | str], n: int = 1, seed: int = 0
    ) -> list[list[Sample]]:
        """n samples per prompt (token ids, or strings put through the chat template), with FCI."""
        return self.sample_mixed(prompts, n, [], seed)[0]

    def sample_mixed(
        self,
        prompts: Sequence[Sequence[int] | str],
        n: int,
        continuations: Sequence[ContinuationRequest],
        seed: int = 0,
    ) -> tuple[list[list[Sample]], list[list[list[Sample]]]]:
        """One device call: n initial responses per prompt, and every continuation request.

        Returns (initial[prompt][sample], continuations[request][offset][sample]).
        """
        prompts = [self.encode_prompt(p) if isinstance(p, str) else list(p) for p in prompts]
        m = self.settings.max_new_tokens
        sources, rows = [], []  # rows: (source, prefix length, fci, key id, tokens it may sample)
        for i, prompt in enumerate(prompts):
            if not prompt:
                raise ValueError(f"prompt {i} is empty")
            sources.append(prompt)
            rows += [(len(sources) - 1, len(prompt), True, ("init", i, j), m) for j in range(n)]
        for i, req in enumerate(continuations):
            if not req.offsets:
                continue
            cut = max(req.offsets)
            if not 0 <= min(req.offsets) or cut > len(req.response):
                raise ValueError(
                    f"continuation request {i}: offsets {list(req.offsets)} outside a "
                    f"{len(req.response)}-token response"
                )
            sources.append(list(req.prompt) + list(req.response[:cut]))  # the longest prefix, prefilled once
            for k, o in enumerate(req.offsets):  # section 3: the completed response stays within m
                rows += [
                    (len(sources) - 1, len(req.prompt) + o, False, ("cont", i, k, j), max(m - o, 1))
                    for j in range(req.samples_per_offset)
                ]
        out = self._run(sources, rows, seed)
        initial = [[out[("init", i, j)] for j in range(n)] for i in range(len(prompts))]
        conts = [
            [[out[("cont", i, k, j)] for j in range(req.samples_per_offset)] for k in range(len(req.offsets))]
            for i, req in enumerate(continuations)
        ]
        return initial, conts

    def plan(self, sources, rows):
        """The compiled shape of a call over `sources` with `rows` (as `_run` receives them), with the
        sources after chunking and the rows' block positions (`plan_rows`)."""
        return plan_rows(
            [len(s) for s in sources],
            [(s, length, limit, fci) for s, length, fci, _, limit in rows],
            cfg=self.cfg,
            settings=self.settings,
            segmentations=self._separators.shape[1],
            cache_gib=self.cache_gib,
            parallelism=self.sharder.batch_parallelism(),
            min_batch=self.min_batch,
            min_prefix=self.min_prefix,
        )

    def _run(self, sources, rows, seed) -> dict:
        shape, source_of, row_src_of, pos = self.plan(sources, rows)
        sources = [sources[i] for i in source_of]
        rows = [(s, *rest) for s, (_, *rest) in zip(row_src_of, rows)]
        put = self.sharder.put  # rows are split over the batch axes; each process feeds its own rows
        src, src_lens, row_src, row_len, row_fci, row_max, stream = self._arrays(shape, sources, rows, pos)
        base = jax.random.key(seed)
        keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.asarray(stream))
        stop = np.tile(np.asarray(self.stop_ids, np.int32), (shape.batch, 1))
        out = generate(
            self.params,
            put(src, (None, None)),
            put(src_lens, (None,)),
            put(row_src, ("batch",)),
            put(row_len, ("batch",)),
            jax.random.wrap_key_data(put(jax.random.key_data(keys), ("batch", None))),
            put(row_fci, ("batch",)),
            put(stop, ("batch", None)),
            put(self._separators, (None, None)),
            jnp.int32(self.table.think_end_id),
            put(row_max, ("batch",)),
            cfg=self.cfg,
            settings=self.settings,
            sharder=self.sharder,
            **shape.loop_args(),
        )
        out = fetch(out)
        return {key: self._sample(out, b, fci) for b, (_, _, fci, key, _) in zip(pos, rows)}

    def _arrays(self, shape: CallShape, sources, rows, pos):
        """The host arrays of a call: prefixes [R, P] and their lengths, and per row of the block layout
        (`pos`: each row's place) its source, prefix length, FCI flag, token limit and PRNG stream (row i
        draws from fold_in(seed, i) wherever its block puts it); padding rows are never sampled."""
        tok = self.tokenizer
        pad = 0 if tok is None or tok.pad_token_id is None else tok.pad_token_id
        b_bucket = shape.batch
        src = np.full((shape.sources, shape.prefix), pad, np.int32)
        src_lens = np.ones(shape.sources, np.int32)
        for i, s in enumerate(sources):
            src[i, : len(s)] = s
            src_lens[i] = len(s)
        row_src = np.full(b_bucket, -1, np.int32)
        row_len = np.ones(b_bucket, np.int32)
        row_fci = np.zeros(b_bucket, bool)
        row_max = np.ones(b_bucket, np.int32)
        stream = np.arange(b_bucket)
        stream[pos] = np.arange(len(rows))
        stream[np.setdiff1d(np.arange(b_bucket), pos)] = np.arange(len(rows), b_bucket)
        for (s, length, fci, _, limit), b in zip(rows, pos):
            row_src[b], row_len[b], row_fci[b], row_max[b] = s, length, fci, limit
        return src, src_lens, row_src, row_len, row_fci, row_max, stream

    def _sample(self, out: dict, b: int, fci: bool) -> Sample:
        """Row b of a call's fetched outputs as a Sample (its FCI fields for rows that track FCI)."""
        n = int(out["lengths"][b])
        tokens = out["tokens"][b, :n]
        return Sample(
            tokens=tokens,
            logprobs=out["logprobs"][b, :n],
            entropies=out["entropies"][b, :n],
            finish_reason="eos" if out["finish_reason"][b] == EOS else "length",
            text=None if self.tokenizer is None else self.tokenizer.decode(tokens, skip_special_tokens=True),
            fci=out["fci"][b, : int(out["num_steps"][b]) + 1] if fci else None,
            step_ids=out["step_ids"][b, :n] if fci else None,
            think_step=int(out["think_step"][b]) if fci else -1,
            needs_fallback=bool(out["needs_fallback"][b]),
            step_overflow=int(out["step_overflow"][b]) if fci else 0,
        )
