"""Branch-point selection (docs/algorithm.md sections 5.4, 6, 14) with numbers worked out by hand."""

import numpy as np
import pytest

from attnrl_jax.algo import AlgoConfig, AtbSettings, Steps, atb_branch_points, branch_points, fci_threshold
from attnrl_jax.algo.branching import (
    earliest_branch_points,
    entropy_branch_points,
    prompt_mean_fci,
    random_branch_points,
)

NO_DISTANCE = AtbSettings(token_distance=0)


def _steps(bounds, prompt_len=0):
    return Steps(np.asarray(bounds, np.int64), -1, prompt_len)


def test_threshold_is_the_linear_08_quantile():
    # sorted: 0 0 0 .1 .3 .5 .9 -> position 0.8 * 6 = 4.8 -> .3 + .8 * (.5 - .3) = .46
    assert fci_threshold(np.array([0, 0.5, 0.1, 0.9, 0.3, 0, 0])) == pytest.approx(0.46)


def test_threshold_zero_falls_back_to_smallest_positive():
    assert fci_threshold(np.array([0, 0, 0, 0, 0.2, 0, 0, 0, 0, 0])) == 0.2  # quantile 0
    # two positives of ten: position 7.2 lies between 0 and .2 -> .04, no fallback
    assert fci_threshold(np.array([0, 0, 0, 0, 0.2, 0, 0, 0.7, 0, 0])) == pytest.approx(0.04)
    assert fci_threshold(np.zeros(5)) == 0.0


def test_earliest_candidates_above_threshold():
    fci = np.array([0, 0.5, 0.1, 0.9, 0.3, 0, 0])  # candidates (0-based) 1 and 3
    steps = _steps([0, 4, 9, 12, 20, 26, 30, 33])
    np.testing.assert_array_equal(atb_branch_points(fci, steps, NO_DISTANCE), [4, 12])


def test_first_step_is_never_a_branch_point():
    fci = np.array([1.0, 0.0, 0.0, 0.9, 0.0, 0.0])  # tau = .45: candidates 0 and 3; 0 is removed
    steps = _steps([0, 2, 4, 6, 8, 10, 12])
    # only step 3 qualifies; the fallback adds the earliest step after the first (offset 2)
    np.testing.assert_array_equal(atb_branch_points(fci, steps, NO_DISTANCE), [2, 6])


def test_all_zero_fci_takes_the_earliest_steps():
    np.testing.assert_array_equal(
        atb_branch_points(np.zeros(5), _steps([0, 3, 5, 9, 11, 12]), NO_DISTANCE), [3, 5]
    )


def test_512_token_rules():
    # prompt 100 tokens; steps (absolute): [100,400) [400,550) [550,800) [800,1400) [1400,1500) [1500,2100)
    steps = _steps([0, 300, 450, 700, 1300, 1400, 2000], prompt_len=100)
    fci = np.array([0, 1.0, 1.0, 1.0, 1.0, 0])  # tau = 1: candidates 1..4 (0-based)
    # step idx1 starts at 400 < 512: rejected. idx2 [550,800): accepted. idx3 [800,1400): gap 0: rejected.
    # idx4 [1400,1500): gap 1400 - 800 = 600 >= 512: accepted.
    np.testing.assert_array_equal(atb_branch_points(fci, steps), [450, 1300])
    # Without the rule the two earliest candidates win.
    np.testing.assert_array_equal(atb_branch_points(fci, steps, NO_DISTANCE), [300, 450])


def test_fallback_when_the_distance_rule_leaves_too_few():
    steps = _steps([0, 100, 200, 300, 400], prompt_len=50)  # nothing starts at >= 512
    fci = np.array([0, 0, 0.8, 0])
    np.testing.assert_array_equal(atb_branch_points(fci, steps), [100, 200])  # earliest steps 2, 3


def test_short_responses_terminate_with_a_defined_result():
    assert atb_branch_points(np.array([0.3]), _steps([0, 7])).size == 0  # one step: not branchable
    assert atb_branch_points(np.zeros(0), _steps([0])).size == 0
    # two steps: step 2 is the only possible point, repeated to give N = 2
    np.testing.assert_array_equal(atb_branch_points(np.zeros(2), _steps([0, 5, 9])), [5, 5])
    np.testing.assert_array_equal(
        atb_branch_points(np.zeros(3), _steps([0, 5, 9, 12]), AtbSettings(num_points=4)), [5, 5, 9, 9]
    )


def test_fci_length_must_match_the_steps():
    with pytest.raises(ValueError, match="fci has 2 scores but the response has 3 steps"):
        atb_branch_points(np.zeros(2), _steps([0, 1, 2, 3]))


def test_entropy_branching_treerl():
    entropy = np.array([0.1, 0.9, 0.3, 0.9, 0.5, 2.0])  # the last token is never a branch point
    np.testing.assert_array_equal(entropy_branch_points(entropy, 2), [1, 3])
    np.testing.assert_array_equal(entropy_branch_points(np.array([1.0, 5.0]), 2), [0])


def test_earliest_and_random_branching():
    steps = _steps([0, 3, 5, 9, 11, 12])
    np.testing.assert_array_equal(earliest_branch_points(steps), [3, 5])
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(200):
        points = random_branch_points(steps, rng)
        assert len(set(points)) == 2 and set(points) <= {3, 5, 9, 11}
        seen.update(points.tolist())
    assert seen == {3, 5, 9, 11}


def test_dispatcher_uses_the_configured_criterion():
    steps = _steps([0, 3, 5, 9, 11, 12])
    fci = np.array([0, 0, 0, 0.7, 0])
    got = branch_points(AlgoConfig(atb=NO_DISTANCE), steps, fci=fci)
    np.testing.assert_array_equal(got, [3, 9])  # step idx 3 (offset 9) + fallback earliest (offset 3)
    np.testing.assert_array_equal(branch_points(AlgoConfig.treerl(), steps, entropy=np.arange(12.0)), [9, 10])
    with pytest.raises(ValueError, match="needs the response's step FCI"):
        branch_points(AlgoConfig(), steps)


def test_prompt_mean_fci_keeps_zeroed_steps_in_the_denominator():
    # responses: mean(.2, 0, 0, .4) = .15 and mean(.9, 0, 0) = .3 -> F-bar = .225
    assert prompt_mean_fci([np.array([0.2, 0, 0, 0.4]), np.array([0.9, 0, 0])]) == pytest.approx(0.225)
    assert prompt_mean_fci([np.zeros(0), np.array([0.5])]) == pytest.approx(0.25)
