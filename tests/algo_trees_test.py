"""Trees, values, advantages and paths (docs/algorithm.md section 8): the worked check, a second deliberately
simple implementation (explicit nodes, recursion) on random trees, and hypothesis properties."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from attnrl_jax.algo import (
    Continuation,
    Response,
    build_prompt_trees,
    filter_zero_variance,
    pack_paths,
    prompt_paths,
    valid_token_count,
)


def _resp(n, acc, conts=(), start=100):
    tokens = np.arange(start, start + n)
    return Response(tokens, -0.01 * np.arange(1, n + 1), acc, tuple(conts))


def _cont(offset, acc, n=2, start=500):
    return Continuation(offset, np.arange(start, start + n), np.full(n, -0.5), acc)


def _worked_prompt():
    """A branched correct response (R = 10, points 3 and 6, continuations 1/0 at each) and four
    unbranched responses (1, 0, 0, 0): 9 leaves, 4 correct."""
    branched = _resp(
        10,
        1.0,
        [
            _cont(3, 1.0, start=500),
            _cont(3, 0.0, start=510),
            _cont(6, 1.0, start=520),
            _cont(6, 0.0, start=530),
        ],
    )
    others = [_resp(4, a, start=200 + 10 * i) for i, a in enumerate([1.0, 0.0, 0.0, 0.0])]
    return [branched, *others]


def test_worked_check_of_section_8_2():
    trees = build_prompt_trees(_worked_prompt())
    assert trees.root_value == pytest.approx(4 / 9) and trees.num_leaves == 9
    t = trees.trees[0]
    assert trees.trees[1:] == [None] * 4
    np.testing.assert_array_equal(t.cuts, [0, 3, 6, 10])
    np.testing.assert_array_equal(t.seg_leaves, [5, 3, 1])
    np.testing.assert_allclose(t.seg_values, [0.6, 2 / 3, 1.0])
    # A(seg0) = 2 (0.6 - 4/9) / sqrt(5) = 0.139
    assert t.seg_advantages[0] == pytest.approx(0.139, abs=5e-4)
    assert t.seg_advantages[1] == pytest.approx(((2 / 3 - 4 / 9) + (2 / 3 - 0.6)) / math.sqrt(3))
    assert t.seg_advantages[2] == pytest.approx(2 - 4 / 9 - 2 / 3)  # leaf: 2r - V(root) - V(parent)
    np.testing.assert_allclose(
        t.cont_advantages, [2 - 4 / 9 - 0.6, -4 / 9 - 0.6, 2 - 4 / 9 - 2 / 3, -4 / 9 - 2 / 3]
    )


def test_paths_of_the_worked_prompt():
    responses = _worked_prompt()
    trees = build_prompt_trees(responses)
    paths = prompt_paths(7, responses, trees)
    assert len(paths) == 5 and all(p.prompt == 7 and p.response == 0 for p in paths)
    a0, a1, a2 = trees.trees[0].seg_advantages
    orig = paths[0]
    assert orig.is_original and orig.prefix_len == 10 and orig.acc == 1.0
    np.testing.assert_allclose(orig.advantages, [a0] * 3 + [a1] * 3 + [a2] * 4, rtol=1e-6)
    np.testing.assert_array_equal(orig.tokens, responses[0].tokens)
    late = paths[3]  # continuation at offset 6 with acc 1
    np.testing.assert_array_equal(late.tokens, [100, 101, 102, 103, 104, 105, 520, 521])
    np.testing.assert_allclose(late.advantages, [a0] * 3 + [a1] * 3 + [2 - 4 / 9 - 2 / 3] * 2, rtol=1e-6)
    np.testing.assert_allclose(late.logprobs, list(-0.01 * np.arange(1, 7)) + [-0.5, -0.5], rtol=1e-6)
    assert not late.is_original and late.prefix_len == 6
    cut = prompt_paths(7, responses, trees, max_len=5)
    assert [len(p.tokens) for p in cut] == [5] * 5 and cut[3].prefix_len == 5


def test_equal_offsets_hang_every_continuation_off_seg0():
    r = _resp(8, 0.0, [_cont(3, 1.0), _cont(3, 1.0), _cont(3, 0.0), _cont(3, 0.0)])
    t = build_prompt_trees([r]).trees[0]
    np.testing.assert_array_equal(t.cuts, [0, 3, 8])
    np.testing.assert_array_equal(t.seg_leaves, [5, 1])
    np.testing.assert_array_equal(t.cont_parent, [0, 0, 0, 0])


def test_zero_variance_filter_is_prompt_level():
    easy = prompt_paths(
        0,
        [_resp(6, 1.0, [_cont(2, 1.0), _cont(4, 1.0)])],
        build_prompt_trees([_resp(6, 1.0, [_cont(2, 1.0), _cont(4, 1.0)])]),
    )
    mixed_responses = [_resp(6, 1.0, [_cont(2, 1.0), _cont(4, 0.0)]), _resp(5, 1.0)]
    mixed = prompt_paths(1, mixed_responses, build_prompt_trees(mixed_responses))
    kept, dropped = filter_zero_variance(easy + mixed)
    assert dropped == [0] and kept == mixed and len(kept) == 3


def test_pack_paths_and_valid_tokens():
    responses = _worked_prompt()
    paths = prompt_paths(0, responses, build_prompt_trees(responses))
    packed = pack_paths(paths, length=12, pad_id=-1)
    assert packed["tokens"].shape == (5, 12)
    np.testing.assert_array_equal(packed["mask"].sum(1), [10, 5, 5, 8, 8])
    np.testing.assert_array_equal(packed["prefix_len"], [10, 3, 3, 6, 6])
    assert (packed["tokens"][1, 5:] == -1).all() and (packed["advantages"][1, 5:] == 0).all()
    assert valid_token_count(paths) == 36
    with pytest.raises(ValueError, match="path 0 has 10 tokens, more than the packed length 8"):
        pack_paths(paths, length=8)


def test_bad_offsets_are_refused():
    with pytest.raises(ValueError, match="continuation offset 6 outside a 6-token response"):
        _resp(6, 1.0, [_cont(6, 1.0)])


# ----------------------------------------------------------------------------------------------------
# A second, deliberately simple implementation: explicit nodes with children, recursion.


def _reference(responses):
    root = {"tokens": [], "children": [], "reward": None}
    for r in responses:
        offsets = sorted({c.offset for c in r.continuations})
        cuts = [0, *offsets, len(r.tokens)]
        parent = root
        segs = []
        for a, b in zip(cuts[:-1], cuts[1:]):
            node = {
                "tokens": list(r.tokens[a:b]),
                "logp": list(r.logprobs[a:b]),
                "children": [],
                "reward": None,
            }
            parent["children"].append(node)
            segs.append(node)
            parent = node
        segs[-1]["reward"] = r.acc
        for c in r.continuations:
            leaf = {"tokens": list(c.tokens), "logp": list(c.logprobs), "children": [], "reward": c.acc}
            segs[offsets.index(c.offset)]["children"].append(leaf)

    def leaves(n):
        return [n] if not n["children"] else [x for ch in n["children"] for x in leaves(ch)]

    def value(n):
        return float(np.mean([x["reward"] for x in leaves(n)]))

    v_root = value(root)
    paths = []

    def walk(n, parent_value, prefix):
        v = value(n)
        adv = ((v - v_root) + (v - parent_value)) / math.sqrt(len(leaves(n)))
        here = prefix + [(t, adv, lp) for t, lp in zip(n["tokens"], n["logp"])]
        if not n["children"]:
            paths.append((here, n["reward"]))
        for ch in n["children"]:
            walk(ch, v, here)

    for top, r in zip(root["children"], responses):
        if not r.continuations:
            continue  # a path of length 1: not trained on
        walk(top, v_root, [])
    return v_root, paths


def _random_prompt(rng, g=None):
    g = g or int(rng.integers(1, 7))
    responses = []
    for _ in range(g):
        n = int(rng.integers(1, 30))
        conts = []
        if n > 1 and rng.random() < 0.6:
            for off in rng.integers(0, n, size=int(rng.integers(1, 3))):
                for _ in range(int(rng.integers(1, 3))):
                    m = int(rng.integers(1, 10))
                    conts.append(
                        Continuation(
                            int(off), rng.integers(0, 1000, m), -rng.random(m), float(rng.integers(0, 2))
                        )
                    )
        responses.append(
            Response(rng.integers(0, 1000, n), -rng.random(n), float(rng.integers(0, 2)), tuple(conts))
        )
    return responses


@pytest.mark.parametrize("seed", range(25))
def test_random_trees_match_the_simple_implementation(seed):
    rng = np.random.default_rng(seed)
    responses = _random_prompt(rng)
    trees = build_prompt_trees(responses)
    v_root, ref_paths = _reference(responses)
    assert trees.root_value == pytest.approx(v_root)
    paths = prompt_paths(0, responses, trees)
    # same multiset of paths (the reference visits children in a different order)
    ours = sorted(
        (tuple(p.tokens), tuple(np.round(p.advantages, 5)), tuple(np.round(p.logprobs, 5)), p.acc)
        for p in paths
    )
    theirs = sorted(
        (
            tuple(t for t, _, _ in path),
            tuple(np.round(np.float32([a for _, a, _ in path]), 5)),
            tuple(np.round(np.float32([lp for _, _, lp in path]), 5)),
            reward,
        )
        for path, reward in ref_paths
    )
    assert ours == theirs
    # concatenated path tokens reproduce the responses and continuations exactly
    for p in paths:
        r = responses[p.response]
        if p.is_original:
            np.testing.assert_array_equal(p.tokens, r.tokens)
        else:
            np.testing.assert_array_equal(p.tokens[: p.prefix_len], r.tokens[: p.prefix_len])
            tails = [c.tokens for c in r.continuations if c.offset == p.prefix_len]
            assert any(np.array_equal(p.tokens[p.prefix_len :], t) for t in tails)


@st.composite
def prompts(draw):
    return _random_prompt(np.random.default_rng(draw(st.integers(0, 2**32 - 1))))


@settings(max_examples=60, deadline=None)
@given(prompts())
def test_properties(responses):
    trees = build_prompt_trees(responses)
    paths = prompt_paths(0, responses, trees)
    assert all(np.isfinite(p.advantages).all() for p in paths)
    # one path per leaf of every branched response
    assert len(paths) == sum(1 + len(r.continuations) for r in responses if r.continuations)


@settings(max_examples=40, deadline=None)
@given(prompts(), st.sampled_from([0.0, 1.0]))
def test_identical_outcomes_give_zero_advantages(responses, outcome):
    same = [
        Response(
            r.tokens,
            r.logprobs,
            outcome,
            tuple(Continuation(c.offset, c.tokens, c.logprobs, outcome) for c in r.continuations),
        )
        for r in responses
    ]
    paths = prompt_paths(0, same, build_prompt_trees(same))
    assert all((p.advantages == 0).all() for p in paths)
    assert filter_zero_variance(paths)[0] == []
