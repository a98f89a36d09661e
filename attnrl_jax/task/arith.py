"""Arithmetic chains: a start number and 1-4 operations, solved one operation per step.

A problem of level k has k operations; its reference solution has k steps separated by "\\n\\n", then
`</think>` and `\\boxed{answer}`, the format of DeepSeek-R1 responses (ALGORITHM.md section 2), so the
sampler's step segmentation, FCI and the verifier all run on it unchanged. Every value is one digit, so a
tiny model learns the arithmetic quickly and the difficulty lies in chaining the steps: each step must find
its operation in the question and the previous step's result.

    question: "Start at 7, then (1) - 5, (2) * 3, (3) + 2."
    solution: "(1) 7 - 5 = 2\\n\\n(2) 2 * 3 = 6\\n\\n(3) 6 + 2 = 8\\n</think>\\n\\\\boxed{8}"

The operations are numbered so that a step finds its own by matching "(k)", which a two-layer model learns
within a minute on a CPU; the values it combines come from the question and from the previous step.
"""

from __future__ import annotations

import numpy as np

from attnrl_jax.data import Problem

LEVELS = (1, 2, 3, 4)


def _op(rng: np.random.Generator, value: int) -> tuple[str, int]:
    """A random operation that keeps the value in [0, 9]."""
    while True:
        op = rng.choice(["+", "-", "*"], p=[0.4, 0.35, 0.25])
        b = int(rng.integers(2, 4)) if op == "*" else int(rng.integers(1, 10))
        out = value + b if op == "+" else value - b if op == "-" else value * b
        if 0 <= out <= 9:
            return f"{op} {b}", out


def make_problem(rng: np.random.Generator, level: int, index: int) -> tuple[Problem, str]:
    """One problem of `level` operations and its reference solution text (the assistant turn)."""
    if level < 1:
        raise ValueError(f"level must be at least 1, got {level}")
    value = start = int(rng.integers(1, 10))
    ops, steps = [], []
    for k in range(1, level + 1):
        op, out = _op(rng, value)
        ops.append(f"({k}) {op}")
        steps.append(f"({k}) {value} {op} = {out}")
        value = out
    question = f"Start at {start}, then " + ", ".join(ops) + "."
    solution = "\n\n".join(steps) + f"\n</think>\n\\boxed{{{value}}}"
    problem = Problem(index, f"arith_l{level}", ({"role": "user", "content": question},), str(value))
    return problem, solution


def make_split(seed: int, per_level: int, levels=LEVELS, start_index: int = 0):
    """`per_level` problems of each level: (problems, solutions), interleaved by level."""
    rng = np.random.default_rng(seed)
    problems, solutions = [], []
    for _ in range(per_level):
        for level in levels:
            p, s = make_problem(rng, level, start_index + len(problems))
            problems.append(p)
            solutions.append(s)
    return problems, solutions
