"""Rollouts of AttnRL (or a baseline): initial responses with FCI, rewards, the choice of responses and
branch points, continuations over shared prefix pages, rewards, trees, paths, training rows.

This is the host-side glue between the sampler (docs/algorithm.md sections 3-6), the verifier (section 12) and
the algorithm core (sections 6-9, 14), in three phases:

  `sample_initial`  -> an `InitialBatch` (prompts, G responses each, rewards being scored asynchronously);
  `plan_branches`   -> which responses to branch, where (needs the initial rewards);
  `finish`          -> continuation rewards, trees, paths, the training batch.

`rollout` runs them on-policy (two sampler calls per step). `offpolicy_step` is one step of the one-step
off-policy pipeline of section 10: a single `Sampler.sample_mixed` call samples the next prompt batch's
initial responses together with the continuations of the current one, whose initial responses were
sampled one step earlier. The `InitialBatch` carried between steps is the pipeline's in-flight batch;
`checkpoint.inflight_to_arrays` / `inflight_from_arrays` put it into checkpoints.

`score` is the verifier: `(texts, ground_truths) -> list` of 0/1 accuracies or `Verdict`s, or a future of
one (`VerifierPool.submit`), which is then collected only when the algorithm needs it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

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
from attnrl_jax.algo.expansion import ExpansionPlan
from attnrl_jax.data import Problem
from attnrl_jax.rl.batch import build_train_batch, paths_to_train_batch
from attnrl_jax.rl.train_step import TrainBatch
from attnrl_jax.sampling.sampler import ContinuationRequest, Sample, Sampler


def _mean_entropy(samples) -> float:
    entropies = np.concatenate([np.asarray(s.entropies, np.float64) for s in samples] + [np.zeros(0)])
    return float(entropies.mean()) if entropies.size else 0.0


def sample_steps(sample: Sample, prompt_len: int) -> Steps:
    """The step segmentation of an initial response from the sampler's per-token step ids."""
    ids = np.asarray(sample.step_ids)
    if len(ids) == 0:
        return Steps(np.zeros(1, np.int64), -1, prompt_len)
    starts = np.flatnonzero(np.diff(ids) != 0) + 1
    bounds = np.concatenate([[0], starts, [len(ids)]]).astype(np.int64)
    return Steps(bounds, sample.think_step, prompt_len)


def _collect(scored) -> tuple[np.ndarray, dict[str, int]]:
    """0/1 accuracies from a list of numbers or Verdicts, or from a future of one, how many verdicts were
    timeouts or errors (the verifier scores those 0; they are counted, never hidden), and how many worker
    restarts the verifier needed to produce them."""
    if hasattr(scored, "result"):
        scored = scored.result()
    reasons = [getattr(v, "reason", "") for v in scored]
    counts = {
        "timeouts": reasons.count("timeout"),
        "errors": reasons.count("error"),
        "restarts": sum(getattr(v, "restarts", 0) for v in scored),
    }
    return np.asarray([getattr(v, "acc", v) for v in scored], np.float64), counts


Scorer = Callable[[list, list], Any]


@dataclasses.dataclass
class InitialBatch:
    """A prompt batch with its G initial responses each: the off-policy pipeline's in-flight batch.

    `scored` holds the verifier's answer (or a future of it) until `accs()` collects it.
    """

    problems: list[Problem]
    prompts: list[list[int]]
    samples: list[list[Sample]]
    scored: Any
    verifier: dict[str, int] | None = None  # timeouts, errors and worker restarts of the scored verdicts

    def accs(self) -> np.ndarray:
        """[P, G] 0/1 accuracies of the initial responses (waits for the verifier once)."""
        if not isinstance(self.scored, np.ndarray):
            accs, self.verifier = _collect(self.scored)
            self.scored = accs.reshape(len(self.problems), -1)
        if self.verifier is None:  # built from accuracies directly
            self.verifier = {"timeouts": 0, "errors": 0, "restarts": 0}
        return self.scored


def encode_problems(sampler: Sampler, problems: Sequence[Problem]) -> list[list[int]]:
    return [sampler.encode_prompt(p.question) for p in problems]


def start_initial(
    problems: Sequence[Problem], prompts: list[list[int]], samples: list[list[Sample]], score: Scorer
) -> InitialBatch:
    """Wraps freshly sampled initial responses and hands them to the verifier (asynchronously if it can)."""
    g = len(samples[0]) if samples else 0
    texts = [s.text for group in samples for s in group]
    gts = [p.ground_truth for p in problems for _ in range(g)]
    return InitialBatch(list(problems), prompts, samples, score(texts, gts))


def sample_initial(
    sampler: Sampler, problems: Sequence[Problem], group_size: int, score: Scorer, *, seed: int
) -> InitialBatch:
    """G initial responses per problem (one sampler call), with their scoring started."""
    prompts = encode_problems(sampler, problems)
    return start_initial(problems, prompts, sampler.generate(prompts, n=group_size, seed=seed), score)


@dataclasses.dataclass
class BranchPlan:
    """The continuations to sample for an `InitialBatch` (empty for GRPO)."""

    expansion: ExpansionPlan | None
    requests: list[ContinuationRequest]
    owners: list[tuple[int, int]]  # (prompt, response) of each request


def plan_branches(
    batch: InitialBatch, algo: AlgoConfig, running_fci: RunningMean, rng: np.random.Generator
) -> BranchPlan:
    """Sections 6-7: which initial responses to branch (difficulty, FCI filter) and where (ATB, ...)."""
    if algo.estimator == "grpo":
        return BranchPlan(None, [], [])
    accs = batch.accs()
    steps = [[sample_steps(s, len(batch.prompts[q])) for s in group] for q, group in enumerate(batch.samples)]
    fcis = [
        [np.asarray(s.fci)[1 : st.num_steps + 1] for s, st in zip(group, steps[q])]
        for q, group in enumerate(batch.samples)
    ]
    plan = plan_expansion(
        accs, np.array([prompt_mean_fci(f) for f in fcis]), running_fci, rng, algo.expansion
    )
    requests, owners = [], []
    for q, chosen in enumerate(plan.branched):
        for i in chosen:
            s = batch.samples[q][i]
            offsets = branch_points(algo, steps[q][i], fci=fcis[q][i], entropy=s.entropies, rng=rng)
            if len(offsets):
                requests.append(
                    ContinuationRequest(
                        batch.prompts[q], list(s.tokens), [int(o) for o in offsets], algo.continuations
                    )
                )
                owners.append((q, i))
    return BranchPlan(plan, requests, owners)


@dataclasses.dataclass
class RolloutResult:
    batch: TrainBatch | None  # None when every prompt was filtered out
    metrics: dict[str, float]
    running_fci: RunningMean
    num_paths: int


def finish(
    batch: InitialBatch,
    branch: BranchPlan,
    conts: list[list[list[Sample]]],
    score: Scorer,
    algo: AlgoConfig,
    running_fci: RunningMean,
    *,
    row_length: int,
    rows_multiple: int = 1,
) -> RolloutResult:
    """Sections 8 and 14: continuation rewards, trees (or GRPO groups), paths, filtering, training rows."""
    problems, prompts, initial = batch.problems, batch.prompts, batch.samples
    accs = batch.accs()
    g = accs.shape[1]
    flat_initial = [s for group in initial for s in group]
    metrics = {
        "accuracy": float(accs.mean()),
        "reward": float((2 * accs - 1).mean()),
        "prompt_batch": len(problems),
        "response_length": float(np.mean([len(s.tokens) for s in flat_initial])),
        # The policy's mean token entropy where it sampled (its exploration), and the all-correct prompts
        # (those the FCI filter may drop: `prompts_dropped_fci` of them were).
        "entropy": _mean_entropy(flat_initial),
        "prompts_all_correct": int((accs.min(axis=1) == 1).sum()),
        "initial_tokens": sum(len(s.tokens) for s in flat_initial),
        # Initial responses whose steps overflowed the FCI buckets (config.algo.fci_buckets), and those
        # with no step separator at all (section 4's fallback segmentation: every token a step).
        "step_overflow": sum(s.step_overflow > 0 for s in flat_initial),
        "needs_fallback": sum(bool(s.needs_fallback) for s in flat_initial),
        "verifier_timeouts": batch.verifier["timeouts"],
        "verifier_errors": batch.verifier["errors"],
        "verifier_restarts": batch.verifier["restarts"],
    }
    if algo.estimator == "grpo":
        adv = grpo_advantages(accs, normalize_std=algo.grpo_normalize_std)
        seqs = [(prompts[q], initial[q][i], adv[q, i]) for q in range(len(problems)) for i in range(g)]
        rows = -(-len(seqs) // rows_multiple) * rows_multiple
        train = build_train_batch(
            [s[0] for s in seqs],
            [s[1].tokens for s in seqs],
            [np.full(len(s[1].tokens), s[2]) for s in seqs],
            [s[1].logprobs for s in seqs],
            row_length,
            rows=rows,
        )
        nonzero = sum(len(s[1].tokens) for s in seqs if s[2] != 0)
        metrics.update(
            num_paths=len(seqs),
            valid_token_ratio=nonzero / max(sum(len(s[1].tokens) for s in seqs), 1),
        )
        return RolloutResult(train, metrics, running_fci, len(seqs))

    flat = [(k, j, c) for k, per_req in enumerate(conts) for j, group in enumerate(per_req) for c in group]
    problem_of = [branch.owners[k][0] for k, _, _ in flat]
    cont_accs, counts = (
        _collect(score([c.text for _, _, c in flat], [problems[q].ground_truth for q in problem_of]))
        if flat
        else ([], {"timeouts": 0, "errors": 0, "restarts": 0})
    )
    metrics["verifier_timeouts"] += counts["timeouts"]
    metrics["verifier_errors"] += counts["errors"]
    metrics["verifier_restarts"] += counts["restarts"]
    plan = branch.expansion
    paths = []
    for q, responses in enumerate(prompt_responses(batch, branch, conts, cont_accs)):
        if plan.dropped[q]:
            continue
        paths += prompt_paths(
            q, responses, build_prompt_trees(responses), max_len=row_length - len(prompts[q])
        )
    kept, dropped_prompts = filter_zero_variance(paths)
    fci_means = [
        float(np.mean(s.fci[1:])) for group in initial for s in group if s.fci is not None and len(s.fci) > 1
    ]
    metrics.update(
        num_paths=len(kept),
        num_continuations=len(flat),
        continuation_tokens=sum(len(c.tokens) for _, _, c in flat),
        prompts_dropped_fci=int(plan.dropped.sum()),
        prompts_dropped_zero_variance=len(dropped_prompts),
        continuation_accuracy=float(np.mean(cont_accs)) if len(cont_accs) else 0.0,
        valid_token_ratio=valid_token_count(kept) / max(sum(len(p.tokens) for p in kept), 1),
        fci_running_mean=plan.running_mean.mean,
        fci_mean=float(np.mean(fci_means)) if fci_means else 0.0,
        fci_max=float(
            max((float(np.max(s.fci)) for group in initial for s in group if s.fci is not None), default=0.0)
        ),
    )
    if not kept:
        return RolloutResult(None, metrics, plan.running_mean, 0)
    rows = -(-len(kept) // rows_multiple) * rows_multiple
    return RolloutResult(
        paths_to_train_batch(prompts, kept, row_length, rows=rows), metrics, plan.running_mean, len(kept)
    )


def prompt_responses(
    batch: InitialBatch, branch: BranchPlan, conts: list[list[list[Sample]]], cont_accs: Sequence[float]
) -> list[list[Response]]:
    """Per prompt, its initial responses with their scored continuations attached (the input of
    `build_prompt_trees`); `cont_accs` follows the order request -> offset -> sample."""
    accs = batch.accs()
    by_response: dict[tuple[int, int], list[Continuation]] = {}
    flat = [(k, j, c) for k, per_req in enumerate(conts) for j, group in enumerate(per_req) for c in group]
    for (k, j, c), acc in zip(flat, cont_accs):
        by_response.setdefault(branch.owners[k], []).append(
            Continuation(branch.requests[k].offsets[j], c.tokens, c.logprobs, float(acc))
        )
    return [
        [
            Response(s.tokens, s.logprobs, float(accs[q, i]), tuple(by_response.get((q, i), ())))
            for i, s in enumerate(group)
        ]
        for q, group in enumerate(batch.samples)
    ]


def rollout(
    sampler: Sampler,
    score: Scorer,
    problems: Sequence[Problem],
    algo: AlgoConfig,
    running_fci: RunningMean,
    *,
    seed: int,
    row_length: int,
    rows_multiple: int = 1,
) -> RolloutResult:
    """One on-policy step's rollouts for `problems` (two sampler calls: initial, then continuations).

    Args:
      sampler: the host sampler (its settings give max new tokens and sampling).
      score: the verifier (module docstring).
      problems: this step's prompts.
      algo: the method (AttnRL, GRPO, TreeRL, ...).
      running_fci: R-bar of the FCI filter before this step.
      seed: this step's sampling seed.
      row_length: training row length (prompt + response must fit).
      rows_multiple: pad the batch rows to a multiple of this (micro-batches).
    """
    batch = sample_initial(sampler, problems, algo.group_size, score, seed=seed)
    branch = plan_branches(batch, algo, running_fci, np.random.default_rng(seed))
    conts = sampler.sample_mixed([], 0, branch.requests, seed=seed + 1)[1] if branch.requests else []
    return finish(
        batch, branch, conts, score, algo, running_fci, row_length=row_length, rows_multiple=rows_multiple
    )


def offpolicy_step(
    sampler: Sampler,
    score: Scorer,
    current: InitialBatch,
    next_problems: Sequence[Problem],
    algo: AlgoConfig,
    running_fci: RunningMean,
    *,
    seed: int,
    row_length: int,
    rows_multiple: int = 1,
) -> tuple[RolloutResult, InitialBatch]:
    """One step of the one-step off-policy pipeline (section 10) with ONE sampler call.

    `current` holds prompts whose initial responses were sampled one step earlier (by the policy one
    update older). Its branches are planned from its rewards, then one `sample_mixed` call with the
    current weights samples `next_problems`' initial responses and `current`'s continuations. The next
    batch's rewards are started asynchronously; `current` is finished into training rows. Each token keeps
    its true behaviour log-prob. Returns (current's result, the next in-flight batch).
    """
    branch = plan_branches(current, algo, running_fci, np.random.default_rng(seed))
    prompts = encode_problems(sampler, next_problems)
    initial, conts = sampler.sample_mixed(prompts, algo.group_size, branch.requests, seed=seed)
    following = start_initial(next_problems, prompts, initial, score)
    result = finish(
        current, branch, conts, score, algo, running_fci, row_length=row_length, rows_multiple=rows_multiple
    )
    return result, following
