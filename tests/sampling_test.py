"""The jitted sampler: cache decoding against full recomputation, FCI while decoding against the forward
pass and the dense formula (with a real tokenizer's separators), forked continuations, top-k/top-p
statistics, finished rows, compilation reuse and sharding."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from attnrl_jax.algo import SeparatorTable, segment
from attnrl_jax.kernels.fci import fci_reference
from attnrl_jax.mesh import MeshConfig, Sharder, make_mesh
from attnrl_jax.model import ModelConfig, forward, forward_with_fci, init_params, param_axes
from attnrl_jax.sampling import (
    ContinuationRequest,
    LoopSettings,
    Sampler,
    SamplingParams,
    generate,
    sample_tokens,
)
from attnrl_jax.sampling.loop import EOS, LENGTH
from attnrl_jax.sampling.pages import add_refs, available, pages_spanned, take_free
from attnrl_jax.sampling.sampler import (
    GiB,
    block_layout,
    chunk_sources,
    page_bytes,
    plan_call,
    slot_bytes,
)

CFG = ModelConfig.tiny(vocab_size=64, remat="none")
NO_SEP = jnp.zeros(64, bool)


@pytest.fixture(scope="module")
def params():
    # Wider weights than the default init give peaked, varied next-token distributions.
    p = init_params(CFG, jax.random.key(0))
    return jax.tree.map(lambda x: x * 3 if x.ndim >= 2 else x, p)


def _run(
    params,
    src,
    src_lens,
    row_src,
    row_len,
    keys,
    settings,
    *,
    stop=63,
    sep=NO_SEP,
    think=-1,
    fci=None,
    cfg=CFG,
    sharder=None,
    row_max_new=None,
    **schedule,
):
    b = len(row_src)
    fci = jnp.ones(b, bool) if fci is None else jnp.asarray(fci)
    return generate(
        params,
        jnp.asarray(src, jnp.int32),
        jnp.asarray(src_lens, jnp.int32),
        jnp.asarray(row_src, jnp.int32),
        jnp.asarray(row_len, jnp.int32),
        keys,
        fci,
        jnp.full((b, 1), stop, jnp.int32),
        jnp.asarray(sep),
        jnp.int32(think),
        None if row_max_new is None else jnp.asarray(row_max_new, jnp.int32),
        cfg=cfg,
        settings=settings,
        sharder=sharder,
        **schedule,
    )


SRC = np.array([[5, 6, 7, 8, 9, 1, 2], [10, 11, 12, 0, 0, 0, 0], [3, 4, 0, 0, 0, 0, 0]])
LENS = [7, 3, 2]


def _full_logits(params, prompt, response, cfg=CFG):
    seq = jnp.asarray(np.concatenate([prompt, response]))[None]
    return np.asarray(forward(params, seq, cfg=cfg)[0, len(prompt) - 1 : -1])


@pytest.mark.slow
def test_greedy_decoding_with_the_cache_equals_full_recompute(params):
    settings = LoopSettings(max_new_tokens=12, sampling=SamplingParams(temperature=0.0))
    out = _run(params, SRC, LENS, [0, 1, 2], LENS, jax.random.split(jax.random.key(0), 3), settings, stop=-1)
    assert (np.asarray(out["lengths"]) == 12).all() and (np.asarray(out["finish_reason"]) == LENGTH).all()
    for b in range(3):
        tokens = np.asarray(out["tokens"][b])
        logits = _full_logits(params, SRC[b, : LENS[b]], tokens)
        np.testing.assert_array_equal(tokens, logits.argmax(-1))  # every position
        want = np.take_along_axis(jax.nn.log_softmax(logits, -1), tokens[:, None], 1)[:, 0]
        np.testing.assert_allclose(np.asarray(out["logprobs"][b]), want, atol=1e-5)


@pytest.mark.slow
def test_sampled_log_probs_and_entropies_are_those_at_the_temperature(params):
    settings = LoopSettings(max_new_tokens=10, sampling=SamplingParams(temperature=0.7))
    out = _run(
        params,
        SRC,
        LENS,
        [0, 1, 2, 0],
        [7, 3, 2, 4],
        jax.random.split(jax.random.key(3), 4),
        settings,
        stop=-1,
    )
    for b, (s, n) in enumerate([(0, 7), (1, 3), (2, 2), (0, 4)]):
        tokens = np.asarray(out["tokens"][b])
        logp = np.asarray(jax.nn.log_softmax(_full_logits(params, SRC[s, :n], tokens) / 0.7, -1))
        np.testing.assert_allclose(
            np.asarray(out["logprobs"][b]), np.take_along_axis(logp, tokens[:, None], 1)[:, 0], atol=1e-5
        )
        np.testing.assert_allclose(np.asarray(out["entropies"][b]), -(np.exp(logp) * logp).sum(-1), atol=1e-4)


@pytest.mark.slow
def test_finished_rows_emit_padding_and_stop_accumulating(params):
    # Stop on a token the model emits early in some rows.
    settings = LoopSettings(
        max_new_tokens=16, sampling=SamplingParams(temperature=1.0), num_steps=16, pad_id=-7
    )
    keys = jax.random.split(jax.random.key(11), 6)
    free = _run(params, SRC, LENS, [0, 1, 2, 0, 1, 2], [7, 3, 2, 7, 3, 2], keys, settings, stop=-1)
    stop = int(np.asarray(free["tokens"])[:, 2:8].reshape(-1)[0])
    sep = jnp.asarray(np.arange(64) % 3 == 0)
    out = _run(params, SRC, LENS, [0, 1, 2, 0, 1, 2], [7, 3, 2, 7, 3, 2], keys, settings, stop=stop, sep=sep)
    lengths = np.asarray(out["lengths"])
    assert lengths.min() < 16 and (np.asarray(out["finish_reason"])[lengths < 16] == EOS).all()
    for b in range(6):
        n = lengths[b]
        tokens = np.asarray(out["tokens"][b])
        assert (tokens[n:] == -7).all() and (np.asarray(out["step_ids"][b, n:]) == -1).all()
        if out["finish_reason"][b] == EOS:
            assert tokens[n - 1] == stop
        np.testing.assert_array_equal(
            tokens[:n], np.asarray(free["tokens"][b])[:n]
        )  # same stream until the stop
        # FCI of the finished row is that of its own (short) sequence: nothing accumulated after the end.
        prompt = SRC[[0, 1, 2][b % 3], : LENS[b % 3]]
        steps = segment(tokens[:n], SeparatorTable(np.asarray(sep), np.asarray(sep)), len(prompt))
        ref = forward_with_fci(
            params,
            jnp.asarray(np.concatenate([prompt, tokens[:n]]))[None],
            jnp.asarray(steps.token_step_ids())[None],
            jnp.array([-1]),
            cfg=CFG,
            num_steps=16,
        )
        np.testing.assert_allclose(np.asarray(out["fci"][b]), np.asarray(ref["fci"][0]), atol=1e-6)


@pytest.mark.slow
def test_forked_continuations_equal_reprefilled_ones(params):
    """Two branch points of one response share one prefill; the same RNG gives the same continuations
    as prefilling each prefix from scratch."""
    settings = LoopSettings(max_new_tokens=8, sampling=SamplingParams(temperature=1.0))
    prompt = SRC[0, :7]
    response = np.array([20, 21, 22, 23, 24, 25, 26, 27])
    offsets = [2, 2, 5, 5]  # two samples at each of two offsets
    keys = jax.random.split(jax.random.key(5), 4)
    longest = np.concatenate([prompt, response[:5]])
    forked = _run(
        params,
        longest[None],
        [12],
        [0, 0, 0, 0],
        [7 + o for o in offsets],
        keys,
        settings,
        stop=-1,
        fci=[False] * 4,
    )
    separate = np.zeros((4, 12), np.int64)
    for i, o in enumerate(offsets):
        separate[i, : 7 + o] = np.concatenate([prompt, response[:o]])
    scratch = _run(
        params,
        separate,
        [7 + o for o in offsets],
        [0, 1, 2, 3],
        [7 + o for o in offsets],
        keys,
        settings,
        stop=-1,
        fci=[False] * 4,
    )
    np.testing.assert_array_equal(np.asarray(forked["tokens"]), np.asarray(scratch["tokens"]))
    np.testing.assert_allclose(np.asarray(forked["logprobs"]), np.asarray(scratch["logprobs"]), atol=1e-5)
    assert (
        len({tuple(t) for t in np.asarray(forked["tokens"]).tolist()}) > 1
    )  # the RNG streams differ per row


@pytest.mark.slow
def test_a_row_stops_at_its_own_length_limit_with_the_tokens_of_a_cut_run(params):
    """docs/algorithm.md section 3: a continuation at offset o may add max_new_tokens - o tokens. Capped rows
    sample exactly the first tokens of the same rows run uncapped (what the official run cuts to), end
    with reason "length" there, and pad after; an uncapped row in the same call is unchanged."""
    settings = LoopSettings(max_new_tokens=8, sampling=SamplingParams(temperature=1.0))
    keys = jax.random.split(jax.random.key(9), 4)
    common = (params, SRC, LENS, [0, 0, 1, 2], [7, 5, 3, 2], keys, settings)
    full = jax.tree.map(np.asarray, _run(*common, stop=-1))
    capped = jax.tree.map(np.asarray, _run(*common, stop=-1, row_max_new=[8, 3, 1, 20]))
    assert capped["lengths"].tolist() == [8, 3, 1, 8] and full["lengths"].tolist() == [8] * 4
    assert capped["finish_reason"].tolist() == [LENGTH] * 4
    for b, n in enumerate(capped["lengths"]):
        np.testing.assert_array_equal(capped["tokens"][b, :n], full["tokens"][b, :n])
        np.testing.assert_allclose(capped["logprobs"][b, :n], full["logprobs"][b, :n], atol=1e-5)
        assert (capped["tokens"][b, n:] == settings.pad_id).all()


@pytest.mark.slow
def test_continuous_batching_returns_exactly_the_static_result(params):
    """Item 1 of the sampler-at-scale issue: rows decoding in fewer slots than rows, entering source by
    source as slots free up, give the tokens, log-probs, entropies, FCI and step ids of the static call
    (every row at once), whatever the slot count, insertion group or cache size. Rows come unsorted, share
    prefixes at several offsets, stop on a token or at their own limits, and one is padding."""
    rng = np.random.default_rng(0)
    src = rng.integers(1, 60, (6, 12))
    lens = np.array([12, 5, 9, 3, 12, 7])
    row_src = np.repeat(np.arange(6), [3, 1, 2, 4, 2, 3])
    rng.shuffle(row_src)
    row_src = np.append(row_src, -1)  # a padding row: never sampled
    row_len = np.array([rng.integers(1, lens[s] + 1) if s >= 0 else 1 for s in row_src])
    b = len(row_src)
    sep = np.zeros(64, bool)
    sep[::3] = True  # a third of the vocabulary closes a step: many steps per row
    settings = LoopSettings(max_new_tokens=20, sampling=SamplingParams(temperature=1.0), num_steps=8, delta=1)
    common = dict(stop=63, sep=sep, fci=np.arange(b) % 2 == 0, row_max_new=rng.integers(1, 21, b).tolist())
    keys = jax.random.split(jax.random.key(5), b)
    # The most rows that track FCI one source has: fewer FCI slots than that could never take it.
    fci_most = max(int(common["fci"][row_src == j].sum()) for j in range(6))
    static = jax.tree.map(np.asarray, _run(params, src, lens, row_src, row_len, keys, settings, **common))
    assert static["lengths"][-1] == 0 and (static["tokens"][-1] == settings.pad_id).all()
    assert len(set(static["lengths"][:-1].tolist())) > 4 and np.abs(static["fci"]).max() > 0
    assert (static["finish_reason"][:-1] == EOS).any() and (static["finish_reason"][:-1] == LENGTH).any()
    for page, schedule in (
        (64, dict(slots=4, insert_sources=1, insert_rows=4)),
        (64, dict(slots=5, insert_sources=2)),
        (64, dict(slots=7, insert_sources=3, insert_rows=6, cache_size=40)),
        # Pages of 4 positions: rows share their prefix's full pages, and the page budget, not the slots,
        # decides when a source enters (the largest source needs 28 pages: 3 shared + 5 per row).
        (4, dict()),
        (4, dict(slots=16, pages=28, insert_sources=2)),
        (2, dict(slots=6, pages=40, insert_sources=1, insert_rows=5, cache_size=33)),
        # FCI state in only some slots: rows that track FCI wait for those, the others fill the rest.
        (4, dict(slots=8, fci_slots=fci_most, pages=40, insert_sources=2)),
        (64, dict(fci_slots=fci_most + 1)),
    ):
        paged = dataclasses.replace(settings, page_size=page)
        out = jax.tree.map(
            np.asarray, _run(params, src, lens, row_src, row_len, keys, paged, **common, **schedule)
        )
        for key, want in static.items():
            if want.dtype.kind == "f":
                np.testing.assert_allclose(
                    out[key], want, atol=1e-5, err_msg=f"{key} with {page}, {schedule}"
                )
            else:
                np.testing.assert_array_equal(out[key], want, err_msg=f"{key} with {page}, {schedule}")


def test_call_shapes_follow_the_cache_budget():
    """The shipped 1.5B config on 8 devices: the paper's first batch (64 prompts x 6 of 1,024 + 8,192
    tokens) fits the 12 GiB per device all at once (48 slots a device, and the 8 x 392 pages of its 8
    prompts, of the 3,471 pages of 128 positions the budget holds beside them; 392 pages a prompt: its 8
    shared ones and 64 per response); the off-policy call adding 4 continuations per response batches
    continuously with more rows at once than the 384 of the first batch, since a continuation shares its
    response's pages; a smaller budget splits a prompt's rows, and one below a row's need is refused naming
    the key."""
    from attnrl_jax.settings import loop_settings
    from benchmarks.scale_memory import paper_call, shipped_config

    c = shipped_config("1p5b")
    cfg = ModelConfig.preset("r1_distill_qwen_1p5b", dtype=c.model.dtype)
    settings = loop_settings(c)
    assert settings.page_size == 128
    page = 2 * 28 * 2 * 128 * 2 * 128  # K and V of 28 layers, 2 KV heads of 128 bf16 values, 128 positions
    first = plan_call(
        *paper_call(c, "first batch"), cfg=cfg, settings=settings, cache_gib=12.0, parallelism=8
    )
    assert (first.batch, first.sources, first.prefix, first.cache_size) == (512, 64, 1024, 9216)
    assert (first.slots, first.insert_sources, first.insert_rows) == (384, None, None)
    state = slot_bytes(cfg, settings, 9216, 2)
    assert (12 * GiB - 48 * state) // page == 3471 and first.pages == 8 * 392
    unlimited = plan_call(*paper_call(c, "first batch"), cfg=cfg, settings=settings)
    assert (unlimited.slots, unlimited.insert_sources, unlimited.insert_rows, unlimited.pages) == (
        512,
        None,
        None,
        None,
    )
    mixed = plan_call(*paper_call(c, "off-policy"), cfg=cfg, settings=settings, cache_gib=12.0, parallelism=8)
    assert (mixed.prefix, mixed.cache_size) == (9216, 9216)
    assert mixed.slots > 384 and mixed.slots % 8 == 0 and mixed.insert_sources % 8 == 0
    # FCI state only in as many slots as the new prompts' responses (48 a device), not in all 86.
    assert mixed.fci_slots == 384 and first.fci_slots == 384
    other = slot_bytes(cfg, settings, 9216, 2, fci=False)
    assert mixed.slots // 8 * other + 48 * (state - other) + mixed.pages * page <= 12 * GiB
    short = plan_call(
        [40, 30, 20],
        [(0, 40, 12), (1, 30, 12), (2, 20, 12)],
        cfg=CFG,
        settings=LoopSettings(max_new_tokens=12, page_size=16),
    )
    assert (short.prefix, short.cache_size) == (64, 80)  # the prompt bucket plus max_new_tokens, in pages
    # 1 GiB: 4 slots a device, fewer than a prompt's 6 responses: each prompt's rows split in 2 chunks of 3.
    small = plan_call(*paper_call(c, "first batch"), cfg=cfg, settings=settings, cache_gib=1.0, parallelism=8)
    assert (small.slots, small.shards, small.rows_per_source, small.sources, small.pages) == (
        32,
        8,
        4,
        128,
        289,
    )
    for gib, slots, pages in ((0.24, 1, 69), (0.2, 0, 58)):  # one row: a slot, its prompt's 8 pages and 64
        with pytest.raises(
            ValueError,
            match=rf"budget of {gib} GiB per device \(config\.sampler\.cache_gib.*holds {slots} decode "
            rf"slots and {pages} KV pages.* one row needs a slot and 72 pages",
        ):
            plan_call(*paper_call(c, "first batch"), cfg=cfg, settings=settings, cache_gib=gib, parallelism=8)


def test_page_bookkeeping_by_hand():
    """The page arithmetic of the paged cache, on numbers worked out by hand."""
    # Pages of 4 positions: a prefix of 6 writes positions 6.. ; 1 token touches page 1, 3 tokens page 1
    # and 2 (positions 6, 7, 8), 11 tokens pages 1-4 (positions 6..16); a prefix of 8 starts page 2.
    np.testing.assert_array_equal(
        pages_spanned(jnp.array([6, 6, 6, 8]), jnp.array([1, 3, 11, 4]), 4), [1, 2, 4, 1]
    )
    refs = jnp.array([[0, 2, 0, 0, 1], [1, 1, 1, 0, 0]])  # shard 0: pages 0, 2, 3 free; shard 1: 3, 4
    ids = take_free(refs, jnp.array([[0, 1, 2, 0], [1, 0, 2, 0]]), jnp.array([[1, 1, 1, 0], [1, 1, 1, 1]]))
    # Shard 0: ranks 0, 1, 2 -> pages 0, 2, 3 (the 4th not wanted: 5 = none); shard 1: rank 2 has no page.
    np.testing.assert_array_equal(ids, [[0, 2, 3, 5], [4, 3, 5, 3]])
    held = add_refs(refs, jnp.array([[0, 0, 5], [4, 5, 5]]), 1)  # page 0 twice; 5 = none
    np.testing.assert_array_equal(held, [[2, 2, 0, 0, 1], [1, 1, 1, 0, 1]])
    np.testing.assert_array_equal(available(held, jnp.array([[1, 0], [0, 0]])), [1, 1])


@pytest.mark.slow
def test_continuations_read_their_prefix_instead_of_copying_it(params):
    """Eight continuations of one 40-token prefix in pages of 4 positions: the 10 full pages of the prefix
    are written once and named by the page tables of every row that reads them; each row adds only its
    own pages (the copy of the page its prefix ends in, and the pages it samples into: 2 each here). A pool
    of exactly 10 + 8 x 2 pages holds them all at once (copies of the prefix would need at least 8 x 12),
    and they sample what they sample in a pool of plenty."""
    settings = LoopSettings(max_new_tokens=8, sampling=SamplingParams(temperature=1.0), page_size=4)
    prefix = np.random.default_rng(1).integers(1, 60, (1, 40))
    row_len = [40, 40, 40, 40, 38, 38, 37, 37]  # rows at 40 write from a new page; 38 and 37 inside page 9
    limit = [8, 8, 8, 8, 6, 6, 5, 5]  # positions 40..47 (pages 10, 11), 38..43 and 37..41 (pages 9, 10)
    keys = jax.random.split(jax.random.key(3), 8)
    args = (params, prefix, [40], [0] * 8, row_len, keys, settings)
    common = dict(stop=-1, fci=[False] * 8, row_max_new=limit)
    roomy = jax.tree.map(np.asarray, _run(*args, **common))
    need = 10 + 8 * 2  # the full pages of the longest prefix (positions 0..39), and 2 of each row's own
    tight = jax.tree.map(np.asarray, _run(*args, **common, pages=need))
    assert tight["lengths"].tolist() == limit
    np.testing.assert_array_equal(tight["tokens"], roomy["tokens"])
    # One page fewer and the source can never enter: its rows come back empty (the host refuses such a
    # budget before it gets here: test_call_shapes_follow_the_cache_budget).
    starved = jax.tree.map(np.asarray, _run(*args, **common, pages=need - 1))
    assert starved["lengths"].tolist() == [0] * 8


@pytest.mark.parametrize(
    "sampling",
    [SamplingParams(1.0, top_k=3), SamplingParams(1.0, top_p=0.7), SamplingParams(0.5, top_k=4, top_p=0.9)],
)
def test_top_k_top_p_support_and_frequencies(sampling):
    logits = jnp.array([2.0, 1.5, 1.0, 0.8, 0.2, -0.5, -1.0, -3.0])
    n = 20_000
    tokens, _, _ = sample_tokens(jnp.tile(logits, (n, 1)), jax.random.split(jax.random.key(0), n), sampling)
    probs = np.asarray(jax.nn.softmax(logits / sampling.temperature))
    order = np.argsort(-probs)
    allowed = np.zeros(8, bool)
    allowed[order[: sampling.top_k or 8]] = True
    if sampling.top_p < 1:
        renorm = np.where(allowed, probs, 0) / np.where(allowed, probs, 0).sum()
        before = np.cumsum(renorm[order]) - renorm[order]
        keep = np.zeros(8, bool)
        keep[order[before < sampling.top_p]] = True
        allowed &= keep
    counts = np.bincount(np.asarray(tokens), minlength=8)
    assert set(np.flatnonzero(counts)) == set(np.flatnonzero(allowed))  # support is exactly the allowed set
    expected = np.where(allowed, probs, 0) / np.where(allowed, probs, 0).sum()
    sigma = np.sqrt(n * expected * (1 - expected)) + 1e-9
    assert (np.abs(counts - n * expected) <= 5 * sigma).all(), (counts, n * expected)


def test_greedy_and_parameter_validation():
    logits = jnp.array([[0.1, 3.0, -1.0], [2.0, 0.0, 1.9]])
    tokens, logp, _ = sample_tokens(logits, jax.random.split(jax.random.key(0), 2), SamplingParams(0.0))
    np.testing.assert_array_equal(tokens, [1, 0])
    np.testing.assert_allclose(logp, jax.nn.log_softmax(logits)[jnp.arange(2), tokens], atol=1e-6)
    with pytest.raises(ValueError, match="top_p must lie in"):
        SamplingParams(top_p=0.0)


# ----------------------------------------------------------------------------------------------------
# FCI while decoding with a real tokenizer's "\n\n" separators and </think>


@pytest.mark.slow
def test_fci_while_decoding_equals_forward_pass_and_dense_formula(qwen_world):
    tok, model, cfg, params, table = qwen_world
    settings = LoopSettings(max_new_tokens=48, sampling=SamplingParams(temperature=1.0), num_steps=40)
    prompts = [
        tok.encode("Compute 2 + 2.", add_special_tokens=False),
        tok.encode("What is x?", add_special_tokens=False),
    ]
    src = np.zeros((2, 8), np.int64)
    for i, p in enumerate(prompts):
        src[i, : len(p)] = p
    lens = [len(p) for p in prompts]
    out = generate(
        params,
        jnp.asarray(src, jnp.int32),
        jnp.asarray(lens),
        jnp.array([0, 1, 0, 1]),
        jnp.asarray(lens * 2),
        jax.random.split(jax.random.key(7), 4),
        jnp.ones(4, bool),
        jnp.full((4, 1), -1, jnp.int32),
        jnp.asarray(table.double_newline),
        jnp.int32(table.think_end_id),
        cfg=cfg,
        settings=settings,
    )
    out = jax.tree.map(np.asarray, out)
    saw_think = False
    for b in range(4):
        prompt = prompts[b % 2]
        resp = out["tokens"][b, : out["lengths"][b]]
        assert "\n\n" in tok.decode(resp)  # the text really has steps
        steps = segment(resp, table, len(prompt))
        assert steps.num_steps >= 6 and out["num_steps"][b] == steps.num_steps
        assert out["think_step"][b] == steps.think_step
        saw_think |= steps.think_step > 0
        np.testing.assert_array_equal(out["step_ids"][b, : len(resp)], steps.token_step_ids()[len(prompt) :])
        seq = np.concatenate([prompt, resp])
        ids = steps.token_step_ids()
        fwd = forward_with_fci(
            params,
            jnp.asarray(seq)[None],
            jnp.asarray(ids)[None],
            jnp.array([steps.think_step]),
            cfg=cfg,
            num_steps=40,
        )
        np.testing.assert_allclose(out["fci"][b], np.asarray(fwd["fci"][0]), atol=1e-5)
        with torch.no_grad():
            attn = np.stack(
                [
                    a[0].numpy()
                    for a in model(input_ids=torch.tensor(seq[None]), output_attentions=True).attentions
                ]
            )
        dense, _ = fci_reference(attn, ids, steps.think_step)
        np.testing.assert_allclose(out["fci"][b, : len(dense)], dense, atol=1e-5)
        assert np.abs(dense).max() > 0
    assert saw_think, "no sample contained </think>; the zeroing rule was not exercised"


@pytest.mark.slow
def test_sampler_mixed_call_and_no_recompilation_within_a_bucket(qwen_world):
    tok, _, cfg, params, table = qwen_world
    settings = LoopSettings(max_new_tokens=12, sampling=SamplingParams(temperature=1.0), num_steps=16)
    sampler = Sampler(params, cfg, tok, settings, separators=table, stop_ids=[table.think_end_id])
    first = sampler.generate([tok.encode("a b c", add_special_tokens=False)], n=2, seed=1)
    compiled = generate._cache_size()
    response = list(first[0][0].tokens) + [11] * 8
    initial, conts = sampler.sample_mixed(
        [
            tok.encode("one two three four five", add_special_tokens=False),
            tok.encode("x", add_special_tokens=False),
        ],
        2,
        [ContinuationRequest(tok.encode("a b c", add_special_tokens=False), response[:6], [2, 4], 2)],
        seed=2,
    )
    assert generate._cache_size() == compiled  # same buckets: the compiled program is reused
    assert [len(x) for x in initial] == [2, 2] and len(conts[0]) == 2 and len(conts[0][1]) == 2
    for s in initial[0] + initial[1]:
        assert s.fci is not None and s.finish_reason in ("eos", "length") and s.text is not None
        assert len(s.tokens) == len(s.logprobs) <= 12
    assert all(c.fci is None for group in conts[0] for c in group)
    for o, group in zip([2, 4], conts[0]):  # section 3: the completed response stays within 12 tokens
        for c in group:
            assert len(c.tokens) <= 12 - o and c.text == tok.decode(c.tokens, skip_special_tokens=True)
            assert c.finish_reason == "eos" or len(c.tokens) == 12 - o  # cut exactly at the limit


@pytest.mark.slow
def test_a_sampler_under_a_small_cache_budget_batches_continuously_with_the_same_samples(qwen_world):
    """A budget of a few slots: the mixed call (initial responses with FCI and continuations at two
    offsets) runs continuously batched and returns the samples of the unlimited sampler."""
    tok, _, cfg, params, table = qwen_world
    settings = LoopSettings(
        max_new_tokens=12, sampling=SamplingParams(temperature=1.0), num_steps=16, page_size=16
    )
    kw = dict(separators=table, stop_ids=[table.think_end_id])
    unlimited = Sampler(params, cfg, tok, settings, **kw)
    prompts = [tok.encode(t, add_special_tokens=False) for t in ("a b c", "one two three four", "x")]
    response = list(unlimited.generate(prompts[:1], n=1, seed=1)[0][0].tokens) + [11] * 8
    request = [ContinuationRequest(prompts[0], response[:6], [2, 4], 2)]
    rows = [(i, 3, True, None, 12) for i in range(3) for _ in range(2)] + [(3, 5, False, None, 10)] * 4
    sources = [[1] * 3] * 3 + [[1] * 9]
    size = unlimited.plan(sources, rows)[0].cache_size
    # Rows need 1 page of 16 positions each, the continuations' source none of its own (5 < 16): a budget
    # of 5 mean rows is 5 slots and their 5 pages.
    budget = 5 * (slot_bytes(cfg, settings, size, 2) + page_bytes(cfg, settings)) / GiB
    small = Sampler(params, cfg, tok, settings, cache_gib=budget, **kw)
    shape = small.plan(sources, rows)[0]
    assert (shape.slots, shape.pages, shape.batch, shape.insert_sources, shape.insert_rows) == (
        5,
        5,
        16,
        1,
        4,
    )
    want = unlimited.sample_mixed(prompts, 2, request, seed=4)
    got = small.sample_mixed(prompts, 2, request, seed=4)
    flat = lambda res: [x for group in res[0] for x in group] + [x for r in res[1] for o in r for x in o]  # noqa: E731
    for a, b in zip(flat(want), flat(got), strict=True):
        np.testing.assert_array_equal(a.tokens, b.tokens)
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)
        assert (a.text, a.finish_reason, a.think_step) == (b.text, b.finish_reason, b.think_step)
        if a.fci is not None:
            np.testing.assert_allclose(a.fci, b.fci, atol=1e-5)
            np.testing.assert_array_equal(a.step_ids, b.step_ids)
    with pytest.raises(ValueError, match="cache_gib"):
        Sampler(params, cfg, tok, settings, cache_gib=budget / 10, **kw).generate(prompts, n=2)


@pytest.mark.slow
def test_sharded_sampler_gives_the_same_tokens(params):
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    sharder = Sharder(mesh)
    sharded = jax.device_put(params, sharder.tree_shardings(param_axes(CFG), params))
    settings = LoopSettings(max_new_tokens=8, sampling=SamplingParams(temperature=0.0), num_steps=8)
    src = np.tile(SRC, (2, 1))
    lens = LENS * 2
    keys = jax.random.split(jax.random.key(2), 8)
    rows = [0, 1, 2, 3, 4, 5, 0, 1]
    plain = _run(params, src, lens, rows, [lens[r] for r in rows], keys, settings, stop=-1)
    with_mesh = _run(
        sharded, src, lens, rows, [lens[r] for r in rows], keys, settings, stop=-1, sharder=sharder
    )
    np.testing.assert_array_equal(np.asarray(plain["tokens"]), np.asarray(with_mesh["tokens"]))
    np.testing.assert_allclose(np.asarray(plain["logprobs"]), np.asarray(with_mesh["logprobs"]), atol=1e-5)
    # The pool split over the 4-way batch axes (source j in shard j mod 4, its pages on that shard's
    # device), pages of 4 positions, 2 slots and 8 pages per shard: shard 0 has sources 0 and 4 (3 rows)
    # and runs them one source after the other; the result is the same.
    paged = _run(
        sharded,
        src,
        lens,
        rows,
        [lens[r] for r in rows],
        keys,
        dataclasses.replace(settings, page_size=4),
        stop=-1,
        sharder=sharder,
        slots=8,
        pages=8,
        insert_sources=4,
    )
    np.testing.assert_array_equal(np.asarray(plain["tokens"]), np.asarray(paged["tokens"]))
    np.testing.assert_allclose(np.asarray(plain["logprobs"]), np.asarray(paged["logprobs"]), atol=1e-5)
    # The Sampler's block layout: shard d's rows (those of sources j with j mod 4 = d) in block d of 4
    # rows, padding after them; each row's outputs come back at its position, split over the batch axes
    # (every device holds its own block, no device all of them).
    per, pos = block_layout(rows, 4)
    assert per == 4 and sorted(pos // per) == [0, 0, 0, 1, 1, 1, 2, 3]
    blocked = np.full(4 * per, -1)
    blocked[pos] = rows
    block_keys = jnp.concatenate([keys, jax.random.split(jax.random.key(9), 4 * per - 8)])
    block_keys = block_keys[np.argsort(np.concatenate([pos, np.setdiff1d(np.arange(4 * per), pos)]))]
    lens_b = [lens[r] if r >= 0 else 1 for r in blocked]
    out = _run(
        sharded,
        src,
        lens,
        blocked,
        lens_b,
        block_keys,
        settings,
        stop=-1,
        sharder=sharder,
        rows_per_shard=per,
    )
    np.testing.assert_array_equal(np.asarray(out["tokens"])[pos], np.asarray(plain["tokens"]))
    np.testing.assert_array_equal(np.asarray(out["lengths"])[blocked < 0], 0)
    assert out["tokens"].sharding.shard_shape(out["tokens"].shape)[0] == per
    # Eight samples of one prompt: more rows than a shard's 2 slots. The host splits the prompt's rows
    # into 4 chunks of 2, each its own source (the prompt prefilled once per chunk, on its shard's
    # device); the samples are those of one source with 8 rows.
    shape = plan_call([7], [(0, 7, 8)] * 8, cfg=CFG, settings=settings, parallelism=4)
    assert (shape.slots, shape.shards, shape.rows_per_source) == (8, 4, 2)
    source_of, chunk = chunk_sources(1, [0] * 8, shape.rows_per_source)
    assert (source_of, chunk) == ([0, 0, 0, 0], [0, 0, 1, 1, 2, 2, 3, 3])
    plain = _run(params, src, lens, [0] * 8, [7] * 8, keys, settings, stop=-1)
    split = _run(sharded, src[[0] * 4], [7] * 4, chunk, [7] * 8, keys, settings, stop=-1, sharder=sharder)
    assert (np.asarray(split["lengths"]) == 8).all()
    np.testing.assert_array_equal(np.asarray(plain["tokens"]), np.asarray(split["tokens"]))


@pytest.mark.slow
def test_fci_state_only_in_the_slots_of_rows_that_track_it(params):
    """Two FCI slots for four rows, two of which track FCI: the FCI rows decode in those slots, the others
    in the remaining ones; on the Pallas path the decode kernel runs with the step mass over the FCI
    slots and without it over the rest. Every output equals the call with FCI state in every slot."""
    settings = LoopSettings(
        max_new_tokens=10, sampling=SamplingParams(temperature=1.0), num_steps=8, delta=1, page_size=4
    )
    sep = jnp.asarray(np.arange(64) % 3 == 0)
    keys = jax.random.split(jax.random.key(6), 4)
    common = dict(stop=-1, sep=sep, fci=[False, True, False, True])
    args = (params, SRC, LENS, [0, 1, 2, 0], [7, 3, 2, 7], keys, settings)
    want = jax.tree.map(np.asarray, _run(*args, **common))
    assert np.abs(want["fci"][[1, 3]]).max() > 0 and (want["fci"][[0, 2]] == 0).all()
    assert (want["step_ids"][[0, 2]] == -1).all() and (want["step_ids"][[1, 3]] >= 1).all()
    runs = [
        jax.tree.map(np.asarray, _run(*args, **common, cfg=cfg, fci_slots=2))
        for cfg in (CFG, CFG.replace(attention_impl="pallas"))
    ]
    for cfg, got in zip((CFG, CFG.replace(attention_impl="pallas")), runs):
        for key, w in want.items():
            if w.dtype.kind == "f":
                np.testing.assert_allclose(got[key], w, atol=1e-5, err_msg=f"{key}, {cfg.attention_impl}")
            else:
                np.testing.assert_array_equal(got[key], w, err_msg=f"{key}, {cfg.attention_impl}")


@pytest.mark.slow
@pytest.mark.parametrize("segmentations", [1, 2], ids=["one-table", "newline-fallback"])
def test_pallas_decode_kernel_path_equals_the_xla_path(params, segmentations):
    """attention_impl="pallas": decode steps go through the paged Pallas decode kernel (interpreted on CPU),
    also with the sampler's default two segmentations (key steps [B, S, 2]), which the shipped configs use,
    and with pages of 4 positions, so that rows cross pages while decoding."""
    settings = LoopSettings(
        max_new_tokens=6,
        sampling=SamplingParams(temperature=1.0),
        num_steps=8,
        page_size=64 if segmentations == 1 else 4,
    )
    sep = np.arange(64) % 3 == 0
    sep = jnp.asarray(sep if segmentations == 1 else np.stack([sep, np.arange(64) % 2 == 0], -1))
    keys = jax.random.split(jax.random.key(4), 3)
    xla = _run(params, SRC, LENS, [0, 1, 2], LENS, keys, settings, stop=-1, sep=sep)
    pallas = _run(
        params,
        SRC,
        LENS,
        [0, 1, 2],
        LENS,
        keys,
        settings,
        stop=-1,
        sep=sep,
        cfg=CFG.replace(attention_impl="pallas"),
    )
    np.testing.assert_array_equal(np.asarray(xla["tokens"]), np.asarray(pallas["tokens"]))
    np.testing.assert_allclose(np.asarray(xla["logprobs"]), np.asarray(pallas["logprobs"]), atol=1e-5)
    np.testing.assert_allclose(np.asarray(xla["fci"]), np.asarray(pallas["fci"]), atol=1e-6)


@pytest.mark.slow
def test_newline_fallback_segmentation_while_decoding(params):
    """With [V, 2] separator tables, a response with no "\\n\\n" token uses the "\\n" segmentation, as
    section 4 prescribes, and its FCI equals the forward pass's on that segmentation."""
    double = np.zeros(64, bool)  # this vocabulary has no "\n\n" token at all
    single = np.arange(64) % 2 == 0
    table = SeparatorTable(double, single)
    settings = LoopSettings(max_new_tokens=32, sampling=SamplingParams(temperature=1.0), num_steps=40)
    keys = jax.random.split(jax.random.key(8), 3)
    out = _run(
        params, SRC, LENS, [0, 1, 2], LENS, keys, settings, stop=-1, sep=np.stack([double, single], -1)
    )
    out = jax.tree.map(np.asarray, out)
    for b in range(3):
        tokens = out["tokens"][b]
        steps = segment(tokens, table, LENS[b])  # falls back to "\n"
        assert steps.num_steps > 5 and out["num_steps"][b] == steps.num_steps and not out["needs_fallback"][b]
        np.testing.assert_array_equal(out["step_ids"][b], steps.token_step_ids()[LENS[b] :])
        seq = np.concatenate([SRC[b, : LENS[b]], tokens])
        ref = forward_with_fci(
            params,
            jnp.asarray(seq)[None],
            jnp.asarray(steps.token_step_ids())[None],
            jnp.array([-1]),
            cfg=CFG,
            num_steps=40,
        )
        np.testing.assert_allclose(out["fci"][b], np.asarray(ref["fci"][0]), atol=1e-5)
    # With only the "\n\n" table the same responses are one step and flagged.
    flagged = _run(params, SRC, LENS, [0, 1, 2], LENS, keys, settings, stop=-1, sep=double)
    assert np.asarray(flagged["needs_fallback"]).all() and (np.asarray(flagged["num_steps"]) == 1).all()
