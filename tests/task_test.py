"""The built-in task: problems and reference solutions, the tokenizer, the warm start, and the whole job
(data -> tokenizer -> warm start -> eval -> AttnRL -> eval -> report) at toy sizes, run twice (the second
run resumes: every stage is skipped), with the report's XHTML parsed by an XML parser, its numbers read
back against the run's files and the page rendered in Chromium at two widths. Interruptions, reruns under
other settings and damaged inputs are tests/faults_test.py's."""

import json
import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from attnrl_jax.rewards import grade
from attnrl_jax.task.arith import make_problem, make_split

# Integration: whole jobs, subprocesses or real-compiler builds (make test-fast leaves it out).
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


STEP = re.compile(r"\((\d)/(\d)\) (\d)([+-])(\d)=(\d)")


def _check_steps(problem, solution, level):
    """Parses a solution against its question; returns how many steps have a wrong result."""
    thinking, answer = solution.split("\n</think>\n")
    steps = thinking.split("\n\n")
    assert len(steps) == level and problem.data_source == f"arith_l{level}"
    m = re.fullmatch(
        r"Start at (\d)\. Alternately ([+-])(\d) and ([+-])(\d), keeping the last digit, (\d) times\.",
        problem.question,
    )
    value, ops = int(m[1]), [(m[2], int(m[3])), (m[4], int(m[5]))]
    assert sum(b if op == "+" else -b for op, b in ops) % 10  # the operations never cancel
    assert int(m[6]) == level
    slips = 0
    for k, step in enumerate(steps, 1):  # "(k/n) a{op}{b}=c": from the previous result, ops alternate
        label_k, label_n, a, op, b, c = STEP.fullmatch(step).groups()
        assert (int(label_k), int(label_n)) == (k, level) and (op, int(b)) == ops[(k - 1) % 2]
        assert int(a) == value
        right = (int(a) + int(b)) % 10 if op == "+" else (int(a) - int(b)) % 10
        assert int(c) in (right, (right + 1) % 10, (right - 1) % 10)  # a slip is off by one
        slips += int(c) != right
        value = int(c)
    assert answer == f"\\boxed{{{value}}}"
    return slips


@pytest.mark.parametrize("level", [2, 3, 4, 5, 6])
def test_problems_and_solutions_agree(level):
    rng = np.random.default_rng(level)
    for i in range(50):
        problem, solution = make_problem(rng, level, i)
        assert _check_steps(problem, solution, level) == 0
        assert grade(solution, problem.ground_truth).acc == 1


def test_the_fallible_teacher_slips_at_its_rate_on_the_same_problems():
    clean_problems, clean = make_split(4, 400)
    problems, solutions = make_split(4, 400, slip_rate=0.3)
    assert problems == clean_problems  # slips never change the problems or their ground truths
    slips = steps = wrong = 0
    for p, s, c in zip(problems, solutions, clean):
        level = int(p.data_source[-1])
        slips += _check_steps(p, s, level)
        steps += level
        wrong += grade(s, p.ground_truth).acc == 0
        assert grade(c, p.ground_truth).acc == 1
    assert abs(slips / steps - 0.3) < 0.02  # 8000 steps: 0.3 within about four standard errors
    assert 0.5 < wrong / len(problems) < 0.7  # most chains with a slip end on a wrong answer
    with pytest.raises(ValueError, match="slip_rate"):
        make_split(0, 1, slip_rate=1.0)


def test_tokenizer_round_trip_and_separators(tmp_path):
    from transformers import AutoTokenizer

    from attnrl_jax.algo import SeparatorTable
    from attnrl_jax.task.tokenizer import CHAT_TEMPLATE, train_tokenizer

    problems, solutions = make_split(0, 100)
    train_tokenizer([p.question for p in problems] + solutions + [CHAT_TEMPLATE], str(tmp_path))
    tok = AutoTokenizer.from_pretrained(str(tmp_path))  # the normal loading path
    for text in solutions[:20] + ["Anything else: \\frac{1}{2} é 中"]:
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    separator = tok.convert_tokens_to_ids("\n\n")
    assert tok.encode("(1) 1 + 1 = 2\n\n(2) 2", add_special_tokens=False).count(separator) == 1
    assert len(tok.encode("(1/2) 7+2=9", add_special_tokens=False)) == 10  # "+2" is one token
    table = SeparatorTable.from_tokenizer(tok)
    assert table.double_newline.sum() >= 1 and table.think_end_id == tok.convert_tokens_to_ids("</think>")
    prompt = tok.apply_chat_template(list(problems[0].messages), add_generation_prompt=True, tokenize=False)
    assert prompt == f"<|user|>{problems[0].question}<|assistant|><think>\n"


def test_warm_start_lowers_the_loss(tmp_path):
    from transformers import AutoTokenizer

    from attnrl_jax.task.tokenizer import CHAT_TEMPLATE, train_tokenizer
    from attnrl_jax.task.warm_start import encode_examples, tiny_task_model, warm_start

    problems, solutions = make_split(0, 50)
    train_tokenizer([p.question for p in problems] + solutions + [CHAT_TEMPLATE], str(tmp_path))
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    tokens, mask = encode_examples(tok, problems, solutions, 128)
    assert tokens.shape[1] % 8 == 0 and tokens.shape[1] < 128
    first = tokens[0][mask[0] > 0]
    assert tok.decode(first) == solutions[0] + "<|eos|>"  # the loss covers exactly the response
    result = warm_start(
        tiny_task_model(len(tok), tok.eos_token_id), tokens, mask, steps=40, progress=False, cooldown=20
    )
    assert result.steps == 40 and result.reached_at is None
    assert np.mean(result.losses[-5:]) < 0.5 * result.losses[0]


def _task_cmd(workdir, *extra):
    return [sys.executable, "train.py", "--config=configs/task.py:toy", f"--config.workdir={workdir}", *extra]


ENV = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")


@pytest.fixture(scope="module")
def toy_run(toy_task_run):
    return toy_task_run


def test_task_job_end_to_end_and_resume(toy_run):
    work, first = toy_run
    assert re.search(
        r"built-in task avg@2: [\d.]+% after the warm start -> [\d.]+% after AttnRL", first.stdout
    )
    for rel in ("warm/config.json", "rl/export/step_2/config.json", "eval/warm.json", "eval/final.md"):
        assert (work / rel).is_file(), rel
    page = (work / "report" / "index.html").read_text()
    root = ET.fromstring(page.split("\n", 2)[2])  # after the XML declaration and the doctype: strict XML
    ns = {"h": "http://www.w3.org/1999/xhtml"}
    images = [img.get("src") for img in root.iterfind(".//h:img", ns)]
    want = {"heldout.png", "optimisation.png", "training.png", "attention_map.png", "fci_position.png"}
    want |= {"fci_filter.png", "tree.png"}
    assert set(images) == want and all((work / "report" / src).stat().st_size > 1000 for src in images)
    steps = root.findall(".//h:span[@class='step']", ns)
    assert steps and all("FCI" in s.get("title") for s in steps)
    assert "V(root)" in page and "arith_l2" in page and "<title>AttnRL on the built-in" in page
    for row in ("commit", "config file", "changed from it", "seeds"):  # the run's identity
        assert f"<th>{row}</th>" in page, row
    assert not re.search(r"\d\.\d{4,} s\b", page)  # durations for people, not 4.773575910999966 s
    records = [json.loads(line) for line in (work / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    counted = ("verifier_timeouts", "verifier_errors", "verifier_restarts", "step_overflow", "needs_fallback")
    for key in counted:
        # counted on every step (a 40-step model writes responses without any separator: fallbacks)
        assert all(isinstance(r[key], float) and r[key] >= 0 for r in records), key
        assert f"{key}=" in first.stdout

    summary = json.loads((work / "summary.json").read_text())
    warm = json.loads((work / "eval" / "warm.json").read_text())["mean"]["avg@k"]
    assert summary["accuracy_before"] == warm and set(summary["levels"]) == {
        f"arith_l{n}" for n in range(2, 7)
    }
    assert summary["warm_start"]["steps"] == 40 and summary["warm_start"]["reached_target_at_step"] == 40
    assert summary["method"] == "AttnRL"
    timings = json.loads((work / "timings.json").read_text())
    assert len(timings) == 7 and summary["minutes"] == pytest.approx(sum(timings.values()) / 60)

    second = subprocess.run(_task_cmd(work), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert second.stdout.count("done, skipped") == 6  # every stage but the report
    again = json.loads((work / "timings.json").read_text())
    assert {k: v for k, v in again.items() if k != "report"} == {
        k: v for k, v in timings.items() if k != "report"
    }


def test_the_report_numbers_are_the_runs(toy_run):
    """Every number the page marks (data-key) is read back and compared with metrics.jsonl and the
    evaluation files it came from."""
    from attnrl_jax.evaluation import interval95

    work, _ = toy_run
    page = (work / "report" / "index.html").read_text()
    root = ET.fromstring(page.split("\n", 2)[2])
    ns = {"h": "http://www.w3.org/1999/xhtml"}
    records = {
        r["step"]: r for r in map(json.loads, (work / "rl" / "metrics.jsonl").read_text().splitlines())
    }
    evals = {name: json.loads((work / "eval" / f"{name}.json").read_text()) for name in ("warm", "final")}
    cells = root.findall(".//h:td[@data-key]", ns)
    checked = set()
    for td in cells:
        key, value = td.get("data-key"), float(td.get("data-value"))
        if key.startswith("eval/"):
            _, which, bench, metric = key.split("/")
            r = evals[which]
            want = r["mean"][metric] if bench == "mean" else r["benchmarks"][bench][metric]
            if bench != "mean":  # the shown interval is the one computed from the per-problem counts
                half = interval95(r["benchmarks"][bench], metric)[1]
                assert np.isnan(half) or f"{100 * half:.1f}" in td.text
        else:
            want = records[int(td.get("data-step"))][key]
        assert value == pytest.approx(want, rel=1e-9, abs=1e-12), key
        checked.add(key.split("/")[0] if key.startswith("eval/") else key)
    assert {"eval", "heldout/avg@k", "heldout/pass@k", "update/loss", "accuracy"} <= checked
    marks = [s for s, r in records.items() if "heldout/avg@k" in r]
    assert marks == [1, 2]  # config.heldout.every = 1 in the toy config


@pytest.mark.parametrize("width", [1100, 560])
def test_the_report_renders_in_chromium(toy_run, tmp_path, width):
    """The page in a real browser (headless Chromium), wide and phone-narrow: the figures are drawn and
    scaled to the page, and the FCI shading shows."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("Chromium is not installed (Debian package chromium; .ci/run installs it)")
    import matplotlib.image

    work, _ = toy_run
    shot = tmp_path / "page.png"
    height = 6000
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--hide-scrollbars",
        "--virtual-time-budget=5000",  # let the images load before the screenshot
        f"--window-size={width},{height}",
        f"--screenshot={shot}",
    ]
    page = (work / "report" / "index.html").as_uri()
    done = subprocess.run([browser, *flags, page], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    pixels = (matplotlib.image.imread(str(shot))[..., :3] * 255).astype(int)
    assert pixels.shape[:2] == (height, width)

    def near(rgb, tol=12):
        return int((np.abs(pixels - np.asarray(rgb)).max(axis=-1) <= tol).sum())

    assert near((31, 119, 180)) > 200  # matplotlib's first line colour: the plot images are drawn
    # The FCI shading, rgba(220, 60, 30, alpha) over white: red well above green and blue.
    red = (pixels[..., 0] > 200) & (pixels[..., 1] < 190) & (pixels[..., 0] - pixels[..., 2] > 40)
    assert int(red.sum()) > 500
    assert near((255, 255, 255), 2) > 0.3 * pixels.shape[0] * pixels.shape[1]  # a page, not a blank image
    # Nothing drawn past the right edge's margin: the figures shrink to the page's width.
    right = pixels[:, -8:]
    assert (np.abs(right - 255).max(axis=-1) <= 2).mean() > 0.97


def test_a_warm_start_that_misses_its_target_stops_the_job(tmp_path):
    """The toy budget cannot reach the shipped target: exit 1 with the reason, no warm checkpoint, no RL."""
    work = tmp_path / "run"
    cmd = _task_cmd(work, "--config.task.warm_target=0.9")
    done = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    assert "error: warm start: after 40 steps (config.task.warm_steps)" in done.stderr
    assert "below config.task.warm_target=0.9" in done.stderr and "Traceback" not in done.stderr
    assert not (work / "warm").exists() and not (work / "rl").exists()
