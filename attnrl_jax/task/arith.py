"""Arithmetic chains: a start digit and two operations applied alternately n times, one step per operation,
keeping only the last digit of each result.

A problem of level n has n steps separated by "\n\n", then `</think>` and `\boxed{answer}`, the format of
DeepSeek-R1 responses (docs/algorithm.md section 2), so the sampler's step segmentation, FCI and the verifier
all run on it unchanged:

    question: "Start at 9. Alternately +2 and -1, keeping the last digit, 3 times."
    solution: "(1/3) 9+2=1\n\n(2/3) 1-1=0\n\n(3/3) 0+2=2\n</think>\n\\boxed{2}"

Every prompt and every step has the same number of tokens (each operation is one token of the task's
tokenizer), so each step finds what it needs (the previous result, the operation two steps back, the step
count) at a fixed distance. The two operations never cancel (+2 and -2): with them, a response that went on
for two steps too many would end on the right answer, and RL learned to do so on one level.

The warm start imitates a fallible teacher (`slip_rate`): in its solutions each step's result is off by one
with a fixed probability and later steps carry the error on. A model trained on them learns the procedure
(the argmax of every step is right) and the teacher's slip rate, so its sampled accuracy is set by design:
with `slip_rate` 0.25, about half of the held-out problems right at the evaluation temperature, fewer on
longer chains. RL on the correct final answer can remove the slips, which is the room it has to improve.
"""

from __future__ import annotations

import numpy as np

from attnrl_jax.data import Problem

LEVELS = (2, 3, 4, 5, 6)


def _apply(op: str, a: int, b: int) -> int:
    return (a + b) % 10 if op == "+" else (a - b) % 10


def make_problem(
    rng: np.random.Generator,
    level: int,
    index: int,
    slip_rate: float = 0.0,
    slip_rng: np.random.Generator | None = None,
) -> tuple[Problem, str]:
    """One problem of `level` steps and a solution text (the assistant turn).

    With `slip_rate` > 0 the solution is a fallible teacher's: each step's result is off by one (up or
    down, drawn from `slip_rng`) with that probability, and the following steps carry on from the wrong
    value, so the boxed answer is usually wrong. The problem (and its ground truth) does not depend on
    the slips: `rng` draws the same problems for every slip rate.
    """
    if not 1 <= level <= 9:
        raise ValueError(f"level must be in [1, 9], got {level}")
    if not 0.0 <= slip_rate < 1.0 or (slip_rate > 0 and slip_rng is None):
        raise ValueError(f"slip_rate must be in [0, 1) (with a slip_rng when > 0), got {slip_rate}")
    start = int(rng.integers(0, 10))
    while True:  # two operations that cancel (+2 then -2) would make n + 2 steps as right as n steps
        ops = [(str(rng.choice(["+", "-"])), int(rng.integers(1, 3))) for _ in range(2)]
        if sum(b if op == "+" else -b for op, b in ops) % 10:
            break
    value, truth, steps = start, start, []
    for k in range(1, level + 1):
        op, b = ops[(k - 1) % 2]
        truth = _apply(op, truth, b)
        out = _apply(op, value, b)
        if slip_rate > 0 and slip_rng.random() < slip_rate:
            out = (out + int(slip_rng.choice([-1, 1]))) % 10
        steps.append(f"({k}/{level}) {value}{op}{b}={out}")
        value = out
    question = (
        f"Start at {start}. Alternately {ops[0][0]}{ops[0][1]} and {ops[1][0]}{ops[1][1]}, "
        f"keeping the last digit, {level} times."
    )
    solution = "\n\n".join(steps) + f"\n</think>\n\\boxed{{{value}}}"
    problem = Problem(index, f"arith_l{level}", ({"role": "user", "content": question},), str(truth))
    return problem, solution


def make_split(
    seed: int, per_level: int, levels=LEVELS, start_index: int = 0, slip_rate: float = 0.0, make=None
):
    """`per_level` problems of each level: (problems, solutions), interleaved by level. The problems depend
    on `seed` only; `slip_rate` makes the solutions a fallible teacher's (`make_problem`), with slips drawn
    from a stream of their own. `make` is another family's `make_problem` (default: this one's)."""
    make = make or make_problem
    rng, slip_rng = np.random.default_rng(seed), np.random.default_rng([seed, 1])
    problems, solutions = [], []
    for _ in range(per_level):
        for level in levels:
            p, s = make(rng, level, start_index + len(problems), slip_rate, slip_rng)
            problems.append(p)
            solutions.append(s)
    return problems, solutions
