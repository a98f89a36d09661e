"""The hybrid verifier: a table of equivalent and non-equivalent answers, extraction rules, and the pool
under adversarial output (time limit, recovery, no process left behind)."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from verifier_adversarial import ADVERSARIAL
from verifier_cases import EQUIVALENT, NOT_EQUIVALENT

from attnrl_jax.rewards import Verdict, VerifierPool, grade, last_boxed, solution_text
from attnrl_jax.rewards.math_grader import grade_sympy, ground_truths, normalize_math

TIMEOUT = 2.0


def test_the_table_is_large_enough():
    assert len(EQUIVALENT) + len(NOT_EQUIVALENT) >= 150


@pytest.mark.parametrize("response,gt,label", EQUIVALENT, ids=[c[2] for c in EQUIVALENT])
def test_equivalent(response, gt, label):
    v = grade(response, gt)
    assert (v.acc, v.score, v.reason) == (1, 1.0, "correct"), v


@pytest.mark.parametrize("response,gt,label", NOT_EQUIVALENT, ids=[c[2] for c in NOT_EQUIVALENT])
def test_not_equivalent(response, gt, label):
    v = grade(response, gt)
    assert (v.acc, v.score) == (0, -1.0) and v.reason in ("mismatch", "no_answer", "hedge"), v


def test_extraction_rules():
    assert solution_text("a </think> b </think> c") == " c"
    assert solution_text("no think") == "no think"
    assert last_boxed("\\boxed{a} \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{a} \\fbox{b}") == "b"
    assert last_boxed("$\\boxed 12$ and more") == "12"
    assert last_boxed("\\boxed{1") is None and last_boxed("none") is None
    assert ground_truths("\\boxed{3}") == ["3"] and ground_truths(["1", "\\boxed{2}"]) == ["1", "2"]
    assert normalize_math("\\left( \\dfrac{1}{2}, 3 \\right)") == "(\\frac{1}{2},3)"


def test_reasons():
    assert grade("\\boxed{4}", "4").reason == "correct"
    assert grade("\\boxed{5}", "4").reason == "mismatch"
    assert grade("nothing at all", "4").reason == "no_answer"
    assert (
        grade("<think>\\boxed{4}</think>", "4").reason == "no_answer"
    )  # the box before </think> is not read


def test_deepscaler_rules_without_the_fallback():
    """The sympy step alone: unreduced fractions and integers need exact matches, tuples go element-wise."""
    assert not grade_sympy("2/4", "1/2") and grade_sympy("\\frac{1}{2}", "1/2")
    assert not grade_sympy("4.5", "4") and grade_sympy("4.0", "4")
    assert grade_sympy("(1, 2.0)", "(1,2)") and not grade_sympy("[1,2]", "(1,2)")
    assert not grade_sympy("\\sqrt{4}", "2")  # an integer answer must be written as an integer


@pytest.fixture(scope="module")
def pool():
    with VerifierPool(num_workers=2, timeout=TIMEOUT) as p:
        yield p


def test_batch_scoring_keeps_order_and_runs_asynchronously(pool):
    responses = [box for box, _, _ in EQUIVALENT[:20]] + [r for r, _, _ in NOT_EQUIVALENT[:20]]
    gts = [gt for _, gt, _ in EQUIVALENT[:20]] + [gt for _, gt, _ in NOT_EQUIVALENT[:20]]
    future = pool.submit(responses, gts)
    assert isinstance(future.result(timeout=60)[0], Verdict)
    assert [v.acc for v in future.result()] == [1] * 20 + [0] * 20


@pytest.mark.parametrize("label,response,gt", ADVERSARIAL, ids=[a[0] for a in ADVERSARIAL])
def test_adversarial_input_returns_within_the_limit(pool, label, response, gt):
    t0 = time.monotonic()
    (v,) = pool.score([response], [gt])
    elapsed = time.monotonic() - t0
    assert elapsed <= TIMEOUT + 1.0, (label, elapsed)
    assert v.acc in (0, 1) and v.reason in ("correct", "mismatch", "no_answer", "timeout", "error")
    # the pool keeps working afterwards
    assert pool.score(["\\boxed{7}"], ["7"])[0].acc == 1


def test_adversarial_suite_size():
    assert len(ADVERSARIAL) >= 30


def test_timeouts_kill_and_replace_workers_and_close_leaves_nothing():
    with VerifierPool(num_workers=2, timeout=1.0) as pool:
        before = set(pool.worker_pids())
        verdicts = pool.score(["\\boxed{9^{9^{9^{9}}}}", "\\boxed{3}"], ["1", "3"])
        assert [(v.reason, v.acc) for v in verdicts] == [("timeout", 0), ("correct", 1)]
        assert pool.stats["timeouts"] == 1 and pool.stats["restarts"] == 1
        after = set(pool.worker_pids())
        assert len(after - before) == 1  # the hung worker was replaced
        killed = before - after
        assert all(not _alive(pid) for pid in killed)
    assert all(not _alive(pid) for pid in before | after)


def test_workers_die_with_a_killed_parent(tmp_path):
    """A trainer killed with SIGKILL leaves no verifier worker behind."""
    script = textwrap.dedent(
        """
        import os, sys, time
        from attnrl_jax.rewards import VerifierPool
        if __name__ == "__main__":
            pool = VerifierPool(num_workers=2, timeout=5.0)
            pool.score(["\\\\boxed{1}"], ["1"])
            print(" ".join(map(str, pool.worker_pids())), flush=True)
            time.sleep(60)
        """
    )
    path = tmp_path / "parent.py"
    path.write_text(script)
    proc = subprocess.Popen([sys.executable, str(path)], stdout=subprocess.PIPE, text=True)
    pids = [int(p) for p in proc.stdout.readline().split()]
    assert len(pids) == 2 and all(_alive(p) for p in pids)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in pids)


def _alive(pid: int) -> bool:
    """True for a running process (a zombie awaiting its parent counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False
