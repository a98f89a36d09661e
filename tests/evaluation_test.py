"""avg@k / pass@k with numbers worked out by hand, the evaluation loop's bookkeeping, and `eval.py` end to
end on a tiny checkpoint (a Hugging Face directory and a training run's Orbax checkpoint)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from attnrl_jax.data import Problem, write_verl_parquet
from attnrl_jax.evaluation import (
    evaluate,
    interval95,
    markdown_table,
    mean_interval95,
    paper_k,
    pass_at_k,
    summarize,
)

# Integration: whole jobs, subprocesses or real-compiler builds (make test-fast leaves it out).
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_pass_at_k_by_hand():
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)  # 1 - C(3,2)/C(4,2)
    assert pass_at_k(5, 2, 3) == pytest.approx(1 - 1 / 10)  # 1 - C(3,3)/C(5,3)
    assert pass_at_k(4, 0, 4) == 0.0
    assert pass_at_k(4, 4, 1) == 1.0
    assert pass_at_k(4, 1, 4) == 1.0
    with pytest.raises(ValueError, match="k=5"):
        pass_at_k(4, 1, 5)


def test_summarize_by_hand():
    accs = np.array([[1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
    r = summarize(accs)
    assert r["problems"] == 3 and r["k"] == 4
    assert r["avg@k"] == pytest.approx(5 / 12)
    assert r["pass@k"] == pytest.approx(2 / 3)
    assert r["correct"] == [1, 4, 0]


def test_intervals_over_problems_by_hand():
    r = summarize(np.array([[1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]]))
    # avg@k: per-problem accuracies 0.25, 1, 0 (mean 5/12, sample sd 0.5204), half-width 1.96 sd / sqrt 3.
    value, half = interval95(r, "avg@k")
    sd = np.std([0.25, 1.0, 0.0], ddof=1)
    assert value == pytest.approx(5 / 12) and half == pytest.approx(1.96 * sd / np.sqrt(3))
    # pass@k: per-problem 1, 1, 0.
    assert interval95(r, "pass@k")[1] == pytest.approx(1.96 * np.std([1, 1, 0], ddof=1) / np.sqrt(3))
    assert np.isnan(interval95(summarize(np.ones((1, 4))), "avg@k")[1])  # one problem: no interval
    # The mean of two benchmarks: their standard errors combined as independent.
    results = {"benchmarks": {"a": r, "b": r}}
    mean, half2 = mean_interval95(results, "avg@k")
    assert mean == pytest.approx(5 / 12) and half2 == pytest.approx(half / np.sqrt(2))


def test_paper_k():
    assert paper_k("aime24_1") == 32 and paper_k("amc23_1") == 32 and paper_k("aime25_1") == 32
    assert paper_k("math500_1") == 4 and paper_k("olympiad_1") == 4 and paper_k("minerva_1") == 4


def test_evaluate_bookkeeping_and_unweighted_mean():
    """A fake policy answers "1" to every problem: a benchmark of answer-1 problems scores 100%, one of
    answer-2 problems 0%; the mean is the unweighted 50% whatever the sizes; chunks keep the order."""
    ones = [Problem(i, "a", ({"role": "user", "content": "q"},), "1") for i in range(5)]
    twos = [Problem(i, "b", ({"role": "user", "content": "q"},), "2") for i in range(2)]
    calls = []

    def generate(problems, n, seed):
        calls.append((len(problems), n))
        return [["\\boxed{1}"] * n for _ in problems]

    def score(texts, gts):
        return [float(t == f"\\boxed{{{g}}}") for t, g in zip(texts, gts)]

    r = evaluate(
        generate, score, {"ones": ones, "twos": twos}, {"ones": 3, "twos": 2}, batch_prompts=2, progress=False
    )
    assert calls == [(2, 3), (2, 3), (1, 3), (2, 2)]
    assert r["benchmarks"]["ones"] == {
        "problems": 5,
        "k": 3,
        "avg@k": 1.0,
        "pass@k": 1.0,
        "correct": [3, 3, 3, 3, 3],
    }
    assert r["benchmarks"]["twos"]["avg@k"] == 0.0
    assert r["mean"] == {"avg@k": 0.5, "pass@k": 0.5}
    table = markdown_table(r)
    assert (
        "| ones | 5 | 3 | 100.0 | 100.0 |" in table and "| **mean (unweighted)** | | | 50.0 | 50.0 |" in table
    )


def _eval_cmd(checkpoint, data, output, *extra):
    return [
        sys.executable,
        "eval.py",
        "--config=configs/eval.py",
        f"--checkpoint={checkpoint}",
        f"--config.eval.data={data}",
        f"--config.eval.output={output}",
        "--config.eval.k=2",
        "--config.eval.max_new_tokens=6",
        "--config.eval.batch_prompts=4",
        "--config.model.param_dtype=float32",
        "--config.model.dtype=float32",
        "--config.model.attention_impl=xla",
        "--config.reward.workers=1",
        *extra,
    ]


def _eval(checkpoint, data, output):
    """`eval.py` in a subprocess on one CPU device."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    return subprocess.run(
        _eval_cmd(checkpoint, data, output), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def test_eval_cli_on_a_tiny_checkpoint(task_world, tmp_path):
    bench = tmp_path / "bench"
    bench.mkdir()
    for name, n in (("alpha", 3), ("beta", 5)):
        problems = [
            Problem(i, name, ({"role": "user", "content": f"Start at {i}. Add 1."},), "2") for i in range(n)
        ]
        write_verl_parquet(str(bench / f"{name}.parquet"), problems)
    out = tmp_path / "out" / "results"
    done = _eval(task_world / "model", bench, out)
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(results["benchmarks"]) == {"alpha", "beta"}
    assert results["benchmarks"]["beta"]["problems"] == 5 and results["benchmarks"]["beta"]["k"] == 2
    m = results["mean"]["avg@k"]
    assert m == pytest.approx(
        (results["benchmarks"]["alpha"]["avg@k"] + results["benchmarks"]["beta"]["avg@k"]) / 2
    )
    assert "| alpha | 3 | 2 |" in (tmp_path / "out" / "results.md").read_text()

    bad = _eval(tmp_path / "nowhere", bench, out)
    assert bad.returncode != 0 and "nowhere" in bad.stderr


def test_eval_reads_a_training_run(task_world, tmp_path):
    """A training run's directory (Orbax checkpoint + the config saved in it) is a checkpoint too."""
    from trainer_test import _config

    from attnrl_jax import trainer

    c = _config(task_world, tmp_path / "run", 1)
    c.ckpt.export = False
    trainer.run(c)
    bench = tmp_path / "bench.parquet"
    write_verl_parquet(
        str(bench), [Problem(0, "x", ({"role": "user", "content": "Start at 1. Add 1."},), "2")]
    )
    done = _eval(tmp_path / "run", bench, tmp_path / "r")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "loaded step 1" in done.stdout
    assert json.loads((tmp_path / "r.json").read_text())["benchmarks"]["bench"]["problems"] == 1
