"""The hybrid verifier: a table of equivalent and non-equivalent answers, extraction rules, and the pool
under adversarial output (time limit, recovery, no process left behind)."""

import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from verifier_adversarial import ADVERSARIAL, KINDS
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


NORMAL = (["\\boxed{7}", "\\boxed{8}", "no answer"], ["7", "9", "7"], [1, 0, 0])


def _serves(pool) -> bool:
    """The pool still answers a normal batch, right and on time."""
    verdicts = pool.submit(NORMAL[0], NORMAL[1]).result(timeout=TIMEOUT + 5)
    return [v.acc for v in verdicts] == NORMAL[2]


def _payload(response, marker: str):
    return response.replace("{m}", marker) if isinstance(response, str) else response


def test_adversarial_suite_size():
    assert len(ADVERSARIAL) >= 60 and len(KINDS) == 6  # plus the worker-fault tests below
    assert len({label for label, *_ in ADVERSARIAL}) == len(ADVERSARIAL)


@pytest.mark.parametrize(
    "label,kind,response,gt,acc", ADVERSARIAL, ids=[f"{a[1]}: {a[0]}" for a in ADVERSARIAL]
)
def test_adversarial_input(pool, tmp_path, label, kind, response, gt, acc):
    """Each adversarial input gets its verdict within the limit + 1 s, runs nothing, and the pool still
    serves a normal batch afterwards."""
    marker = str(tmp_path / "ran")
    t0 = time.monotonic()
    (v,) = pool.score([_payload(response, marker)], [gt])
    elapsed = time.monotonic() - t0
    assert elapsed <= TIMEOUT + 1.0, (label, elapsed)
    assert v.acc == acc and v.reason in ("correct", "mismatch", "no_answer", "hedge", "timeout"), v
    if kind in ("hedge", "code"):
        assert v.reason != "timeout", v  # decided, not cut off
    assert not os.path.exists(marker)
    assert _serves(pool)


CODE = [(label, response, gt) for label, kind, response, gt, _ in ADVERSARIAL if kind == "code"]
_AUDIT = r"""
import io, json, re, sys
from attnrl_jax.rewards import grade

cases, marker = json.loads(sys.argv[1]), sys.argv[2]
for gt in ("\\frac{1}{2}", "x + 1", "5"):  # warm up: imports and caches, outside the record
    for text in ("\\boxed{1/2}", "\\boxed{2x+1}", "\\boxed{\\sqrt{2}}", "the answer is 3", "\\boxed{(1, 2)}"):
        grade(text, gt)
DANGER = re.compile(
    r"\b(print|exit|quit|input|breakpoint|open|__import__|system|subprocess|fork|exec|eval|lambda"
    r"|__class__|__subclasses__|getattr|__builtins__|sympify)\b"
)
FORBIDDEN = ("os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
             "subprocess.Popen", "builtins.input", "builtins.breakpoint", "ctypes.dlopen", "socket.")
seen, recording = [], [False]

def hook(event, args):
    if not recording[0]:
        return
    if event.startswith(FORBIDDEN):
        seen.append(event)
    elif event == "open" and marker in str(args[0]):
        seen.append("open " + str(args[0]))
    elif event == "compile":
        source = args[0]
        source = source.decode(errors="replace") if isinstance(source, bytes) else str(source)
        if DANGER.search(source):
            seen.append("compile " + source[:80])

sys.addaudithook(hook)
out = []
for label, response, gt in cases:
    stdout, sys.stdout = sys.stdout, io.StringIO()
    recording[0] = True
    try:
        verdict = grade(response.replace("{m}", marker), gt)
    finally:
        recording[0] = False
        printed, sys.stdout = sys.stdout.getvalue(), stdout
    out.append([label, verdict.acc, seen[:], printed])
    seen.clear()
print(json.dumps(out))
"""


def test_no_answer_text_is_executed_by_grade(tmp_path):
    """The classic payloads through `grade` in a fresh interpreter with an audit hook: no process, shell,
    input, marker file or compiled source carrying the payload's names, nothing printed, and every verdict
    as expected."""
    import json

    marker = str(tmp_path / "ran")
    proc = subprocess.run(
        [sys.executable, "-c", _AUDIT, json.dumps(CODE), marker],
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]  # exit() or quit() evaluated would end it early
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == len(CODE)
    expected = {label: acc for label, kind, _, _, acc in ADVERSARIAL if kind == "code"}
    for label, acc, events, printed in results:
        assert events == [] and printed == "", (label, events, printed)
        assert acc == expected[label], label
    assert not os.path.exists(marker)


def test_no_answer_text_is_executed_in_the_pool(tmp_path):
    """The same payloads as one batch through the pool: nothing ran in any worker (no marker, no worker
    exited or was restarted, no error verdict), and the pool serves the next batch."""
    marker = str(tmp_path / "ran")
    with VerifierPool(num_workers=2, timeout=TIMEOUT) as pool:
        pids = set(pool.worker_pids())
        verdicts = pool.score([_payload(r, marker) for _, r, _ in CODE], [gt for _, _, gt in CODE])
        expected = [acc for _, kind, _, _, acc in ADVERSARIAL if kind == "code"]
        assert [v.acc for v in verdicts] == expected
        assert all(v.reason in ("mismatch", "no_answer", "hedge", "correct") for v in verdicts), verdicts
        assert pool.stats["restarts"] == 0 and set(pool.worker_pids()) == pids
        assert _serves(pool)
    assert not os.path.exists(marker)


# ---- worker faults: each leaves the pool answering


def _wait_for(predicate, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def test_killed_idle_workers_are_replaced_before_they_get_work():
    with VerifierPool(num_workers=2, timeout=TIMEOUT) as pool:
        assert _serves(pool)
        killed = pool.worker_pids()
        for pid in killed:
            os.kill(pid, signal.SIGKILL)
        t0 = time.monotonic()
        verdicts = pool.submit(NORMAL[0], NORMAL[1]).result(timeout=TIMEOUT + 5)
        assert [v.acc for v in verdicts] == NORMAL[2] and time.monotonic() - t0 < TIMEOUT
        assert pool.stats["restarts"] == 2 and sum(v.restarts for v in verdicts) == 2
        assert not set(pool.worker_pids()) & set(killed) and all(_alive(p) for p in pool.worker_pids())


def test_a_killed_idle_worker_is_replaced_without_any_work():
    """Capacity heals by itself: one of two killed, the list holds two live workers again."""
    with VerifierPool(num_workers=2, timeout=TIMEOUT) as pool:
        victim = pool.worker_pids()[0]
        os.kill(victim, signal.SIGKILL)
        assert _wait_for(lambda: victim not in pool.worker_pids() and all(map(_alive, pool.worker_pids())))
        assert len(pool.worker_pids()) == 2 and pool.stats["restarts"] == 1
        verdicts = pool.submit(NORMAL[0], NORMAL[1]).result(timeout=TIMEOUT + 5)
        assert [v.acc for v in verdicts] == NORMAL[2] and sum(v.restarts for v in verdicts) == 1


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM, signal.SIGSEGV])
def test_a_worker_killed_while_grading(how):
    """Its item is sent again (the death was not its doing) and gets its true verdict, which counts the
    restart; the rest of the batch and the pool carry on."""
    with VerifierPool(num_workers=2, timeout=5.0) as pool:
        slow = "\\boxed{" + "{" * 500_000 + "}" * 500_000 + "}"  # about a second of grading, then "mismatch"
        future = pool.submit([slow, "\\boxed{3}", "\\boxed{4}"], ["1", "3", "4"])
        assert _wait_for(lambda: any(w.item is not None and w.item.index == 0 for w in pool._workers))
        (busy,) = [w.process.pid for w in pool._workers if w.item is not None and w.item.index == 0]
        os.kill(busy, how)
        verdicts = future.result(timeout=30)
        assert [(v.acc, v.reason, v.restarts) for v in verdicts] == [
            (0, "mismatch", 1),
            (1, "correct", 0),
            (1, "correct", 0),
        ]
        assert pool.stats["restarts"] == 1 and not pool.stats["errors"] and _serves(pool)


def test_an_item_that_kills_every_worker_is_an_error():
    """An item whose worker dies each time it is sent is scored "error" after MAX_SENDS tries."""
    from attnrl_jax.rewards.pool import MAX_SENDS

    with VerifierPool(num_workers=1, timeout=5.0) as pool:
        future = pool.submit(["\\boxed{" + "{" * 500_000 + "}" * 500_000 + "}"], ["1"])
        killed = set()
        for _ in range(MAX_SENDS):
            busy = lambda: pool._workers[0].item is not None and pool.worker_pids()[0] not in killed  # noqa: E731
            assert _wait_for(busy)
            killed.add(pool.worker_pids()[0])
            os.kill(pool.worker_pids()[0], signal.SIGKILL)
        (v,) = future.result(timeout=10)
        assert (v.reason, v.restarts) == ("error", MAX_SENDS) and pool.stats["errors"] == 1 and _serves(pool)


def test_a_stopped_worker_times_out_and_is_replaced():
    with VerifierPool(num_workers=1, timeout=1.0) as pool:
        (pid,) = pool.worker_pids()
        os.kill(pid, signal.SIGSTOP)
        t0 = time.monotonic()
        (v,) = pool.score(["\\boxed{2}"], ["2"])
        assert (v.reason, v.restarts) == ("timeout", 1) and time.monotonic() - t0 < 1.0 + 1.0
        assert not _alive(pid) and _serves(pool)


def test_a_worker_out_of_step_is_replaced_and_its_item_sent_again():
    """A reply whose key is not the one its worker was sent (here: a stray request written to an idle
    worker's pipe, as a forked payload could) is never taken for another item's verdict."""
    with VerifierPool(num_workers=1, timeout=TIMEOUT) as pool:
        (worker,) = pool._workers
        worker.conn.send((-1, "\\boxed{1}", ["1"]))  # its answer, key -1, will arrive first
        time.sleep(0.5)
        verdicts = pool.score(["\\boxed{5}", "\\boxed{6}"], ["7", "6"])
        assert [(v.acc, v.reason) for v in verdicts] == [(0, "mismatch"), (1, "correct")]
        assert pool.stats["restarts"] == 1 and sum(v.restarts for v in verdicts) == 1 and _serves(pool)


def test_an_item_that_cannot_be_sent_is_an_error_on_its_own():
    with VerifierPool(num_workers=2, timeout=TIMEOUT) as pool:
        verdicts = pool.score(["\\boxed{1}", lambda: 0, "\\boxed{2}", None, 12], ["1", "1", "2", "1", "12"])
        assert [(v.acc, v.reason) for v in verdicts] == [
            (1, "correct"),
            (0, "error"),  # does not pickle
            (1, "correct"),
            (0, "error"),  # not a string: grade refuses it in the worker
            (0, "error"),
        ]
        assert pool.stats["restarts"] == 0 and pool._thread.is_alive() and _serves(pool)


@pytest.mark.parametrize(
    "bad,says",
    [
        (None, "got NoneType None"),
        ("", "a ground truth is empty"),
        ("  \\boxed{ } ", "a ground truth is empty"),
        ([], "the list of ground truths is empty"),
        (["3", ""], "a ground truth is empty"),
        (1.5, "got float 1.5"),
        (True, "got bool True"),
        ({"a": 1}, "got dict"),
    ],
)
def test_ground_truths_are_checked_at_submit(pool, bad, says):
    with pytest.raises(ValueError, match=rf"ground_truths\[1\]: .*{re.escape(says)}"):
        pool.submit(["\\boxed{1}", "\\boxed{2}"], ["1", bad])
    assert not pool._pending  # nothing of that batch was queued
    assert pool.score(["\\boxed{5}", "\\boxed{12}"], ["5", 12])[1].acc == 1  # integers are fine
    assert _serves(pool)


def test_workers_that_cannot_start_make_the_pool_refuse_work(tmp_path):
    """A script without the main-module guard: its workers die at start; the pool says why and raises
    instead of scoring everything 0 and restarting forever."""
    script = tmp_path / "noguard.py"
    script.write_text(
        "from attnrl_jax.rewards import VerifierPool\n"
        "pool = VerifierPool(num_workers=2, timeout=5.0)\n"
        "pool.score(['\\\\boxed{1}'] * 40, ['1'] * 40)\n"
    )
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=240)
    assert proc.returncode != 0
    assert "died in a row without a verdict" in proc.stderr and "__main__" in proc.stderr


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


def test_equivalence_benchmark_forms_on_math_style_ground_truths():
    """The MATH-500 benchmark's rewritings on a few ground truths of each shape (the data folder may be
    absent here): every equal form accepted, every wrong form and every hedge refused."""
    from benchmarks.verifier_equivalence import forms

    shapes = [
        "42",
        "-7",
        "2220",
        "\\frac{3}{56}",
        "3\\sqrt{13}",
        "\\left( 3, \\frac{\\pi}{2} \\right)",
        "1,-2",
    ]
    shapes += ["\\text{Evelyn}", "x=5", "52_8", "6 - 5i", "\\frac{1}{2}"]
    groups = set()
    for gt in shapes:
        for group, category, text in forms(gt):
            groups.add(group)
            assert grade(text, gt).acc == (group == "equal"), (gt, category, text)
    assert groups == {"equal", "wrong", "hedge"}
