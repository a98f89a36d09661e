"""One on-policy rollout per method on a tiny Qwen2 over the real Qwen vocabulary (it writes steps, a few
</think> and sometimes the answer "2"), scored by the real verifier, into a train step that changes the
parameters at ratio 1."""

import jax
import numpy as np
import pytest

from attnrl_jax.algo import AlgoConfig, AtbSettings, RunningMean
from attnrl_jax.data import Problem
from attnrl_jax.rewards import grade
from attnrl_jax.rl import LossConfig, OptimConfig, init_train_state, make_optimizer, train_step
from attnrl_jax.rollout import rollout
from attnrl_jax.sampling import LoopSettings, Sampler, SamplingParams


def _score(texts, gts):
    return [grade(t, g).acc for t, g in zip(texts, gts)]


@pytest.mark.parametrize(
    "algo",
    [
        AlgoConfig(group_size=4, atb=AtbSettings(token_distance=0)),
        AlgoConfig.treerl().replace(group_size=4),
        AlgoConfig.grpo().replace(group_size=4),
    ],
    ids=["attnrl", "treerl", "grpo"],
)
@pytest.mark.slow
def test_rollout_to_update(qwen_world, algo):
    tok, _, cfg, params, table = qwen_world
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    settings = LoopSettings(max_new_tokens=10, sampling=SamplingParams(temperature=1.0), num_steps=16)
    sampler = Sampler(params, cfg, tok, settings, separators=table, stop_ids=[table.think_end_id])
    problems = [Problem(i, "toy", ({"role": "user", "content": f"Say two, {i}."},), "2") for i in range(3)]
    result = rollout(sampler, _score, problems, algo, RunningMean(), seed=3, row_length=48, rows_multiple=2)
    assert 0.0 < result.metrics["accuracy"] < 1.0  # mixed outcomes, so some advantages are non-zero
    assert result.batch is not None and result.num_paths > 0
    assert result.batch.tokens.shape[0] % 2 == 0
    opt = make_optimizer(OptimConfig(lr=1e-3))
    state = init_train_state(params, opt)
    new, metrics = train_step(
        state,
        result.batch,
        model_cfg=cfg,
        loss_cfg=LossConfig(kl_coef=0.0),
        optimizer=opt,
        num_microbatches=2,
    )
    assert float(metrics["finite"]) == 1.0
    assert float(metrics["ratio"]) == pytest.approx(1.0, abs=1e-4)
    changed = [
        float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max())
        for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(params))
    ]
    assert max(changed) > 0


@pytest.mark.slow
def test_verifier_faults_and_fci_overflow_are_counted(qwen_world):
    """Timeouts, errors and worker restarts among the verdicts, initial responses whose steps overflowed the
    FCI buckets and responses with no separator reach the step's metrics (counted from the same samples)."""
    from attnrl_jax.rewards.math_grader import Verdict
    from attnrl_jax.rollout import sample_initial

    tok, _, cfg, params, table = qwen_world
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    # Two FCI buckets: responses of more than one step overflow.
    settings = LoopSettings(max_new_tokens=12, sampling=SamplingParams(temperature=1.0), num_steps=2)
    sampler = Sampler(params, cfg, tok, settings, separators=table, stop_ids=[table.think_end_id])
    problems = [Problem(i, "toy", ({"role": "user", "content": f"Say two, {i}."},), "2") for i in range(3)]
    calls = []

    def score(texts, gts):  # every 5th verdict of a call times out, every 7th fails; each costs a restart
        calls.append(len(texts))
        reasons = ["timeout" if i % 5 == 0 else "error" if i % 7 == 3 else "" for i in range(len(texts))]
        return [
            Verdict.of(False, r, restarts=1) if r else Verdict.of(bool(grade(t, g).acc), "graded")
            for i, (t, g, r) in enumerate(zip(texts, gts, reasons))
        ]

    algo = AlgoConfig.treerl().replace(group_size=4)  # every response branched: continuations are scored
    result = rollout(sampler, score, problems, algo, RunningMean(), seed=3, row_length=48)
    expected_timeouts = sum(len(range(0, n, 5)) for n in calls)
    expected_errors = sum(sum(1 for i in range(n) if i % 5 and i % 7 == 3) for n in calls)
    assert len(calls) == 2 and expected_timeouts > 0 and expected_errors > 0  # initial + continuations
    assert result.metrics["verifier_timeouts"] == expected_timeouts
    assert result.metrics["verifier_errors"] == expected_errors
    assert result.metrics["verifier_restarts"] == expected_timeouts + expected_errors
    samples = [s for g in sample_initial(sampler, problems, 4, score, seed=3).samples for s in g]
    assert result.metrics["step_overflow"] == sum(s.step_overflow > 0 for s in samples) > 0
    assert result.metrics["needs_fallback"] == sum(s.needs_fallback for s in samples)
