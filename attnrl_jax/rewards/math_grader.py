"""Answer extraction and the hybrid math grader (docs/algorithm.md section 12): DeepScaleR's rules first, then
the Math-Verify fallback, hardened against a policy that writes whatever earns reward.

Pure Python, no JAX. Grading one response can be slow on adversarial input (sympy on a tower of
exponents), so the trainer never calls `grade` directly: `attnrl_jax.rewards.pool.VerifierPool` runs it in
worker processes with a time limit enforced from outside.

Verdict for one response and its ground truth(s):

1. The solution is the text after the last `</think>` (the whole text if there is none); the answer is
   the content of its last `\\boxed{...}` or `\\fbox{...}` (nested braces handled; `\\boxed 5` too).
   A ground truth that contains a box is replaced by its last box's content; an empty ground truth is an
   error (ValueError), never something `\\boxed{}` can match.
2. One answer per response. An answer that offers alternatives (`5 \\text{ or } 6`, `5 \\lor 6`,
   `either 5 or 6`, `5, 6`, `\\pm 3`: `alternatives`) is wrong against a single-valued ground truth and
   compared as a set against a list-valued one. A relation is never cut down to one side: `x = 5` is 5,
   `43 = 42` is not 42 (every side of an equation must be right), `x \\le 5` is not 5 (`equality_sides`).
   Several boxed answers must all be right (`\\boxed{3} ... \\boxed{4}` is a hedge, not "4").
3. Correct if, for some ground truth: the answer string equals it; or the MATH-normalised strings are equal;
   or the sympy check with DeepScaleR's rules passes (element-wise for tuples and intervals with matching
   brackets, integers must match exactly, two fractions a/b must match exactly, otherwise symbolic
   equality); or Math-Verify on the boxed answer: its extracted string equals the ground truth, or
   `verify(parse("\\boxed{gt}"), parse("\\boxed{answer}"))` (gold first).
4. With no box: Math-Verify on the solution text (section 12's fallback), refused when the sentence it read
   offers alternatives ("the answer is 5 or 6") or states a relation other than `var = value`.

Deviations from the official grader, all in the direction of refusing what the policy could exploit:
Math-Verify reads the boxed answer rather than the whole solution when there is a box (the official
parse reads every box of the text and scores their set); several differing boxes are a hedge (the
official rule takes the last); MATH's unit stripper no longer cuts at any `\\text{ ` (it turned
`5 \\text{ or } 6` into 5); its `x = 5` rule needs a variable on the left (it turned `43 = 42` into 42).

No model text is ever evaluated. DeepScaleR hands plain answers such as `2x+1` to `sympy.parse_expr`,
which calls Python's `eval`, so `\\boxed{print(123)}` ran; here `parse_plain` builds the expression from
an `ast` whitelist (the reasons are in its docstring). LaTeX goes to latex2sympy2's ANTLR parser, which
builds sympy objects from the parse tree without evaluating text, and Math-Verify's plain-expression
extractor admits only digits and operators before its own `parse_expr`.

Result: acc in {0, 1}, score +1/-1 (logging only), and a reason: correct, no_answer, mismatch, hedge
(timeout and error are assigned by the pool).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import operator
import re
from collections.abc import Sequence

from attnrl_jax.answers import box_at, ground_truths, last_boxed

# Inputs longer than this skip the symbolic checks (string comparison still applies): nothing a sympy
# parse of a megabyte can tell us is worth the time.
MAX_SYMBOLIC_CHARS = 400
MAX_DIGITS = 200  # longer digit runs are compared as strings only


@dataclasses.dataclass(frozen=True)
class Verdict:
    acc: int  # 0/1 correctness: the tree values and all filtering use this
    score: float  # +1 / -1, logged only
    reason: str  # correct | no_answer | mismatch | hedge | timeout | error
    answer: str | None = None  # the extracted boxed answer, if any
    restarts: int = 0  # worker processes the pool replaced while serving this item (its own kill included)

    @classmethod
    def of(cls, correct: bool, reason: str, answer: str | None = None, restarts: int = 0) -> Verdict:
        return cls(int(correct), 1.0 if correct else -1.0, reason, answer, restarts)


# ----------------------------------------------------------------------------------------------------
# Extraction


def solution_text(response: str) -> str:
    """Everything after the last `</think>`, or the whole response."""
    cut = response.rfind("</think>")
    return response if cut < 0 else response[cut + len("</think>") :]


_BOX_START = re.compile(r"\\(?:boxed|fbox)")


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


_TRAILING_UNIT = re.compile(r"(.*?)\\text\{ ([A-Za-z. ]*)\}(?:\^\{?[23]\}?)?\s*", re.S)


def _remove_right_units(s: str) -> str:
    """'5 \\text{ cm}' -> '5' (units written as trailing text).

    MATH's normaliser cut at the first `\\text{ ` whatever followed, so `5 \\text{ or } 6` became 5; here
    only a final text of words that are not connectors (`or`, `and`, `either`) is cut.
    """
    m = _TRAILING_UNIT.fullmatch(s)
    if m and m.group(1).strip() and not _CONNECTOR_WORD.search(m.group(2)):
        return m.group(1)
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
    # "x = 5" / "k=5" -> "5" (a variable name on the left: never "43 = 42" -> "42")
    parts = s.split("=")
    if len(parts) == 2 and _is_variable(parts[0]):
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
        return parse_plain(s)
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
# A parser for plain (non-LaTeX) answers that cannot run code


@functools.cache
def _safe_names() -> dict:
    import sympy

    funcs = (
        "sqrt", "root", "sin", "cos", "tan", "cot", "sec", "csc", "asin", "acos", "atan", "sinh", "cosh",
        "tanh", "log", "exp", "Abs", "factorial", "binomial", "floor", "ceiling",
    )  # fmt: skip
    names = {n: getattr(sympy, n) for n in funcs}
    names.update(ln=sympy.log, pi=sympy.pi, E=sympy.E, I=sympy.I, oo=sympy.oo)
    # The constructors sympy's tokenizer emits (auto_number, auto_symbol): known to it as callables, so it
    # does not insert implicit products after them; `_build` is what decides what each call may be.
    names.update(Integer=sympy.Integer, Float=sympy.Float, Rational=sympy.Rational)
    names.update(Symbol=sympy.Symbol, Function=sympy.Function)
    return names


_PLAIN_MAX_NODES = 200


def parse_plain(s: str):
    """A sympy expression from a plain answer such as `2x^2 + 3` or `sqrt(2)/2`, without evaluating any
    code.

    Why not `sympy.parse_expr`: it hands the text, rewritten, to Python's `eval`, so `print(123)` or
    `__import__('os').system(...)` in a boxed answer runs (it did, in DeepScaleR's grader too). Here
    sympy's tokenizer transformations (implicit multiplication, `^` as a power, `5!`, number and symbol
    wrapping) only rewrite the tokens; the result is parsed with `ast.parse` and built by `_build`, which
    accepts numbers, symbols, + - * / ** and calls of a short list of math functions, and refuses every
    other node (attributes, subscripts, lambdas, comprehensions, keyword arguments, any other name).
    Nothing is ever passed to eval, exec or compile.
    """
    from sympy.parsing.sympy_parser import (
        convert_xor,
        implicit_multiplication_application,
        standard_transformations,
        stringify_expr,
    )

    names = _safe_names()  # (stringify_expr gets a copy: nothing may change the cached table)
    transformations = standard_transformations + (implicit_multiplication_application, convert_xor)
    code = stringify_expr(s, {}, dict(names), transformations)
    tree = ast.parse(code.strip(), mode="eval")
    if sum(1 for _ in ast.walk(tree)) > _PLAIN_MAX_NODES:
        raise ValueError("answer too large to parse")
    return _build(tree.body, names)


_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def _build(node, names: dict):
    import sympy

    if isinstance(node, ast.BinOp):
        left, right = _build(node.left, names), _build(node.right, names)
        if isinstance(node.op, ast.Pow):
            if right.is_Number and abs(right) > 10_000:
                raise ValueError("exponent too large")
            return left**right
        if type(node.op) in _BINARY:
            return _BINARY[type(node.op)](left, right)
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _build(node.operand, names)
        return -value if isinstance(node.op, ast.USub) else value
    elif isinstance(node, ast.Name) and node.id in ("pi", "E", "I", "oo"):
        return names[node.id]
    elif isinstance(node, ast.Call) and not node.keywords:
        func, args = node.func, node.args
        consts = [a.value for a in args if isinstance(a, ast.Constant)]
        if isinstance(func, ast.Name) and len(consts) == len(args) == 1:
            (value,) = consts
            if func.id == "Integer" and type(value) is int:
                return sympy.Integer(value)
            if func.id == "Float" and type(value) is str:
                return sympy.Float(value)
            if func.id == "Symbol" and type(value) is str:
                return sympy.Symbol(value)
        if isinstance(func, ast.Name) and func.id == "Rational" and len(consts) == len(args) == 2:
            if all(type(v) is int for v in consts):
                return sympy.Rational(*consts)
        if isinstance(func, ast.Name) and func.id in names and func.id not in _CONSTRUCTORS:
            if 1 <= len(args) <= 2:
                return names[func.id](*(_build(a, names) for a in args))
        if (  # an undefined function applied: f(x)
            isinstance(func, ast.Call)
            and isinstance(func.func, ast.Name)
            and func.func.id == "Function"
            and len(func.args) == 1
            and isinstance(func.args[0], ast.Constant)
            and type(func.args[0].value) is str
            and 1 <= len(args) <= 3
        ):
            return sympy.Function(func.args[0].value)(*(_build(a, names) for a in args))
    raise ValueError(f"not a plain math expression: {ast.dump(node)[:80]}")


_CONSTRUCTORS = ("Integer", "Float", "Rational", "Symbol", "Function", "pi", "E", "I", "oo")


# ----------------------------------------------------------------------------------------------------
# One answer per response: alternatives, relations, several boxes

MAX_ALTERNATIVES = 8  # a "list" longer than this is compared as a whole string only
MAX_BOXES = 8  # more distinct boxed answers than this is a hedge by itself

_CONNECTOR_WORD = re.compile(r"(?<![A-Za-z\\])(?:or|either|and)(?![A-Za-z])", re.I)
_CONNECTOR_CMD = re.compile(r"\\(?:lor|vee|text\{\s*(?:or|either|and)\s*\})(?![A-Za-z])|\bor\b", re.I)
_TEXT_BLOCK = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mbox|operatorname)\s*\{([^{}]*)\}")
_PAD = re.compile(r"^(?:\s|~|\\[,;:! ]|\\q?quad(?![A-Za-z]))+|(?:\s|~|\\[,;:! ]|\\q?quad(?![A-Za-z]))+$")
_PLUS_MINUS = re.compile(r"\\(?:pm|mp)(?![A-Za-z])|±|∓")
# Relations other than "=": an answer that states one is not a value (unless the ground truth is one).
_RELATION = re.compile(
    r"<|>|≠|≤|≥|≈|∈|\\(?:ne|neq|le|leq|leqslant|ge|geq|geqslant|lt|gt|approx|equiv|sim|simeq|cong|in"
    r"|notin|subset|subseteq|supset|supseteq|to|rightarrow|Rightarrow|implies|iff|Leftrightarrow|propto)"
    r"(?![A-Za-z])"
)
_VARIABLE = re.compile(
    r"\s*(?:[A-Za-z]|\\[A-Za-z]+)(?:_\{?\w{1,4}\}?)?'*(?:\s*\((?:[A-Za-z]|\\[A-Za-z]+)(?:,\s*[A-Za-z])*\))?\s*"
)


def _is_variable(s: str) -> bool:
    """`x`, `k`, `a_n`, `a_{10}`, `\\theta`, `f(x)`: a name one may write on the left of `= value`."""
    return _VARIABLE.fullmatch(s) is not None and not s.strip().startswith("\\text")


_THOUSANDS = re.compile(r"\d{3}(?!\d)")


def _split_top_level(s: str, seps: str) -> list[str]:
    """`s` split at the characters in `seps` outside (), [] and {} (thousands commas such as 1,000 kept).

    Visits only brackets and separators (a regex scan), so a megabyte of text costs what its brackets do."""
    if not any(c in s for c in seps):
        return [s]
    parts, start, depth = [], 0, 0
    for m in re.finditer("[" + re.escape("()[]{}" + seps) + "]", s):
        c, k = m.group(), m.start()
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth = max(depth - 1, 0)
        elif depth == 0 and not (c == "," and s[k - 1 : k].isdigit() and _THOUSANDS.match(s, k + 1)):
            parts.append(s[start:k])
            start = k + 1
    parts.append(s[start:])
    return parts


@functools.lru_cache(maxsize=256)  # asked for the same answer and ground truth several times per verdict
def alternatives(answer: str) -> tuple[str, ...]:
    """The values an answer offers: `5` -> [5]; `5 \\text{ or } 6`, `5 \\lor 6`, `either 5 or 6`, `5, 6`,
    `5; 6`, `5 and 6` -> [5, 6]; `\\pm 3` -> [+3, -3]; a tuple, interval or set in brackets is one value.

    A response must commit to one answer: where the ground truth is a single value, an answer with more
    than one alternative is wrong (`grade`); where it is a list, the two are compared as sets.
    """
    s = answer
    # connectors inside \text{...}: "\text{ or }", "\text{(C) or (D)}", "\text{either } 5"
    s = _TEXT_BLOCK.sub(
        lambda m: _CONNECTOR_WORD.sub(";", m.group(1)) if _CONNECTOR_WORD.search(m.group(1)) else m.group(0),
        s,
    )
    s = _CONNECTOR_CMD.sub(";", s)
    s = re.sub(r"(?<![A-Za-z\\])either(?![A-Za-z])", ";", s, flags=re.I)
    pieces = _split_top_level(s, ",;")
    if len(pieces) == 1 and ";" in s:  # a connector nested in brackets: "5 (or 6)"
        pieces = s.split(";")
    out = []
    for piece in pieces:
        piece = _PAD.sub("", piece)
        if not piece:
            continue
        expanded = [piece]
        while len(expanded) <= MAX_ALTERNATIVES and any(_PLUS_MINUS.search(e) for e in expanded):
            expanded = [
                v
                for e in expanded
                for v in (
                    (_PLUS_MINUS.sub("+", e, count=1), _PLUS_MINUS.sub("-", e, count=1))
                    if _PLUS_MINUS.search(e)
                    else (e,)
                )
            ]
        out += expanded
        if len(out) > MAX_ALTERNATIVES:
            break
    return tuple(out) or (answer,)


def equality_sides(answer: str) -> list[str] | None:
    """The values an answer asserts: `5` -> [5]; `x = 5` -> [5]; `\\frac12 = 0.5` -> [\\frac12, 0.5];
    `43 = 42` -> [43, 42] (each must be right: a relation is never cut down to its right side); None for
    an answer that states another relation (`x \\le 5`, `x \\in \\{1, 2\\}`, `\\pi \\approx 3.14`)."""
    if _RELATION.search(answer):
        return None
    sides = _split_top_level(answer, "=")
    if len(sides) > 1 and _is_variable(sides[0]):
        sides = sides[1:]
    return [side.strip() for side in sides]


def has_relation(s: str) -> bool:
    return _RELATION.search(s) is not None or "=" in s


def boxed_answers(text: str) -> list[str]:
    """The content of every `\\boxed{...}` / `\\fbox{...}` in `text`, in order (a box nested in a box
    counts once, as its innermost last box, as `last_boxed` reads it). Linear in the text: each search
    starts where the last box ended."""
    out, i = [], 0
    while (m := _BOX_START.search(text, i)) is not None:
        content, i = box_at(text, m.start())
        if i < 0:  # unbalanced: no more boxes
            break
        if content is None:
            continue
        if "\\boxed" in content or "\\fbox" in content:
            content = last_boxed(content) or content
        out.append(content.strip())
    return out


# ----------------------------------------------------------------------------------------------------
# Math-Verify and the full verdict

MAX_MATH_VERIFY_CHARS = 20_000  # text Math-Verify reads: far longer than any final answer section


def _math_verify():
    import logging

    from math_verify import parse, verify

    # Its warning that its own timeouts are off is noise here: the pool enforces the limit from outside.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    return parse, verify


def math_verify_equal(answer: str, gt: str) -> bool:
    """Math-Verify on one boxed answer against one ground truth (gold first; section 12's two checks)."""
    if len(answer) > MAX_MATH_VERIFY_CHARS:
        return False
    parse, verify = _math_verify()
    parsed = parse("\\boxed{" + answer + "}", parsing_timeout=None)
    if not parsed:
        return False
    if len(parsed) >= 2 and str(parsed[1]) == gt:
        return True
    return verify(parse("\\boxed{" + gt + "}", parsing_timeout=None), parsed, timeout_seconds=None)


_BASE = re.compile(r"(?<=[0-9A-Za-z])\s*_\s*(?:\{\s*(\w+)\s*\}|(\w))")


def _bases(s: str) -> list[str]:
    """The subscripts written after numbers, `52_8` -> ['8'], `1011_{2}` -> ['2'] (the bases)."""
    return [a or b for a, b in _BASE.findall(s)] if re.search(r"\d\s*_", s) else []


def value_equal(answer: str, gt: str) -> bool:
    """One value against one value: MATH-normalised strings, DeepScaleR's sympy rules, then Math-Verify.

    Numbers written in a base must name the same base: both sympy parsers drop a number's subscript, so
    `52_9` was 52 and equal to `52_8` (the digits alone, `52`, still match `52_8`)."""
    bases = _bases(answer), _bases(gt)
    if all(bases) and bases[0] != bases[1]:
        return False
    return grade_mathd(answer, gt) or grade_sympy(answer, gt) or math_verify_equal(answer, gt)


def single_equal(answer: str, gt: str) -> bool:
    """One answer against one ground truth, relations kept: `x = 5` is 5, `43 = 42` is not 42 (every side
    of an equation must be right), `x \\le 5` is not 5."""
    if answer == gt:
        return True
    if has_relation(gt):
        return value_equal(answer, gt)
    sides = equality_sides(answer)
    return sides is not None and all(sides) and all(value_equal(side, gt) for side in sides)


def hedges(answer: str, gt: str) -> bool:
    """True when the answer offers several values and the ground truth is one."""
    return len(alternatives(answer)) > 1 and len(alternatives(gt)) <= 1


def answer_equal(answer: str, gt: str) -> bool:
    """One boxed answer against one ground truth: a hedge is wrong; a list is compared with a list as a
    set (each value matched to a different value of the ground truth)."""
    if not answer:
        return False
    if answer == gt:
        return True
    if hedges(answer, gt):
        return False
    if single_equal(answer, gt):
        return True
    alts, gt_alts = alternatives(answer), alternatives(gt)
    if 1 < len(alts) == len(gt_alts) <= MAX_ALTERNATIVES:
        return _one_to_one(alts, gt_alts)
    return False


def _one_to_one(alts: Sequence[str], gt_alts: Sequence[str]) -> bool:
    """A perfect matching of answer values to ground-truth values (augmenting paths; at most 8 x 8)."""
    edges = [[j for j, g in enumerate(gt_alts) if single_equal(a, g)] for a in alts]
    owner: dict[int, int] = {}

    def claim(i: int, seen: set) -> bool:
        for j in edges[i]:
            if j not in seen:
                seen.add(j)
                if j not in owner or claim(owner[j], seen):
                    owner[j] = i
                    return True
        return False

    return all(claim(i, set()) for i in range(len(alts)))


_TEXT_HEDGE = re.compile(
    r"(?<![A-Za-z\\])(?:or|either)(?![A-Za-z])|\\(?:lor|vee|pm|mp)(?![A-Za-z])|±|∓", re.I
)


def _hedged_sentence(solution: str, extracted: str) -> bool:
    """Whether the sentence Math-Verify read its answer from offers alternatives ("5 or 6")."""
    at = solution.rfind(extracted) if extracted else -1
    if at < 0:
        at = len(solution.rstrip()) - 1
    start = max(solution.rfind("\n", 0, max(at, 0)), solution.rfind(". ", 0, max(at, 0))) + 1
    ends = [
        p
        for p in (solution.find("\n", at + len(extracted)), solution.find(". ", at + len(extracted)))
        if p >= 0
    ]
    return _TEXT_HEDGE.search(solution[start : min(ends, default=len(solution))]) is not None


def text_answer_equal(solution: str, gts: list[str]) -> bool:
    """No box: section 12's Math-Verify fallback on the solution text, refused when the sentence it read
    offers alternatives (for a single-valued ground truth) or states a relation that is not `var = value`."""
    parse, verify = _math_verify()
    solution = solution[-MAX_MATH_VERIFY_CHARS:]
    parsed = parse(solution, parsing_timeout=None)
    if not parsed:
        return False
    extracted = str(parsed[1]) if len(parsed) >= 2 else ""
    for gt in gts:
        if len(alternatives(gt)) <= 1 and _hedged_sentence(solution, extracted):
            continue
        if extracted and not has_relation(gt):
            sides = equality_sides(extracted)
            if sides is None or len(sides) != 1:
                continue
        if extracted == gt or verify(
            parse("\\boxed{" + gt + "}", parsing_timeout=None), parsed, timeout_seconds=None
        ):
            return True
    return False


def grade(response: str, ground_truth: str | Sequence[str]) -> Verdict:
    """The hybrid verdict for one response (module docstring)."""
    if isinstance(response, bytes):
        response = response.decode("utf-8", errors="replace")
    if not isinstance(response, str):
        raise TypeError(f"a response must be a string, got {type(response).__name__}")
    response = response.replace("\x00", "")
    solution = solution_text(response)
    gts = ground_truths(ground_truth)
    answer = last_boxed(solution)
    if answer is None:
        correct = text_answer_equal(solution, gts)
        return Verdict.of(correct, "correct" if correct else "no_answer")
    answer = answer.strip()
    if not answer:
        return Verdict.of(False, "no_answer", answer)
    boxes = list(dict.fromkeys(b for b in boxed_answers(solution) if b != answer))
    if len(boxes) >= MAX_BOXES:
        return Verdict.of(False, "hedge", answer)
    if answer not in gts and not any(answer_equal(answer, gt) for gt in gts):  # (exact first: 1000 gts)
        return Verdict.of(False, "hedge" if any(hedges(answer, gt) for gt in gts) else "mismatch", answer)
    if all(any(answer_equal(b, gt) for gt in gts) for b in boxes):
        return Verdict.of(True, "correct", answer)
    return Verdict.of(False, "hedge", answer)  # other boxed answers that are not right: a hedge
