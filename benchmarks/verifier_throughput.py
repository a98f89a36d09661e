"""Verifier throughput: responses scored per second by `VerifierPool` on a realistic mix.

    python -m benchmarks.verifier_throughput [--workers 2 --responses 2000]

The mix imitates R1-style outputs: a long reasoning section, `</think>`, a short summary and a boxed final
answer; about half are correct (often in another form than the ground truth: dfrac vs frac, decimals,
radicals, tuples, units), the rest wrong, and a few have no answer at all.
"""

from __future__ import annotations

import argparse
import random
import time

from attnrl_jax.rewards import VerifierPool

# (ground truth, equivalent forms, wrong forms)
ANSWERS = [
    ("42", ["42", "42.0", "x = 42"], ["41", "24"]),
    ("\\frac{3}{4}", ["\\dfrac{3}{4}", "0.75", "3/4"], ["\\frac{4}{3}", "0.7"]),
    ("2\\sqrt{3}", ["\\sqrt{12}", "2 \\sqrt 3"], ["3\\sqrt{2}", "\\sqrt{6}"]),
    ("(1, -2)", ["\\left(1,-2\\right)", "(1,-2)"], ["(-2, 1)", "[1,-2]"]),
    ("\\frac{\\pi}{3}", ["\\pi/3", "\\frac13\\pi"], ["\\frac{\\pi}{6}", "60"]),
    ("90", ["90^\\circ", "90 \\text{ degrees}"], ["45", "180"]),
    ("\\text{(C)}", ["\\text{(C)}", "C"], ["\\text{(B)}"]),
    ("x^2+2x+1", ["(x+1)^2"], ["x^2+1"]),
    ("1,000", ["1000"], ["100"]),
    ("-\\frac{1}{2}", ["-0.5", "\\frac{-1}{2}"], ["\\frac{1}{2}"]),
]
FILLER = (
    "Let me reconsider the constraint. If we substitute the value back we get a consistent system, "
    "so the next step is to simplify the expression and check the boundary cases.\n\n"
)


def make_mix(n: int, seed: int = 0):
    rng = random.Random(seed)
    responses, gts = [], []
    for _ in range(n):
        gt, good, bad = rng.choice(ANSWERS)
        reasoning = FILLER * rng.randint(5, 40)
        roll = rng.random()
        final = (
            f"\\boxed{{{rng.choice(good)}}}"
            if roll < 0.5
            else (f"\\boxed{{{rng.choice(bad)}}}" if roll < 0.95 else "I could not finish.")
        )
        responses.append(f"<think>\n{reasoning}</think>\n\nSo the final answer is {final}.")
        gts.append(gt)
    return responses, gts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--responses", type=int, default=2000)
    ap.add_argument("--timeout", type=float, default=5.0)
    args = ap.parse_args()
    responses, gts = make_mix(args.responses)
    with VerifierPool(num_workers=args.workers, timeout=args.timeout) as pool:
        pool.score(responses[:20], gts[:20])  # warm the workers (imports, caches)
        t0 = time.perf_counter()
        verdicts = pool.score(responses, gts)
        secs = time.perf_counter() - t0
        stats = dict(pool.stats)
    acc = sum(v.acc for v in verdicts) / len(verdicts)
    reasons = {
        r: sum(v.reason == r for v in verdicts)
        for r in ("correct", "mismatch", "no_answer", "timeout", "error")
    }
    print(
        f"{len(verdicts)} responses, {args.workers} workers: {secs:.2f} s, "
        f"{len(verdicts) / secs:.0f} responses/s"
    )
    print(f"accuracy {acc:.3f}, reasons {reasons}, pool {stats}")


if __name__ == "__main__":
    main()
