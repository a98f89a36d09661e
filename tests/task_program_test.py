"""The second built-in task family (`task.program`): programs of named values with pivotal steps. Solutions
are checked against their questions by an independent parser, the recorded structure against hand-worked
examples, and the job runs end to end at toy size with configs/program.py as shipped (its toy variant)."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest

from attnrl_jax.rewards import grade
from attnrl_jax.task import family
from attnrl_jax.task.program import LEVELS, NAMES, make_problem, make_split, structure

# Integration: whole jobs, subprocesses or real-compiler builds (make test-fast leaves it out).
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEP = re.compile(r"([a-k]):([a-k])(\d)([+-][12])=(\d),([a-k])(\d)")


def _check(problem, solution):
    """Replays a solution against its question; returns (steps, the steps whose result is a slip)."""
    statements = problem.question.split(";")
    start, target = int(statements[0][2]), statements[-1]
    thinking, answer = solution.split("\n</think>\n")
    steps = thinking.split("\n\n")
    assert len(steps) == len(statements) - 2 and problem.data_source == f"program_l{len(steps)}"
    values, slips = {"a": start}, []
    for k, (step, stmt) in enumerate(zip(steps, statements[1:-1]), 1):
        name, ref, ref_value, op, out, again, out_again = STEP.fullmatch(step).groups()
        assert stmt == f"{name}={ref}{op}" and again == name and out_again == out
        assert int(ref_value) == values[ref]  # the value read is the one that step computed (slip or not)
        right = (values[ref] + int(op)) % 10
        assert int(out) in (right, (right + 1) % 10, (right - 1) % 10)
        if int(out) != right:
            slips.append(k)
        values[name] = int(out)
    assert target == f"{steps[-1][0]}?" and answer == f"\\boxed{{{values[steps[-1][0]]}}}"
    return len(steps), slips


@pytest.mark.parametrize("level", LEVELS)
def test_solutions_replay_and_are_right(level):
    rng = np.random.default_rng(level)
    for i in range(100):
        problem, solution = make_problem(rng, level, i)
        assert _check(problem, solution) == (level, [])
        assert grade(solution, problem.ground_truth).acc == 1


def test_structure_by_hand():
    # a=7; b=a+2 (9); c=b-1 (8); d=b+1 (0); e=d-2 (8); f=b+2 (1); g=f+1 (2); h=b-1 (8); i=h+2 (0)
    q = "a=7;b=a+2;c=b-1;d=b+1;e=d-2;f=b+2;g=f+1;h=b-1;i=h+2;i?"
    s = structure(q)
    assert s.steps == 8
    assert s.refs.tolist() == [-1, 0, 1, 1, 3, 1, 5, 1, 7]
    assert s.counts.tolist() == [1, 4, 0, 1, 0, 1, 0, 1, 0]  # b is read by c, d, f and h
    # Two pivots: b (4 reads), then the earliest of the steps read once (d).
    assert np.nonzero(s.pivotal)[0].tolist() == [1, 3]
    assert np.nonzero(s.on_path)[0].tolist() == [0, 1, 7, 8]  # i <- h <- b <- a
    for bad in ("Start at 7.", "a=7;b=c+1;b?", "a=7;b=a+3;c=b+1;c?"):
        with pytest.raises(ValueError, match="program|statement"):
            structure(bad)


def test_generated_structure_has_pivots_the_answer_depends_on():
    problems, solutions = make_split(3, 200)
    for p, sol in zip(problems, solutions):
        s = structure(p.question)
        steps = sol.split("\n</think>\n")[0].split("\n\n")
        assert [NAMES.index(step[2]) for step in steps] == s.refs[1:].tolist()  # the value each step reads
        assert s.pivotal.sum() == 2 and set(np.nonzero(s.pivotal)[0]) <= {2, 3, 4, 5}
        assert s.counts[s.pivotal].min() >= 2  # each pivot is read at least twice
        assert s.counts[s.pivotal].min() >= s.counts[1:][~s.pivotal[1:]].max()  # and most
        assert s.on_path[s.pivotal].any()  # a slip at a pivot changes the answer
    mean = lambda f: np.mean([f(structure(p.question)) for p in problems])  # noqa: E731
    assert mean(lambda s: s.counts[s.pivotal].mean()) > 2.3  # pivots are read again and again...
    assert mean(lambda s: s.counts[1:][~s.pivotal[1:]].mean()) < 0.5  # ... the other steps rarely


def test_a_slip_at_a_pivot_on_the_answers_path_dooms_it():
    problems, clean = make_split(5, 300)
    slipped_problems, solutions = make_split(5, 300, slip_rate=0.15)
    assert slipped_problems == problems
    doomed = harmless = 0
    slips = steps = 0
    for p, sol in zip(problems, solutions):
        n, at = _check(p, sol)
        steps, slips = steps + n, slips + len(at)
        s = structure(p.question)
        right = grade(sol, p.ground_truth).acc == 1
        if len(at) == 1:  # exactly one slip: wrong iff it is on the answer's dependency path
            assert right != bool(s.on_path[at[0]])
            doomed += not right and bool(s.pivotal[at[0]])
            harmless += right
    assert abs(slips / steps - 0.15) < 0.02
    assert doomed > 0 and harmless > 0


def test_tokenizer_keeps_names_values_and_operations_apart(tmp_path):
    from transformers import AutoTokenizer

    from attnrl_jax.task.tokenizer import CHAT_TEMPLATE, train_tokenizer

    problems, solutions = make_split(0, 100)
    train_tokenizer([p.question for p in problems] + solutions + [CHAT_TEMPLATE], str(tmp_path))
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    assert tok.tokenize("c:b8-2=6,c6") == ["c", ":", "b", "8", "-2", "=", "6", ",", "c", "6"]
    assert tok.tokenize("a=7;b=a+2;b?")[:8] == ["a", "=", "7", ";", "b", "=", "a", "+2"]
    for text in solutions[:20] + [problems[0].question]:
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    # configs/program.py's limits hold the longest prompt and the longest solution (end token included).
    from attnrl_jax.task.warm_start import encode_examples
    from configs import program

    c = program.get_config()
    tokens, mask = encode_examples(tok, problems, solutions, 4096)
    prompt_lens = (np.cumsum(mask, axis=1) == 0).sum(axis=1)
    assert prompt_lens.max() <= c.data.max_prompt_len and mask.sum(axis=1).max() <= c.sampler.max_new_tokens
    assert c.train.row_length == c.data.max_prompt_len + c.sampler.max_new_tokens


def test_family_lookup():
    assert family("program").LEVELS == LEVELS and family("arith").LEVELS == (2, 3, 4, 5, 6)
    with pytest.raises(ValueError, match="config.task.family='nope'"):
        family("nope")


def test_program_job_runs_end_to_end_at_toy_size(tmp_path):
    """configs/program.py:toy through train.py: every stage, the per-level evaluation files of this family."""
    work = tmp_path / "run"
    cmd = [sys.executable, "train.py", "--config=configs/program.py:toy", f"--config.workdir={work}"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert sorted(os.listdir(work / "data" / "eval")) == sorted(f"program_l{n}.parquet" for n in LEVELS)
    assert (work / "report" / "index.html").is_file() and (work / "summary.json").is_file()


def test_spearman_matches_scipy():
    from scipy.stats import spearmanr

    from attnrl_jax.task.anchors import spearman

    assert spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert np.isnan(spearman([1, 1, 1], [1, 2, 3]))
    rng = np.random.default_rng(0)
    for _ in range(20):
        x, y = rng.integers(0, 4, 9), rng.normal(size=9)  # ties on one side
        assert spearman(x, y) == pytest.approx(spearmanr(x, y).statistic)


def test_anchor_scores_by_hand():
    from attnrl_jax.algo import AlgoConfig, AtbSettings, Steps
    from attnrl_jax.task.anchors import response_scores, well_formed

    q = "a=7;b=a+2;c=b-1;d=b+1;e=d-2;f=b+2;g=f+1;h=b-1;i=h+2;i?"
    st = structure(q)  # pivots: steps 1 (b) and 3 (d)
    steps = Steps(np.arange(0, 89, 11), -1, 20)  # 8 steps of 11 tokens
    algo = AlgoConfig.attnrl().replace(atb=AtbSettings(num_points=2, token_distance=0))
    # FCI: steps 3 and 5 above the 80% quantile (0.52): ATB branches at them; step 3 is a pivot, 5 is not.
    fci = np.array([0.1, 0.1, 0.9, 0.1, 0.8, 0.1, 0.1, 0.1])
    entropy = np.zeros(88)
    entropy[[30, 70]] = 2.0  # TreeRL's tokens: 30 is in step 3 ([22, 33)), 70 in step 7 ([66, 77))
    entropy[5] = 1.0  # the largest entropy of step 1, which no criterion scores
    out = response_scores(fci, entropy, steps, st, algo, np.random.default_rng(0))
    assert out["fci"]["precision"] == 0.5 and out["entropy"]["precision"] == 0.5
    assert out["random"]["precision"] in (0.0, 0.5) and np.isnan(out["random"]["spearman"])  # step 1 never

    # Steps 2..8: counts [0, 1, 0, 1, 0, 1, 0], FCI [.1, .9, .1, .8, .1, .1, .1], largest step entropy
    # [0, 2, 0, 0, 0, 2, 0]. Their 1-based ranks, ties averaged, and Pearson's correlation of the ranks:
    def corr(a, b):
        a, b = np.asarray(a, float), np.asarray(b, float)
        return np.sum((a - a.mean()) * (b - b.mean())) / np.sqrt(
            np.sum((a - a.mean()) ** 2) * np.sum((b - b.mean()) ** 2)
        )

    counts_r = [2.5, 6, 2.5, 6, 2.5, 6, 2.5]
    assert out["fci"]["spearman"] == pytest.approx(corr(counts_r, [3, 7, 3, 6, 3, 3, 3]))
    assert out["entropy"]["spearman"] == pytest.approx(corr(counts_r, [3, 6.5, 3, 3, 3, 6.5, 3]))
    good = "\n\n".join(f"{n}:x" for n in "bcdefghi") + "\n</think>\n\\boxed{0}"
    assert well_formed(good, st)
    assert not well_formed(good.replace("d:x", "e:x"), st) and not well_formed("b:x\n\nc:x\n</think>", st)
    with pytest.raises(ValueError, match="8-step problem"):
        response_scores(
            fci[:7], entropy, Steps(np.arange(0, 78, 11), -1, 20), st, algo, np.random.default_rng(0)
        )


def test_comparison_heldout_curve_means_the_seeds_at_each_mark():
    from benchmarks.task_comparison import _mean_curve

    def run(points):  # (fraction, tokens, seconds, accuracy) per held-out evaluation of one run
        keys = ("fraction", "tokens", "time_s", "accuracy", "optimizer_steps")
        return {"heldout_curve": [dict(zip(keys, p)) for p in points]}

    runs = [
        run([(0.0, 0, 0.0, 0.50, 0), (0.5, 100, 60.0, 0.60, 10), (1.0, 210, 120.0, 0.70, 20)]),
        run([(0.0, 0, 0.0, 0.50, 0), (0.5, 120, 90.0, 0.62, 14), (1.0, 200, 150.0, 0.66, 22)]),
        run([(0.0, 0, 0.0, 0.50, 0), (1.0, 205, 180.0, 0.68, 21)]),  # a run that has no policy at 50%
    ]
    zero, half, full = _mean_curve(runs, [0.0, 0.5, 1.0])
    assert zero["seeds"] == 3 and zero["accuracy"] == pytest.approx(50.0) and zero["tokens"] == 0
    assert half["seeds"] == 2 and half["accuracy"] == pytest.approx(61.0)
    assert half["tokens"] == 110 and half["minutes"] == pytest.approx(1.25)
    assert half["optimizer_steps"] == 12 and full["optimizer_steps"] == 21
    # s = sqrt(2) (62 - 60) / 2 = 1.414, t(0.975, 1) = 12.706: half-width 12.706 * 1.414 / sqrt(2) = 12.706
    assert half["ci95"] == pytest.approx([61.0 - 12.706, 61.0 + 12.706])
    assert full["accuracy"] == pytest.approx(68.0) and full["minutes"] == pytest.approx(2.5)
    assert _mean_curve(runs, [0.25])[0]["seeds"] == 0


def test_comparison_totals_count_paths_and_optimizer_steps_for_older_records():
    """A run's running totals per step: read from the records that have them, summed from the per-step
    counts where a run's records predate them (a mark in paths or optimizer steps needs both)."""
    from benchmarks.task_comparison import _totals

    old = [
        {"total_generated_tokens": 100, "num_paths": 40, "update/optimizer_steps": 1.0},
        {"total_generated_tokens": 250, "num_paths": 70, "update/optimizer_steps": 2.0},
    ]
    new = [dict(r, total_paths=p, total_optimizer_steps=o) for r, p, o in zip(old, (5, 9), (3, 4))]
    assert [(t["total_paths"], t["total_optimizer_steps"]) for t in _totals(old)] == [(40, 1.0), (110, 3.0)]
    assert [(t["total_paths"], t["total_optimizer_steps"]) for t in _totals(new)] == [(5, 3), (9, 4)]
    assert [t["total_generated_tokens"] for t in _totals(old)] == [100, 250]


def test_comparison_interval_and_methods():
    from benchmarks.task_comparison import ALL, ISOLATING, METHODS, UNITS, interval

    mean, half = interval([1.0, 2.0, 3.0])  # s = 1, t(0.975, 2) = 4.303: 4.303 / sqrt(3)
    assert mean == 2.0 and half == pytest.approx(4.303 / np.sqrt(3))
    assert np.isnan(interval([1.0])[1])
    assert set(METHODS) == {"attnrl", "grpo", "treerl", "random_branching"}
    from attnrl_jax.algo import AlgoConfig

    for preset, _, overrides, unit in ALL.values():
        AlgoConfig.preset(preset)  # every row names a real preset, a budget unit and real config keys
        assert unit in UNITS and all(key.count(".") == 1 for key in overrides)
    # each isolating run differs from AttnRL or TreeRL in one factor
    assert ISOLATING["attnrl_on_policy"][:2] == ("attnrl", False)
    assert ISOLATING["treerl_off_policy"][:2] == ("treerl", True)
    assert ISOLATING["attnrl_equal_optimizer_steps"] == ("attnrl", True, {}, "optimizer_steps")
    assert ISOLATING["atb_all_branched_equal_paths"] == ("treerl_atb", False, {}, "paths")


def test_warm_start_seeds_config_overrides():
    """The warm-start benchmark's --set: typed like the value it replaces; a key that does not exist or a
    bool that is not true/false is refused, naming the flag."""
    from benchmarks.warm_start_seeds import load_config

    c = load_config("configs/program.py", 3, ["task.warm_batch=8", "task.warm_lr=3e-3", "model.remat=full"])
    assert (c.task.seed, c.task.warm_batch, c.task.warm_lr, c.model.remat) == (3, 8, 3e-3, "full")
    assert isinstance(c.task.warm_batch, int)
    with pytest.raises(SystemExit, match="task.nope=1"):
        load_config("configs/program.py", 0, ["task.nope=1"])
    with pytest.raises(SystemExit, match="expected an existing config key"):
        load_config("configs/program.py", 0, ["task.warm_batch"])
