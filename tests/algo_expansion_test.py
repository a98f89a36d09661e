"""Difficulty-aware expansion, the FCI filter state, the adaptive batch size and GRPO advantages
(docs/algorithm.md sections 7, 9, 14), with numbers worked out by hand."""

import numpy as np
import pytest

from attnrl_jax.algo import (
    AlgoConfig,
    BatchSizeSettings,
    BatchSizeState,
    ExpansionSettings,
    RunningMean,
    grpo_advantages,
    init_batch_size,
    num_trees,
    plan_expansion,
    update_batch_size,
)


def test_tree_counts_ceil_code_and_round_paper():
    assert [num_trees(k, 6) for k in range(7)] == [6, 6, 5, 4, 4, 3, 3]
    paper = ExpansionSettings(rounding="round")
    assert [num_trees(k, 6, paper) for k in range(7)] == [6, 5, 4, 4, 3, 3, 2]
    assert [num_trees(k, 6, ExpansionSettings(tree_count="uniform")) for k in range(7)] == [6] * 7


def _acc_row(k, g=6, first_correct=True):
    row = np.zeros(g, int)
    row[:k] = 1
    return row if first_correct else row[::-1].copy()


@pytest.mark.parametrize(
    "k,n_correct,n_wrong", [(0, 0, 6), (1, 1, 5), (2, 2, 3), (3, 1, 3), (4, 2, 2), (5, 2, 1)]
)
def test_which_responses_are_branched(k, n_correct, n_wrong):
    rng = np.random.default_rng(k)
    for _ in range(10):
        accs = _acc_row(k)[None]
        rng.shuffle(accs[0])
        plan = plan_expansion(accs, np.zeros(1), RunningMean(), rng)
        picked = plan.branched[0]
        assert len(picked) == len(set(picked.tolist())) == num_trees(k, 6)
        assert (accs[0, picked] == 1).sum() == n_correct and (accs[0, picked] == 0).sum() == n_wrong
        assert not plan.dropped[0]


def test_fci_filter_on_all_correct_prompts_with_running_mean():
    # R-bar before: (0.4 + 0.6) / 2 = .5. The batch's all-correct prompts have F-bar .9 and .3, so
    # R-bar becomes (1.0 + .9 + .3) / 4 = .55 before comparing: .9 passes, .3 is dropped. The mixed
    # prompt (F-bar .1, far below) is never filtered.
    accs = np.array([[1] * 6, [1] * 6, [1, 0, 0, 0, 0, 0]])
    plan = plan_expansion(accs, np.array([0.9, 0.3, 0.1]), RunningMean(1.0, 2), np.random.default_rng(0))
    assert plan.running_mean == RunningMean(2.2, 4) and plan.running_mean.mean == pytest.approx(0.55)
    np.testing.assert_array_equal(plan.branched[0], [0, 1, 2])  # the first m(6) = 3 in sampling order
    assert plan.branched[1].size == 0 and plan.dropped.tolist() == [False, True, False]
    assert len(plan.branched[2]) == 6


def test_strict_and_non_strict_filter():
    accs = np.ones((1, 6), int)
    # a single all-correct prompt equals the running mean it just entered
    strict = plan_expansion(accs, np.array([0.4]), RunningMean(), np.random.default_rng(0))
    assert strict.dropped[0]
    paper = ExpansionSettings(filter_strict=False)
    assert not plan_expansion(accs, np.array([0.4]), RunningMean(), np.random.default_rng(0), paper).dropped[
        0
    ]


def test_filter_scope_all_prompts_paper_reading():
    accs = np.array([[0] * 6, [1, 1, 0, 0, 0, 0]])
    plan = plan_expansion(
        accs,
        np.array([0.2, 0.6]),
        RunningMean(),
        np.random.default_rng(0),
        ExpansionSettings(filter_scope="all", filter_strict=False),
    )
    assert plan.running_mean.mean == pytest.approx(0.4)
    assert plan.dropped.tolist() == [True, False]


def test_variants_all_keep_drop():
    accs = np.array([[1] * 6, [1, 0, 1, 0, 1, 1]])
    rng = np.random.default_rng(0)
    all_mode = plan_expansion(accs, np.zeros(2), RunningMean(), rng, ExpansionSettings(mode="all"))
    assert [b.tolist() for b in all_mode.branched] == [
        list(range(6))
    ] * 2 and all_mode.running_mean == RunningMean()
    keep = plan_expansion(accs, np.zeros(2), RunningMean(), rng, ExpansionSettings(easy_policy="keep"))
    assert keep.branched[0].tolist() == [0, 1, 2] and not keep.dropped.any()
    drop = plan_expansion(accs, np.full(2, 9.0), RunningMean(), rng, ExpansionSettings(easy_policy="drop"))
    assert drop.dropped.tolist() == [True, False]


def test_running_mean_state_is_a_checkpointable_pytree():
    import jax

    state = RunningMean().update([0.5, 0.25]).update([0.75])
    leaves, treedef = jax.tree.flatten(state)
    assert leaves == [1.5, 3] and jax.tree.unflatten(treedef, leaves).mean == pytest.approx(0.5)


def test_bad_inputs():
    with pytest.raises(ValueError, match="accs must be 0/1"):
        plan_expansion(np.array([[2, 0]]), np.zeros(1), RunningMean(), np.random.default_rng(0))
    with pytest.raises(ValueError, match="expansion.rounding must be one of"):
        ExpansionSettings(rounding="floor")


def test_adaptive_batch_size_code_rule():
    settings = BatchSizeSettings()
    state = update_batch_size(init_batch_size(settings), 300, settings)
    assert state == (64, 1)  # the first training step keeps the initial size
    # floor(64 * 1920 / 1000) = 122; ceil(.9 * 64 + 12.2) = ceil(69.8) = 70
    state = update_batch_size(state, 1000, settings)
    assert state == (70, 2)
    # floor(70 * 1920 / 3000) = 44; ceil(63 + 4.4) = 68
    assert update_batch_size(state, 3000, settings) == (68, 3)
    # floor(64 * 1920 / 1900) = 64 and .9 * 64 + 6.4 is exactly 64 (no float round-up to 65)
    assert update_batch_size(BatchSizeState(64, 5), 1900, settings).size == 64


def test_adaptive_batch_size_paper_rule_and_clamp():
    paper = BatchSizeSettings(rule="paper")
    # .9 * 70 + .1 * (1920 / 3000) * 70 = 63 + 4.48 = 67.48 -> 67 (the code rule gives 68)
    assert update_batch_size(BatchSizeState(70, 2), 3000, paper).size == 67
    assert update_batch_size(BatchSizeState(70, 2), 0, BatchSizeSettings(max_size=128)).size == 128


def test_grpo_advantages_by_hand():
    # mean .5, unbiased std sqrt(1/3) = .57735 -> +-.8660
    adv = grpo_advantages(np.array([[1, 0, 0, 1], [1, 1, 1, 1]]))
    np.testing.assert_allclose(adv[0], [0.866025, -0.866025, -0.866025, 0.866025], atol=1e-5)
    np.testing.assert_array_equal(adv[1], 0)
    np.testing.assert_allclose(
        grpo_advantages(np.array([[1, 0, 0, 1]]), normalize_std=False), [[0.5, -0.5, -0.5, 0.5]]
    )


def test_presets_and_unknown_names():
    assert AlgoConfig.preset("treerl").branch_criterion == "entropy"
    assert AlgoConfig.preset("paper").atb.token_distance == 0
    assert AlgoConfig.preset("grpo").estimator == "grpo"
    with pytest.raises(ValueError, match="unknown algorithm preset 'ppo'"):
        AlgoConfig.preset("ppo")
