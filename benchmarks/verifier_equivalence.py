"""How often the verifier accepts rewritten equal forms, wrong forms and hedges of MATH-500's ground truths,
next to plain Math-Verify on the same responses.

    python -m benchmarks.verifier_equivalence [--data ../shared/data/eval/math500_1.parquet] [--limit N]

For each ground truth g the benchmark writes R1-style responses (`<think>...</think>` then a final
sentence with a box) whose answer is a rewriting of g:

  equal forms: g itself, \\dfrac for \\frac, spaces after commas, `x = g`, `\\left( \\right)` brackets,
               a decimal for a terminating fraction, `a/b` for `\\frac{a}{b}`, `n.0`, `n^\\circ`,
               `n \\text{ units}`, `1{,}000` thousands (each where it applies);
  wrong forms: an integer plus one, a fraction with its numerator plus one, the negation;
  hedges:      g offered next to a wrong value w: `g \\text{ or } w`, `w \\text{ or } g`, `g, w`,
               `g \\lor w`, `\\text{either } g \\text{ or } w`, two boxes (either order), `\\pm g`,
               the relation `w = g`, and "the answer is g or w" with no box.

The hedges apply to single-valued ground truths only. Our verdicts come from `VerifierPool` (2 workers, as
training scores them); plain Math-Verify is `verify(parse("\\boxed{g}"), parse(response))` with its own
defaults. Prints one Markdown table: each category's count and the share accepted by each.
"""

from __future__ import annotations

import argparse
import collections
import logging
import re
import time

from attnrl_jax.data import read_verl_parquet
from attnrl_jax.rewards import VerifierPool
from attnrl_jax.rewards.math_grader import alternatives, has_relation

INT = re.compile(r"-?\d+")
FRAC = re.compile(r"(-?)\\frac\{(\d+)\}\{(\d+)\}")


def _terminating(num: int, den: int) -> str | None:
    d = den
    for p in (2, 5):
        while d % p == 0:
            d //= p
    if d != 1:
        return None
    text = f"{num / den:.10f}".rstrip("0").rstrip(".")
    return text if float(text) == num / den else None


def _wrong(g: str) -> str:
    if INT.fullmatch(g):
        return str(int(g) + 1)
    d = re.search(r"\d", g)  # the first digit: a base subscript (52_8) comes last
    if d:
        return g[: d.start()] + str((int(d.group()) + 1) % 10) + g[d.end() :]
    return "0"


def forms(g: str) -> list[tuple[str, str, str]]:
    """(group, category, final-answer section) for one ground truth."""
    box = "The final answer is $\\boxed{{{}}}$.".format
    out = [("equal", "identical", box(g))]
    plain = not has_relation(g) and "\\text" not in g
    if "\\frac" in g:
        out.append(("equal", "\\dfrac", box(g.replace("\\frac", "\\dfrac"))))
    if "," in g and not re.fullmatch(r"-?\d{1,3}(,\d{3})+", g):  # (58,500 is a number, not a list)
        out.append(("equal", "spaces after commas", box(re.sub(r",\s*", ", ", g).replace(", ", ",  "))))
    if plain and len(alternatives(g)) == 1:
        out.append(("equal", "x = g", box("x = " + g)))
    if g.startswith("(") and g.endswith(")"):
        out.append(("equal", "\\left( \\right)", box("\\left(" + g[1:-1] + "\\right)")))
    m = FRAC.fullmatch(g)
    if m:
        sign, num, den = m.group(1), int(m.group(2)), int(m.group(3))
        decimal = _terminating(num, den)
        if decimal:
            out.append(("equal", "decimal", box(sign + decimal)))
        out.append(("equal", "a/b", box(f"{sign}{num}/{den}")))
        out.append(("wrong", "numerator + 1", box(f"{sign}\\frac{{{num + 1}}}{{{den}}}")))
    if INT.fullmatch(g):
        n = int(g)
        out += [
            ("equal", "n.0", box(f"{n}.0")),
            ("equal", "n^\\circ", box(f"{n}^\\circ")),
            ("equal", "n \\text{ units}", box(f"{n} \\text{{ units}}")),
            ("wrong", "n + 1", box(str(n + 1))),
        ]
        if abs(n) >= 1000:
            out.append(("equal", "1{,}000 thousands", box(f"{n:,}".replace(",", "{,}"))))
        if n != 0:
            out.append(("wrong", "negated", box(str(-n))))
    if len(alternatives(g)) == 1:
        w = _wrong(g)
        out += [
            ("hedge", "g \\text{ or } w", box(f"{g} \\text{{ or }} {w}")),
            ("hedge", "w \\text{ or } g", box(f"{w} \\text{{ or }} {g}")),
            ("hedge", "g, w", box(f"{g}, {w}")),
            ("hedge", "g \\lor w", box(f"{g} \\lor {w}")),
            ("hedge", "either g or w", box(f"\\text{{either }} {g} \\text{{ or }} {w}")),
            ("hedge", "two boxes, g last", f"It is $\\boxed{{{w}}}$, or rather $\\boxed{{{g}}}$."),
            ("hedge", "two boxes, g first", f"It is $\\boxed{{{g}}}$, or rather $\\boxed{{{w}}}$."),
            ("hedge", "g or w, no box", f"The final answer is ${g}$ or ${w}$."),
        ]
        if not has_relation(g):
            out.append(("hedge", "w = g", box(f"{w} = {g}")))
        if plain and not g.startswith("-"):
            out.append(("hedge", "\\pm g", box(f"\\pm {g}")))
    return out


def plain_math_verify(gt: str, response: str) -> bool:
    from math_verify import parse, verify

    try:
        return bool(verify(parse("\\boxed{" + gt + "}"), parse(response)))
    except Exception:  # noqa: BLE001 - its own timeouts raise; a failure is a refusal
        return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="../shared/data/eval/math500_1.parquet")
    ap.add_argument("--limit", type=int, default=0, help="first N problems only (0: all)")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    problems = read_verl_parquet(args.data)[: args.limit or None]
    think = "<think>\nLet me work through this carefully.\n\nThe computation checks out.\n</think>\n\n"
    rows = []  # (group, category, gt, response)
    for p in problems:
        gt = p.ground_truth if isinstance(p.ground_truth, str) else p.ground_truth[0]
        rows += [(group, cat, gt, think + text) for group, cat, text in forms(gt)]
    t0 = time.perf_counter()
    with VerifierPool(num_workers=args.workers) as pool:
        ours = [v.acc for v in pool.score([r[3] for r in rows], [r[2] for r in rows])]
    ours_s = time.perf_counter() - t0
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # its per-call timeout warnings
    theirs = [plain_math_verify(gt, response) for _, _, gt, response in rows]
    table = collections.defaultdict(lambda: [0, 0, 0])
    for (group, cat, _, _), a, b in zip(rows, ours, theirs):
        for key in ((group, cat), (group, "all")):
            table[key][0] += 1
            table[key][1] += a
            table[key][2] += b
    print(
        f"{len(problems)} ground truths of {args.data}, {len(rows)} responses ({ours_s:.1f} s in the pool)\n"
    )
    print("| group | form | n | ours accepts | plain Math-Verify accepts |")
    print("|---|---|---|---|---|")
    order = {"equal": 0, "wrong": 1, "hedge": 2}
    for (group, cat), (n, a, b) in sorted(table.items(), key=lambda kv: (order[kv[0][0]], kv[0][1] == "all")):
        name = f"**{cat}**" if cat == "all" else f"`{cat}`"
        print(f"| {group} | {name} | {n} | {100 * a / n:.1f}% | {100 * b / n:.1f}% |")


if __name__ == "__main__":
    main()
