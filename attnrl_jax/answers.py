"""Answer text, shared by the data reader and the verifier: the boxed answer of a text and the ground truths
of a problem. Here, below both, so that reading a data file checks its ground truths by the verifier's own
rules without the data stage importing the rewards stage."""

from __future__ import annotations

import numbers
import re
from collections.abc import Iterable, Sequence

_BRACE = re.compile(r"[{}]")
_INLINE_END = re.compile(r"[$\n]")


def box_at(text: str, start: int) -> tuple[str | None, int]:
    """The box whose command starts at `start`: (content, where scanning resumes). Content is None for a
    command with no box after it (resume after the command) or an empty `\\boxed x`; an unbalanced box
    gives (None, -1). Brace matching visits only the braces (no recursion, no regex backtracking)."""
    j = start + (len("\\boxed") if text.startswith("\\boxed", start) else len("\\fbox"))
    if j < len(text) and text[j] == " ":  # "\boxed 5", up to "$" or the end of the line
        e = _INLINE_END.search(text, j + 1)
        end = e.start() if e else len(text)
        return text[j + 1 : end].strip() or None, end
    if j >= len(text) or text[j] != "{":
        return None, j
    depth = 0
    for brace in _BRACE.finditer(text, j):
        depth += 1 if brace.group() == "{" else -1
        if depth == 0:
            return text[j + 1 : brace.start()], brace.start() + 1
    return None, -1


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` / `\\fbox{...}` (or `\\boxed x` up to `$` or end of line); an
    unbalanced last box gives None."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    return None if start < 0 else box_at(text, start)[0]


def ground_truths(gt: str | int | Sequence[str | int]) -> list[str]:
    """The ground truth(s) as a list of non-empty strings, boxed ones unboxed (an integer is its decimal
    string). Raises ValueError for anything else: None, an empty string or box, an empty list, a float
    (whose string form is not an answer anyone wrote)."""
    items = [gt] if isinstance(gt, (str, numbers.Integral)) else gt
    if isinstance(items, (bytes, dict)) or not isinstance(items, Iterable):
        raise ValueError(f"a ground truth must be a string or a list of strings, got {_describe(gt)}")
    items = list(items)
    if not items:
        raise ValueError("the list of ground truths is empty")
    out = []
    for item in items:
        if isinstance(item, numbers.Integral) and not isinstance(item, bool):
            item = str(int(item))
        if not isinstance(item, str):
            raise ValueError(f"a ground truth must be a string or a list of strings, got {_describe(item)}")
        if "\\boxed" in item or "\\fbox" in item:
            item = last_boxed(item) or item
        item = item.strip()
        if not item:
            raise ValueError(f"a ground truth is empty: {_describe(gt)}")
        out.append(item)
    return out


def _describe(x) -> str:
    text = repr(x)
    return f"{type(x).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"
