"""One on-policy rollout of AttnRL (or a baseline): initial responses with FCI, rewards, the choice of
responses and branch points, continuations from forked caches, rewards, trees, paths, training rows.

This is the host-side glue between the sampler (ALGORITHM.md sections 3-6), the verifier (section 12) and
the algorithm core (sections 6-9, 14); the trainer calls it once per step (on-policy) or splits it around
the sampler's mixed call (one-step off-policy).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from attnrl_jax.algo import (
    AlgoConfig,
    Continuation,
    Response,
    RunningMean,
    Steps,
    branch_points,
    build_prompt_trees,
    filter_zero_variance,
    grpo_advantages,
    plan_expansion,
    prompt_mean_fci,
    prompt_paths,
    valid_token_count,
)
from attnrl_jax.data import Problem
from attnrl_jax.rl.batch import build_train_batch, paths_to_train_batch
from attnrl_jax.rl.train_step import TrainBatch
from attnrl_jax.sampling.sampler import ContinuationRequest, Sample, Sampler


def sample_steps(sample: Sample, prompt_len: int) -> Steps:
    """The step segmentation of an initial response from the sampler's per-token step ids."""
    ids = np.asarray(sample.step_ids)
    if len(ids) == 0:
        return Steps(np.zeros(1, np.int64), -1, prompt_len)
    starts = np.flatnonzero(np.diff(ids) != 0) + 1
    bounds = np.concatenate([[0], starts, [len(ids)]]).astype(np.int64)
    return Steps(bounds, sample.think_step, prompt_len)


@dataclasses.dataclass
class RolloutResult:
    batch: TrainBatch | None  # None when every prompt was filtered out
    metrics: dict[str, float]
    running_fci: RunningMean
    num_paths: int


def rollout(
    sampler: Sampler,
    score,  # (texts: list[str], ground_truths: list) -> list of 0/1
    problems: Sequence[Problem],
    algo: AlgoConfig,
    running_fci: RunningMean,
    *,
    seed: int,
    row_length: int,
    rows_multiple: int = 1,
) -> RolloutResult:
    """One step's rollouts for `problems` (on-policy: two sampler calls).

    Args:
      sampler: the host sampler (its settings give max new tokens and sampling).
      score: the verifier (e.g. `lambda t, g: [v.acc for v in pool.score(t, g)]`).
      problems: this step's prompts.
      algo: the method (AttnRL, GRPO, TreeRL, ...).
      running_fci: R-bar of the FCI filter before this step.
      seed: this step's sampling seed.
      row_length: training row length (prompt + response must fit).
      rows_multiple: pad the batch rows to a multiple of this (micro-batches).
    """
    g = algo.group_size
    prompts = [sampler.encode_prompt(p.question) for p in problems]
    initial = sampler.generate(prompts, n=g, seed=seed)
    texts = [s.text for group in initial for s in group]
    gts = [p.ground_truth for p in problems for _ in range(g)]
    accs = np.asarray(score(texts, gts), np.float64).reshape(len(problems), g)
    metrics = {
        "accuracy": float(accs.mean()),
        "reward": float((2 * accs - 1).mean()),
        "prompt_batch": len(problems),
    }

    if algo.estimator == "grpo":
        adv = grpo_advantages(accs, normalize_std=algo.grpo_normalize_std)
        seqs = [(prompts[q], initial[q][i], adv[q, i]) for q in range(len(problems)) for i in range(g)]
        rows = -(-len(seqs) // rows_multiple) * rows_multiple
        batch = build_train_batch(
            [s[0] for s in seqs],
            [s[1].tokens for s in seqs],
            [np.full(len(s[1].tokens), s[2]) for s in seqs],
            [s[1].logprobs for s in seqs],
            row_length,
            rows=rows,
        )
        metrics["num_paths"] = len(seqs)
        return RolloutResult(batch, metrics, running_fci, len(seqs))

    rng = np.random.default_rng(seed)
    steps = [[sample_steps(s, len(prompts[q])) for s in initial[q]] for q in range(len(problems))]
    fcis = [
        [np.asarray(s.fci)[1 : st.num_steps + 1] for s, st in zip(initial[q], steps[q])]
        for q in range(len(problems))
    ]
    plan = plan_expansion(
        accs, np.array([prompt_mean_fci(f) for f in fcis]), running_fci, rng, algo.expansion
    )
    requests, owners = [], []
    for q, chosen in enumerate(plan.branched):
        for i in chosen:
            s = initial[q][i]
            offsets = branch_points(algo, steps[q][i], fci=fcis[q][i], entropy=s.entropies, rng=rng)
            if len(offsets):
                requests.append(
                    ContinuationRequest(
                        prompts[q], list(s.tokens), [int(o) for o in offsets], algo.continuations
                    )
                )
                owners.append((q, i))
    _, conts = sampler.sample_mixed([], 0, requests, seed=seed + 1) if requests else ([], [])
    flat = [(k, j, c) for k, per_req in enumerate(conts) for j, group in enumerate(per_req) for c in group]
    cont_accs = (
        score([c.text for _, _, c in flat], [problems[owners[k][0]].ground_truth for k, _, _ in flat])
        if flat
        else []
    )
    by_response: dict[tuple[int, int], list[Continuation]] = {}
    for (k, j, c), acc in zip(flat, cont_accs):
        by_response.setdefault(owners[k], []).append(
            Continuation(requests[k].offsets[j], c.tokens, c.logprobs, float(acc))
        )

    paths = []
    for q in range(len(problems)):
        if plan.dropped[q]:
            continue
        responses = [
            Response(s.tokens, s.logprobs, float(accs[q, i]), tuple(by_response.get((q, i), ())))
            for i, s in enumerate(initial[q])
        ]
        paths += prompt_paths(
            q, responses, build_prompt_trees(responses), max_len=row_length - len(prompts[q])
        )
    kept, dropped_prompts = filter_zero_variance(paths)
    metrics.update(
        num_paths=len(kept),
        prompts_dropped_fci=int(plan.dropped.sum()),
        prompts_dropped_zero_variance=len(dropped_prompts),
        continuation_accuracy=float(np.mean(cont_accs)) if len(cont_accs) else 0.0,
        valid_token_ratio=valid_token_count(kept) / max(sum(len(p.tokens) for p in kept), 1),
        fci_running_mean=plan.running_mean.mean,
    )
    if not kept:
        return RolloutResult(None, metrics, plan.running_mean, 0)
    rows = -(-len(kept) // rows_multiple) * rows_multiple
    return RolloutResult(
        paths_to_train_batch(prompts, kept, row_length, rows=rows), metrics, plan.running_mean, len(kept)
    )
