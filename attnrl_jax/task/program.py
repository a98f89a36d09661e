"""Programs of named values: the built-in task with long chains and pivotal steps (the second task family;
`arith` is the first).

A problem is a small straight-line program over digits. The first value is given; every later one is an
earlier value plus or minus 1 or 2 (mod 10); the question asks for the last one:

    question: "a=7;b=a+2;c=b-1;d=b+1;e=d-2;f=b+2;g=f+1;h=b-1;i=h+2;i?"
    solution: "b=a+2=7+2=9\\n\\nc=b-1=9-1=8\\n\\n...\\n\\ni=h+2=8+2=0\\n</think>\\n\\boxed{0}"

Each computed value is one step of the solution (so a level-n problem has n steps separated by "\\n\\n",
n in `LEVELS`), and each step writes its name, the statement it copies from the question, the value it
reads, and the result. Reading a value means finding the step that computed it, so a step that many later
statements reference is one that later reasoning keeps attending to: a **pivotal** step (a "thought
anchor", the thing FCI is meant to find). Two of steps 2-5 are pivots; each later statement
reads a pivot with probability `PIVOT_RATE`, else the value just before it. The answer's dependency chain
passes through at least one pivot, so a slip at a pivot dooms the answer, while a slip at a step the answer
does not depend on costs nothing.

`Structure` records, for every problem, how often each step is referenced, which steps are pivots and
which ones the answer depends on; `structure(question)` recomputes it from the question text alone (the
program is in the question), which is how the FCI benchmark scores responses.

The warm start imitates a fallible teacher as in `arith`: each step's result is off by one with
probability `slip_rate`, and the steps that read it carry the error on.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from attnrl_jax.data import Problem
from attnrl_jax.task import arith

LEVELS = (8, 9, 10)  # steps per solution
NAMES = "abcdefghijk"  # a is given; at most 10 computed values
PIVOTS = 2  # pivots, drawn among PIVOT_STEPS (step 1 is never a branch point: docs/algorithm.md section 6)
PIVOT_STEPS = (2, 3, 4, 5)
PIVOT_RATE = 0.6
STATEMENT = re.compile(r"([a-k])=([a-k])([+-][12])")


@dataclasses.dataclass(frozen=True)
class Structure:
    """The dependency structure of one problem, indexed by response step (step k computes value k; 1-based,
    index 0 is the given value, the prompt).

    Attributes:
      refs: [n + 1] the value each step reads (refs[0] = -1).
      counts: [n + 1] how many later steps read each value.
      pivotal: [n + 1] bool, the pivots (the values read most, by construction).
      on_path: [n + 1] bool, the values the answer depends on (the last step and its ancestors).
    """

    refs: np.ndarray
    counts: np.ndarray
    pivotal: np.ndarray
    on_path: np.ndarray

    @property
    def steps(self) -> int:
        return len(self.refs) - 1


def _structure(refs: list[int], pivots: set[int]) -> Structure:
    n = len(refs) - 1
    counts = np.bincount([r for r in refs[1:]], minlength=n + 1)
    on_path = np.zeros(n + 1, bool)
    k = n
    while k >= 0 and not on_path[k]:
        on_path[k] = True
        k = refs[k]
    pivotal = np.array([k in pivots for k in range(n + 1)])
    return Structure(np.array(refs), counts, pivotal, on_path)


def structure(question: str) -> Structure:
    """The structure of a problem from its question text (raises ValueError naming what does not parse).
    The pivots are the two steps read most (ties: the earlier); the generator's pivots are exactly these
    (`make_problem`)."""
    parts = question.rstrip("?").split(";")
    if len(parts) < 3 or not re.fullmatch(r"a=\d", parts[0]):
        raise ValueError(f"not a program question (expected 'a=<digit>;b=a+1;...;x?'): {question!r}")
    refs = [-1]
    for i, part in enumerate(parts[1:-1], 1):
        m = STATEMENT.fullmatch(part)
        if m is None or m[1] != NAMES[i] or NAMES.index(m[2]) >= i:
            raise ValueError(f"statement {i} of {question!r} is {part!r}, expected {NAMES[i]}=<earlier>+-1/2")
        refs.append(NAMES.index(m[2]))
    return _structure(refs, set(_pivots_of(refs)))


def _pivots_of(refs: list[int]) -> list[int]:
    counts = np.bincount(refs[1:], minlength=len(refs))
    counts[0] = 0  # the given value is the prompt, not a step
    order = np.argsort(-counts, kind="stable")
    return [int(k) for k in order[:PIVOTS] if counts[k] > 0]


def _apply(value: int, op: str) -> int:
    return (value + int(op)) % 10


def make_problem(
    rng: np.random.Generator,
    level: int,
    index: int,
    slip_rate: float = 0.0,
    slip_rng: np.random.Generator | None = None,
) -> tuple[Problem, str]:
    """One problem of `level` steps and its solution text (the assistant turn), as in `arith.make_problem`:
    with `slip_rate` > 0 each step's result is off by one with that probability (from `slip_rng`), and the
    problem does not depend on the slips."""
    if not PIVOT_STEPS[-1] + 2 <= level <= len(NAMES) - 1:
        raise ValueError(f"level must be in [{PIVOT_STEPS[-1] + 2}, {len(NAMES) - 1}], got {level}")
    if not 0.0 <= slip_rate < 1.0 or (slip_rate > 0 and slip_rng is None):
        raise ValueError(f"slip_rate must be in [0, 1) (with a slip_rng when > 0), got {slip_rate}")
    while True:
        pivots = sorted(int(k) for k in rng.choice(PIVOT_STEPS, PIVOTS, replace=False))
        refs = [-1]
        for k in range(1, level + 1):
            earlier = [p for p in pivots if p < k]
            if k == 1:
                refs.append(0)
            elif earlier and k - 1 not in pivots and rng.random() < PIVOT_RATE:
                refs.append(int(rng.choice(earlier)))
            else:
                refs.append(k - 1)
        s = _structure(refs, set(pivots))
        # The pivots are the values read most (so the question alone tells them: `structure`), each read
        # at least twice, and the answer depends on one.
        if sorted(_pivots_of(refs)) == pivots and min(s.counts[pivots]) >= 2 and s.on_path[s.pivotal].any():
            break
    ops = [str(rng.choice(["+1", "+2", "-1", "-2"])) for _ in range(level)]
    start = int(rng.integers(0, 10))
    truth, value = [start], [start]
    steps = []
    for k in range(1, level + 1):
        r, op = refs[k], ops[k - 1]
        truth.append(_apply(truth[r], op))
        out = _apply(value[r], op)
        if slip_rate > 0 and slip_rng.random() < slip_rate:
            out = (out + int(slip_rng.choice([-1, 1]))) % 10
        value.append(out)
        steps.append(f"{NAMES[k]}:{NAMES[r]}{value[r]}{op}={out},{NAMES[k]}{out}")
    statements = [f"a={start}"] + [f"{NAMES[k]}={NAMES[refs[k]]}{ops[k - 1]}" for k in range(1, level + 1)]
    question = ";".join(statements) + f";{NAMES[level]}?"
    solution = "\n\n".join(steps) + f"\n</think>\n\\boxed{{{value[-1]}}}"
    problem = Problem(index, f"program_l{level}", ({"role": "user", "content": question},), str(truth[-1]))
    return problem, solution


def make_split(seed: int, per_level: int, levels=LEVELS, start_index: int = 0, slip_rate: float = 0.0):
    """`per_level` problems of each level, interleaved by level (`arith.make_split` with this family's
    problems)."""
    return arith.make_split(seed, per_level, levels, start_index, slip_rate, make=make_problem)
