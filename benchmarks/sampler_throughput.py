"""Sampler throughput on CPU: ours against transformers' PyTorch `generate` (KV cache, same weights), tree
continuations over their response's shared prefix pages against re-prefilling every continuation's
prefix, and continuous batching against static batching on rows of long-tailed lengths.

    python -m benchmarks.sampler_throughput [--hidden 256 --layers 4 --batch 8 --prompt 64 --new 128]
        [--parts transformers,tree,continuous] [--rows 64 --slots 16 --continuous-new 256] [--page 64]

Both generators sample the same number of tokens (no stop token), at temperature 1 (`--greedy`: argmax).
The FCI accumulation is on for our initial responses (it is part of what our sampler does), off for
continuations.

Continuous batching: `--rows` rows, each its own prompt, whose lengths follow a lognormal distribution like
R1's (median 0.3 of the limit `--continuous-new`, sigma 0.8, capped at the limit: most rows end early, a
few run to the limit; drawn with each of `--length-seeds` and imposed as per-row length limits). Three
schedules sample the same rows and must return the same tokens: static batching of every row at once (the
sampler before continuous batching), static batching in calls of `--slots` rows (the same memory as
continuous), and continuous batching in `--slots` slots. Next to each time is the decode work its
schedule implies (batch width x decode steps, where continuous batching's steps are those of first-come
first-served slot reuse in row order, the loop's policy): how far the time tracks the work is the
per-step overhead.
"""

from __future__ import annotations

import argparse
import heapq
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from attnrl_jax.model.hf_io import load_checkpoint
from attnrl_jax.sampling import LoopSettings, SamplingParams, generate
from attnrl_jax.sampling.pages import pages_spanned
from benchmarks.timing import median_seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--greedy", action="store_true", help="argmax instead of temperature-1 sampling")
    ap.add_argument("--page", type=int, default=64, help="positions per KV-cache page")
    ap.add_argument("--parts", default="transformers,tree,continuous")
    ap.add_argument("--rows", type=int, default=64, help="continuous part: rows")
    ap.add_argument("--slots", type=int, default=16, help="continuous part: decode slots")
    ap.add_argument("--continuous-new", type=int, default=256, help="continuous part: length limit")
    ap.add_argument(
        "--length-seeds", default="0", help="continuous part: comma-separated seeds of the lengths"
    )
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    if parts - {"transformers", "tree", "continuous"}:
        ap.error(f"--parts: unknown {sorted(parts - {'transformers', 'tree', 'continuous'})}")
    temperature = 0.0 if args.greedy else 1.0
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    hf = Qwen2Config(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 3,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=max(1, args.hidden // 128),
        max_position_embeddings=4096,
    )
    model = Qwen2ForCausalLM(hf).eval()
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        cfg, params, _ = load_checkpoint(d, remat="none")
    rng = np.random.default_rng(0)
    b, p, m = args.batch, args.prompt, args.new
    prompts = rng.integers(0, args.vocab, (b, p)).astype(np.int32)
    no_sep = jnp.zeros(args.vocab, bool)
    stop = jnp.full((b, 1), -1, jnp.int32)
    settings = LoopSettings(
        max_new_tokens=m, sampling=SamplingParams(temperature=temperature), num_steps=32, page_size=args.page
    )
    keys = jax.random.split(jax.random.key(0), b)

    def ours():
        out = generate(
            params,
            jnp.asarray(prompts),
            jnp.full((b,), p, jnp.int32),
            jnp.arange(b, dtype=jnp.int32),
            jnp.full((b,), p, jnp.int32),
            keys,
            jnp.ones(b, bool),
            stop,
            no_sep,
            jnp.int32(-1),
            cfg=cfg,
            settings=settings,
        )
        return jax.block_until_ready(out["tokens"])

    def theirs():
        with torch.inference_mode():
            return model.generate(
                torch.tensor(prompts, dtype=torch.long),
                attention_mask=torch.ones(b, p, dtype=torch.long),
                max_new_tokens=m,
                min_new_tokens=m,
                do_sample=not args.greedy,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                eos_token_id=None,
                pad_token_id=0,
                use_cache=True,
            )

    print(
        f"model hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}; "
        f"{os.cpu_count()} CPU threads, jax {jax.__version__}, torch {torch.__version__} on "
        f"{jax.devices()[0].platform}; {'greedy' if args.greedy else 'temperature 1'}"
    )
    if "transformers" in parts:
        assert ours().shape == (b, m) and theirs().shape == (b, p + m)
        if args.greedy:  # the same weights and argmax: the same tokens (float rounding may split a near-tie)
            same = (np.asarray(ours()) == theirs().numpy()[:, p:]).mean()
            print(f"greedy tokens equal to transformers': {same:.1%}")
        t_ours, t_theirs = median_seconds(ours, args.iters), median_seconds(theirs, args.iters)
        n = b * m
        print(f"\nbatch {b}, prompt {p}, {m} new tokens")
        print(f"{'sampler':<44}{'s':>8}{'tokens/s':>10}")
        print(f"{'attnrl_jax (jitted while_loop, FCI on)':<44}{t_ours:>8.2f}{n / t_ours:>10.0f}")
        print(f"{'transformers generate (PyTorch, KV cache)':<44}{t_theirs:>8.2f}{n / t_theirs:>10.0f}")
        print(f"ratio ours / transformers: {t_theirs / t_ours:.2f}x")
    if "tree" in parts:
        tree(args, params, cfg, rng, no_sep, temperature)
    if "continuous" in parts:
        continuous(args, params, cfg, no_sep, temperature)


def tree(args, params, cfg, rng, no_sep, temperature) -> None:
    b, p, m = args.batch, args.prompt, args.new

    # Tree continuations: each response prefilled once and forked, or every prefix prefilled on its own.
    resp_len, cont_new = 4 * p, m // 2
    responses = rng.integers(0, args.vocab, (b, p + resp_len)).astype(np.int32)
    offsets = [resp_len // 4, resp_len // 2]
    rows = [(i, p + o) for i in range(b) for o in offsets for _ in range(2)]  # 2 samples per branch point
    nb = len(rows)
    ckeys = jax.random.split(jax.random.key(1), nb)
    cset = LoopSettings(
        max_new_tokens=cont_new,
        sampling=SamplingParams(temperature=temperature),
        num_steps=8,
        page_size=args.page,
    )
    cstop = jnp.full((nb, 1), -1, jnp.int32)
    lens = jnp.asarray([n_ for _, n_ in rows], jnp.int32)
    longest = responses[:, : p + max(offsets)]
    separate = np.zeros((nb, longest.shape[1]), np.int32)
    for k, (i, n_) in enumerate(rows):
        separate[k, :n_] = responses[i, :n_]

    def forked():
        out = generate(
            params,
            jnp.asarray(longest),
            jnp.full((b,), longest.shape[1], jnp.int32),
            jnp.asarray([i for i, _ in rows], jnp.int32),
            lens,
            ckeys,
            jnp.zeros(nb, bool),
            cstop,
            no_sep,
            jnp.int32(-1),
            cfg=cfg,
            settings=cset,
        )
        return jax.block_until_ready(out["tokens"])

    def reprefilled():
        out = generate(
            params,
            jnp.asarray(separate),
            lens,
            jnp.arange(nb, dtype=jnp.int32),
            lens,
            ckeys,
            jnp.zeros(nb, bool),
            cstop,
            no_sep,
            jnp.int32(-1),
            cfg=cfg,
            settings=cset,
        )
        return jax.block_until_ready(out["tokens"])

    np.testing.assert_array_equal(np.asarray(forked()), np.asarray(reprefilled()))  # same continuations
    t_fork, t_re = median_seconds(forked, args.iters), median_seconds(reprefilled, args.iters)
    print(
        f"\ntree continuations: {b} responses x {len(offsets)} branch points x 2 samples = {nb} rows, "
        f"prefixes up to {longest.shape[1]} tokens, {cont_new} new tokens each"
    )
    # KV pages each arm holds with every row at once: a response's full prefix pages once for all its
    # rows, or each row's whole prefix; plus each row's own (the page its prefix ends in, and its tokens).
    page = args.page
    own = sum(int(pages_spanned(n_, cont_new, page)) for _, n_ in rows)
    shared = b * ((max(offsets) + p) // page) + own
    copied = sum(n_ // page for _, n_ in rows) + own
    print(f"{'arm':<44}{'s':>8}{'KV pages':>10}")
    print(f"{'shared prefix pages (prefill once per response)':<44}{t_fork:>8.2f}{shared:>10}")
    print(f"{'re-prefill every continuation':<44}{t_re:>8.2f}{copied:>10}")
    print(f"ratio shared / re-prefilled speed: {t_re / t_fork:.2f}x; pages {copied / shared:.2f}x fewer")


def fcfs_steps(limits: np.ndarray, slots: int, group: int) -> int:
    """Decode steps until the last row ends when each row holds a slot for its length and rows enter in
    order, `group` at a time, as soon as `group` slots are free (the policy of `generate` with one row per
    source and `insert_sources = insert_rows = group`)."""
    ends = [0] * slots
    for i in range(0, len(limits), group):
        chunk = limits[i : i + group]
        start = max(heapq.heappop(ends) for _ in chunk)
        for length in chunk:
            heapq.heappush(ends, start + int(length))
    return max(ends)


def continuous(args, params, cfg, no_sep, temperature) -> dict[str, float]:
    """Static vs continuous batching on long-tailed row lengths (module docstring), for each length seed;
    returns the two ratios per seed."""
    ratios = {}
    for seed in (int(x) for x in args.length_seeds.split(",")):
        ratios[seed] = continuous_once(args, params, cfg, no_sep, temperature, seed)
    if len(ratios) > 1:
        for i, name in enumerate(("static all at once", f"static calls of {args.slots}")):
            r = np.array([v[i] for v in ratios.values()])
            print(
                f"continuous / {name} over length seeds {sorted(ratios)}: mean {r.mean():.2f}x, "
                f"min {r.min():.2f}x, max {r.max():.2f}x"
            )
    return ratios


def continuous_once(args, params, cfg, no_sep, temperature, seed) -> tuple[float, float]:
    rows, slots, m, p = args.rows, args.slots, args.continuous_new, args.prompt
    rng = np.random.default_rng(seed)
    limits = np.clip(np.round(np.exp(rng.normal(np.log(0.3 * m), 0.8, rows))), 1, m).astype(np.int32)
    prompts = rng.integers(0, args.vocab, (rows, p)).astype(np.int32)
    keys = jax.random.split(jax.random.key(2), rows)
    settings = LoopSettings(
        max_new_tokens=m, sampling=SamplingParams(temperature=temperature), num_steps=32, page_size=args.page
    )

    def call(lo, hi, **schedule):
        k = hi - lo
        return generate(
            params,
            jnp.asarray(prompts[lo:hi]),
            jnp.full((k,), p, jnp.int32),
            jnp.arange(k, dtype=jnp.int32),
            jnp.full((k,), p, jnp.int32),
            keys[lo:hi],
            jnp.ones(k, bool),
            jnp.full((k, 1), -1, jnp.int32),
            no_sep,
            jnp.int32(-1),
            jnp.asarray(limits[lo:hi]),
            cfg=cfg,
            settings=settings,
            **schedule,
        )["tokens"]

    def static_all():
        return jax.block_until_ready(call(0, rows))

    def static_chunks():
        return jax.block_until_ready(
            jnp.concatenate([call(i, min(i + slots, rows)) for i in range(0, rows, slots)])
        )

    group = max(1, slots // 8)

    def continuous_slots():
        return jax.block_until_ready(call(0, rows, slots=slots, insert_sources=group, insert_rows=group))

    want = np.asarray(static_all())
    for fn in (static_chunks, continuous_slots):
        np.testing.assert_array_equal(np.asarray(fn()), want)  # the same tokens under every schedule
    tokens = int(limits.sum())
    print(
        f"\ncontinuous batching, length seed {seed}: {rows} rows (prompt {p}), lengths lognormal (median "
        f"{0.3 * m:.0f}, sigma 0.8) capped at {m}: mean {limits.mean():.0f}, max {limits.max()}, {tokens} "
        f"tokens; {slots} slots"
    )
    print(f"{'schedule':<40}{'s':>8}{'tokens/s':>10}{'width x steps':>16}")
    times = {}
    for name, fn, work in (
        (f"static, all {rows} rows at once", static_all, (rows, int(limits.max()))),
        (
            f"static, calls of {slots} rows",
            static_chunks,
            (slots, sum(int(limits[i : i + slots].max()) for i in range(0, rows, slots))),
        ),
        (f"continuous, {slots} slots", continuous_slots, (slots, fcfs_steps(limits, slots, group))),
    ):
        times[name] = median_seconds(fn, args.iters)
        print(f"{name:<40}{times[name]:>8.2f}{tokens / times[name]:>10.0f}{f'{work[0]} x {work[1]}':>16}")
    t = list(times.values())
    print(
        f"ratio continuous / static all at once: {t[0] / t[2]:.2f}x; "
        f"continuous / static calls of {slots}: {t[1] / t[2]:.2f}x"
    )
    return t[0] / t[2], t[1] / t[2]


if __name__ == "__main__":
    main()
