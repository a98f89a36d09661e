"""Arithmetic chains: a start digit and two operations applied alternately n times, one step per operation,
keeping only the last digit of each result.

A problem of level n has n steps separated by "\\n\\n", then `</think>` and `\\boxed{answer}`, the format of
DeepSeek-R1 responses (ALGORITHM.md section 2), so the sampler's step segmentation, FCI and the verifier
all run on it unchanged:

    question: "Start at 9. Alternately + 2 and - 1, keeping the last digit, 3 times."
    solution: "(1/3) 9 + 2 = 1\\n\\n(2/3) 1 - 1 = 0\\n\\n(3/3) 0 + 2 = 2\\n</think>\\n\\\\boxed{2}"

Every prompt and every step has the same number of tokens, so each step finds what it needs (the previous
result, the operation two steps back, the step count) at a fixed distance, and the operations are +-1 and
+-2 (modulo 10): a two-layer model learns the task partly in a short supervised warm start (held-out
avg@4 71.4% over levels 2-6 in `make run`, benchmarks/RESULTS.md). Its errors (a wrong sign copied, a wrong
sum) compound over longer chains, which is where RL has room to improve.
"""

from __future__ import annotations

import numpy as np

from attnrl_jax.data import Problem

LEVELS = (2, 3, 4, 5, 6)


def _apply(op: str, a: int, b: int) -> int:
    return (a + b) % 10 if op == "+" else (a - b) % 10


def make_problem(rng: np.random.Generator, level: int, index: int) -> tuple[Problem, str]:
    """One problem of `level` steps and its reference solution text (the assistant turn)."""
    if not 1 <= level <= 9:
        raise ValueError(f"level must be in [1, 9], got {level}")
    start = int(rng.integers(0, 10))
    ops = [(str(rng.choice(["+", "-"])), int(rng.integers(1, 3))) for _ in range(2)]
    value, steps = start, []
    for k in range(1, level + 1):
        op, b = ops[(k - 1) % 2]
        out = _apply(op, value, b)
        steps.append(f"({k}/{level}) {value} {op} {b} = {out}")
        value = out
    question = (
        f"Start at {start}. Alternately {ops[0][0]} {ops[0][1]} and {ops[1][0]} {ops[1][1]}, "
        f"keeping the last digit, {level} times."
    )
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
