"""The built-in task: problems and reference solutions, the tokenizer, the warm start, and the whole job
(data -> tokenizer -> warm start -> eval -> AttnRL -> eval -> report) at toy sizes, run twice (the second
run resumes: every stage is skipped), with the report's XHTML parsed by an XML parser."""

import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from attnrl_jax.rewards import grade
from attnrl_jax.task.arith import make_problem, make_split

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("level", [2, 3, 4, 5, 6])
def test_problems_and_solutions_agree(level):
    rng = np.random.default_rng(level)
    for i in range(50):
        problem, solution = make_problem(rng, level, i)
        thinking, answer = solution.split("\n</think>\n")
        steps = thinking.split("\n\n")
        assert len(steps) == level and problem.data_source == f"arith_l{level}"
        words = problem.question.replace(",", "").replace(".", "").split()
        value, ops = int(words[2]), [(words[4], int(words[5])), (words[7], int(words[8]))]
        assert words[-2:] == [str(level), "times"]
        for k, step in enumerate(steps, 1):  # "(k/n) a op b = c": from the previous result, ops alternate
            label, a, op, b, _, c = step.split()
            assert label == f"({k}/{level})" and (op, int(b)) == ops[(k - 1) % 2]
            assert int(a) == value and int(c) == eval(f"({a} {op} {b}) % 10")  # noqa: S307 - digits only
            value = int(c)
        assert answer == f"\\boxed{{{value}}}" and problem.ground_truth == str(value)
        assert grade(solution, problem.ground_truth).acc == 1


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
    _, losses = warm_start(
        tiny_task_model(len(tok), tok.eos_token_id), tokens, mask, steps=40, progress=False
    )
    assert np.mean(losses[-5:]) < 0.5 * losses[0]


def _task_cmd(workdir):
    overrides = {
        "workdir": workdir,
        "task.train_per_level": 4,
        "task.sft_per_level": 25,
        "task.eval_per_level": 2,
        "task.warm_steps": 40,
        "task.eval_k": 2,
        "task.report_samples": 2,
        "algo.initial_batch": 2,
        "algo.group_size": 4,
        "sampler.max_new_tokens": 24,
        "train.steps": 2,
        "train.mini_batch_rows": 16,
        "ckpt.every": 1,
    }
    return [
        sys.executable,
        "train.py",
        "--config=configs/task.py",
        *[f"--config.{k}={v}" for k, v in overrides.items()],
    ]


def test_task_job_end_to_end_and_resume(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    work = tmp_path / "task"
    first = subprocess.run(_task_cmd(work), cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert re.search(
        r"built-in task avg@2: [\d.]+% after the warm start -> [\d.]+% after AttnRL", first.stdout
    )
    for rel in ("warm/config.json", "rl/export/step_2/config.json", "eval/warm.json", "eval/final.md"):
        assert (work / rel).is_file(), rel
    page = (work / "report" / "index.html").read_text()
    root = ET.fromstring(page.split("\n", 2)[2])  # after the XML declaration and the doctype: strict XML
    ns = {"h": "http://www.w3.org/1999/xhtml"}
    images = [img.get("src") for img in root.iterfind(".//h:img", ns)]
    assert len(images) == 4 and all((work / "report" / src).stat().st_size > 1000 for src in images)
    steps = root.findall(".//h:span[@class='step']", ns)
    assert steps and all("FCI" in s.get("title") for s in steps)
    assert "V(root)" in page and "arith_l2" in page

    second = subprocess.run(_task_cmd(work), cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert second.stdout.count("done, skipped") == 6  # every stage but the report
