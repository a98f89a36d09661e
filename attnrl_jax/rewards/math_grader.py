"""Answer extraction and the hybrid math grader (ALGORITHM.md section 12): DeepScaleR's rules first, then
the Math-Verify fallback.

Pure Python, no JAX. Grading one response can be slow on adversarial input (sympy on a tower of
exponents), so the trainer never calls `grade` directly: `attnrl_jax.rewards.pool.VerifierPool` runs it in
worker processes with a time limit enforced from outside.

Verdict for one response and its ground truth(s):

1. The solution is the text after the last `</think>` (the whole text if there is none); the answer is
   the content of its last `\\boxed{...}` or `\\fbox{...}` (nested braces handled; `\\boxed 5` too).
   A ground truth that contains a box is replaced by its last box's content.
2. Correct if, for some ground truth: the MATH-normalised strings are equal; or the sympy check with
   DeepScaleR's rules passes (element-wise for tuples and intervals with matching brackets, integers must
   match exactly, two fractions a/b must match exactly, otherwise symbolic equality); or the answer string
   is one of the ground truths.
3. Otherwise the Math-Verify fallback: `math_verify.parse(solution)`; if it yields at least two items and
   the second equals the ground truth string, or `verify(parse("\\boxed{gt}"), parsed)` (gold first),
   the response is correct.

Result: acc in {0, 1}, score +1/-1 (logging only), and a reason: correct, no_answer, mismatch (timeout and
error are assigned by the pool).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

# Inputs longer than this skip the symbolic checks (string comparison still applies): nothing a sympy
# parse of a megabyte can tell us is worth the time.
MAX_SYMBOLIC_CHARS = 400
MAX_DIGITS = 200  # longer digit runs are compared as strings only


@dataclasses.dataclass(frozen=True)
class Verdict:
    acc: int  # 0/1 correctness: the tree values and all filtering use this
    score: float  # +1 / -1, logged only
    reason: str  # correct | no_answer | mismatch | timeout | error
    answer: str | None = None  # the extracted boxed answer, if any

    @classmethod
    def of(cls, correct: bool, reason: str, answer: str | None = None) -> Verdict:
        return cls(int(correct), 1.0 if correct else -1.0, reason, answer)


# ----------------------------------------------------------------------------------------------------
# Extraction


def solution_text(response: str) -> str:
    """Everything after the last `</think>`, or the whole response."""
    cut = response.rfind("</think>")
    return response if cut < 0 else response[cut + len("</think>") :]


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` / `\\fbox{...}` (or `\\boxed x` up to `$` or end of line).

    Scans linearly with a depth counter (no recursion, no regex backtracking); an unbalanced last box
    gives None.
    """
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = start + (len("\\boxed") if text.startswith("\\boxed", start) else len("\\fbox"))
    if i < len(text) and text[i] == " ":  # "\boxed 5"
        rest = text[i + 1 :]
        end = min((p for p in (rest.find("$"), rest.find("\n")) if p >= 0), default=len(rest))
        content = rest[:end].strip()
        return content or None
    if i >= len(text) or text[i] != "{":
        return None
    depth = 0
    for j in range(i, len(text)):
        c = text[j]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
    return None


def ground_truths(gt: str | Sequence[str]) -> list[str]:
    """The ground truth(s) as a list of strings, boxed ones unboxed."""
    items = [gt] if isinstance(gt, str) else list(gt)
    out = []
    for item in items:
        item = str(item)
        if "\\boxed" in item or "\\fbox" in item:
            item = last_boxed(item) or item
        out.append(item.strip())
    return out


# ----------------------------------------------------------------------------------------------------
# MATH normalisation (Hendrycks et al.'s answer normaliser, as DeepScaleR's grade_answer_mathd uses it)


def _matching_brace(s: str) -> int:
    """Index of the brace closing s[0] == "{" (the last index if it is never closed)."""
    depth = 0
    for j, c in enumerate(s):
        depth += c == "{"
        depth -= c == "}"
        if depth == 0:
            return j
    return len(s) - 1


def _fix_fracs(s: str) -> str:
    """\\frac12 -> \\frac{1}{2}, \\frac1{2} -> \\frac{1}{2}, \\frac{1}2 -> \\frac{1}{2}."""
    parts = s.split("\\frac")
    out = parts[0]
    for part in parts[1:]:
        out += "\\frac"
        if part.startswith("{"):
            # \frac{a}b -> \frac{a}{b}
            j = _matching_brace(part)
            num, rest = part[: j + 1], part[j + 1 :]
            if rest and rest[0] != "{":
                rest = "{" + rest[0] + "}" + rest[1:]
            out += num + rest
        elif len(part) >= 2:
            a, b, rest = part[0], part[1], part[2:]
            out += "{" + a + "}" + ("{" + b + "}" + rest if b != "{" else b + rest)
        else:
            out += part
    return out


def _fix_slash(s: str) -> str:
    """a/b with integers a, b -> \\frac{a}{b}."""
    m = re.fullmatch(r"(-?\d+)/(\d+)", s)
    return f"\\frac{{{m.group(1)}}}{{{m.group(2)}}}" if m else s


def _fix_sqrt(s: str) -> str:
    """\\sqrt3 -> \\sqrt{3}."""
    return re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s)


def _remove_right_units(s: str) -> str:
    """'5 \\text{ cm}' -> '5' (units written as trailing text)."""
    if "\\text{ " in s:
        return s.split("\\text{ ")[0]
    return s


def normalize_math(s: str) -> str:
    s = s.replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    s = s.replace("tfrac", "frac").replace("dfrac", "frac")
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "")
    s = s.replace("\\$", "").replace("$", "")
    s = _remove_right_units(s)
    s = s.replace("\\%", "").replace(r"\%", "").replace("%", "")
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    if s.startswith("."):
        s = "0" + s
    # "x = 5" / "k=5" -> "5" (a short variable name on the left)
    parts = s.split("=")
    if len(parts) == 2 and len(parts[0].strip()) <= 2:
        s = parts[1]
    s = _fix_sqrt(s)
    s = s.replace(" ", "")
    s = _fix_fracs(s)
    if s == "0.5":
        s = "\\frac{1}{2}"
    return _fix_slash(s)


def grade_mathd(given: str, gt: str) -> bool:
    return normalize_math(given) == normalize_math(gt)


# ----------------------------------------------------------------------------------------------------
# DeepScaleR's sympy check


_UNIT_WORDS = (
    "degrees",
    "degree",
    "deg",
    "cm",
    "centimeters",
    "meters",
    "meter",
    "mm",
    "km",
    "inches",
    "inch",
    "feet",
    "foot",
    "ft",
    "units",
    "unit",
    "sq",
    "square",
    "cubic",
    "hours",
    "hour",
    "minutes",
    "minute",
    "seconds",
    "second",
    "dollars",
    "dollar",
    "cents",
    "cent",
    "mph",
    "pounds",
    "pound",
    "grams",
    "gram",
    "kg",
    "liters",
    "liter",
    "points",
    "ways",
    "days",
    "day",
    "years",
    "year",
    "students",
    "people",
)
_TEXT_RE = re.compile(r"\\(?:text|textbf|mathrm|mbox|operatorname)\{([^{}]*)\}")
_UNITS_RE = re.compile(r"(?<![a-z])(?:" + "|".join(_UNIT_WORDS) + r")(?:\^?\{?[23]\}?)?(?![a-z])")


def normalize_answer(expr: str) -> str | None:
    """The DeepScaleR/PRM800K-style normalisation before the symbolic comparison."""
    if expr is None:
        return None
    m = re.fullmatch(r"\\text\{(.*)\}", expr.strip())
    if m:
        expr = m.group(1)
    for old, new in (
        ("\\%", "%"),
        ("\\$", "$"),
        ("$", ""),
        ("%", ""),
        (" or ", " , "),
        (" and ", " , "),
        ("million", "*10^6"),
        ("billion", "*10^9"),
        ("trillion", "*10^12"),
        ("\\dfrac", "\\frac"),
        ("\\tfrac", "\\frac"),
        ("\\left", ""),
        ("\\right", ""),
        ("^{\\circ}", ""),
        ("^\\circ", ""),
        ("\\!", ""),
        ("\\,", ""),
        ("\\;", ""),
        ("\\ ", ""),
        ("\\cdot", "*"),
        ("\\times", "*"),
        ("\\infty", "oo"),
        ("infinity", "oo"),
    ):
        expr = expr.replace(old, new)
    prev = None
    while prev != expr:  # unwrap \text{...} and friends (innermost first)
        prev, expr = expr, _TEXT_RE.sub(r"\1", expr)
    expr = expr.lower().strip()
    expr = _UNITS_RE.sub("", expr)
    expr = re.sub(r"(\d),(\d\d\d)(?!\d)", r"\1\2", expr)  # 1,000 -> 1000 (repeated below)
    expr = re.sub(r"(\d),(\d\d\d)(?!\d)", r"\1\2", expr)
    expr = expr.replace(" ", "").rstrip(".")
    if expr.startswith("{") and expr.endswith("}") and expr.count("{") == 1:
        expr = expr[1:-1]
    if re.fullmatch(r"[a-z]\s*=.*", expr):  # x=5 -> 5
        expr = expr.split("=", 1)[1]
    expr = _fix_sqrt(_fix_fracs(expr))
    # \frac{a}{b} with integer parts -> a/b (so that the exact-fraction rule can see it)
    expr = re.sub(r"\\frac\{(-?\d+)\}\{(-?\d+)\}", r"\1/\2", expr)
    return expr


def split_tuple(expr: str) -> list[str]:
    """'(1,2)' -> ['1', '2'] for tuples and intervals; a plain expression is one element."""
    if len(expr) > 2 and expr[0] in "([" and expr[-1] in ")]":
        inner, depth, parts, cur = expr[1:-1], 0, [], ""
        for c in inner:
            depth += c in "([{"
            depth -= c in ")]}"
            if c == "," and depth == 0:
                parts.append(cur)
                cur = ""
            else:
                cur += c
        parts.append(cur)
        if len(parts) > 1 and all(parts):
            return parts
    return [expr]


def _is_frac(s: str) -> bool:
    return re.fullmatch(r"-?\d+/\d+", s) is not None


def _is_int(s: str) -> bool:
    try:
        x = float(s.replace(",", ""))
    except (ValueError, OverflowError):
        return False
    return x == x and abs(x) != float("inf") and abs(x - round(x)) <= 1e-7


def _safe_for_sympy(s: str) -> bool:
    """Refuse inputs that make sympy explode: very long ones, long digit runs, stacked exponents."""
    if len(s) > MAX_SYMBOLIC_CHARS or re.search(rf"\d{{{MAX_DIGITS},}}", s):
        return False
    if s.count("^") > 2 or re.search(r"\^\{?\s*-?\d{4,}", s):  # a^1000+ or towers
        return False
    return True


def _to_sympy(s: str):
    from latex2sympy2_extended import latex2sympy

    if re.fullmatch(r"[-+*/^().\d\s a-z]+", s) and "\\" not in s:
        from sympy.parsing.sympy_parser import (
            convert_xor,
            implicit_multiplication_application,
            parse_expr,
            standard_transformations,
        )

        transformations = standard_transformations + (implicit_multiplication_application, convert_xor)
        return parse_expr(s, transformations=transformations, evaluate=True)
    return latex2sympy(s)


def equal_under_sympy(a: str, b: str) -> bool:
    import sympy

    if not (_safe_for_sympy(a) and _safe_for_sympy(b)):
        return False
    try:
        ea, eb = _to_sympy(a), _to_sympy(b)
        diff = sympy.simplify(ea - eb)
        return diff == 0 or (diff.is_number and abs(complex(diff)) < 1e-9)
    except Exception:  # noqa: BLE001 - an unparsable answer simply does not match
        return False


def grade_sympy(given: str, gt: str) -> bool:
    """DeepScaleR's grade_answer_sympy rules on normalised strings."""
    g, t = normalize_answer(given), normalize_answer(gt)
    if not g or not t:
        return False
    if g == t:
        return True
    t_items, g_items = split_tuple(t), split_tuple(g)
    if len(t_items) > 1 and (t[0] != g[0] or t[-1] != g[-1]):
        return False  # brackets differ: (1,2) is not [1,2]
    if len(t_items) != len(g_items):
        return False
    for te, ge in zip(t_items, g_items):
        if _is_frac(te) and _is_frac(ge):
            if te != ge:  # unreduced fractions must match exactly
                return False
        elif _is_int(te) != _is_int(ge):
            return False
        elif te != ge and not equal_under_sympy(te, ge):
            return False
    return True


# ----------------------------------------------------------------------------------------------------
# Math-Verify fallback and the full verdict


def math_verify_fallback(solution: str, gts: list[str]) -> bool:
    """Math-Verify on the whole solution text (timeouts are the pool's job, so its own are off)."""
    import logging

    from math_verify import parse, verify

    # Its warning that its own timeouts are off is noise here: the pool enforces the limit from outside.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    if len(solution) > 20_000:  # far longer than any final answer section; not worth a parse
        solution = solution[-20_000:]
    parsed = parse(solution, parsing_timeout=None)
    if not parsed:
        return False
    for gt in gts:
        if len(parsed) >= 2 and str(parsed[1]) == gt:
            return True
        if verify(parse("\\boxed{" + gt + "}", parsing_timeout=None), parsed, timeout_seconds=None):
            return True
    return False


def grade(response: str, ground_truth: str | Sequence[str]) -> Verdict:
    """The hybrid verdict for one response (module docstring)."""
    if isinstance(response, bytes):
        response = response.decode("utf-8", errors="replace")
    response = response.replace("\x00", "")
    solution = solution_text(response)
    gts = ground_truths(ground_truth)
    answer = last_boxed(solution)
    if answer is not None:
        answer = answer.strip()
        for gt in gts:
            if grade_mathd(answer, gt) or grade_sympy(answer, gt):
                return Verdict.of(True, "correct", answer)
        if answer in gts:
            return Verdict.of(True, "correct", answer)
    if math_verify_fallback(solution, gts):
        return Verdict.of(True, "correct", answer)
    return Verdict.of(False, "mismatch" if answer is not None else "no_answer", answer)
