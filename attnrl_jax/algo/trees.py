"""Trees, Monte Carlo values, advantages and training paths (docs/algorithm.md section 8; paper section 2.2
eqs. 2-3, TreeRL).

Per prompt, a virtual root holds one subtree per initial response. A response with sorted distinct branch
offsets u_1 < ... < u_m becomes a chain of segments

  seg_0 = [0, u_1),  seg_j = [u_j, u_{j+1}),  seg_m = [u_m, R)   (seg_m is a leaf: the original ending)

where seg_0 hangs off the root and seg_j off seg_{j-1}; each continuation sampled at u_j is a leaf under
seg_{j-1} holding only its own tokens. (With N = 2 points at the same offset the chain is seg_0 with all
four continuations under it and seg_1 = [u_1, R) as the leaf, as in the code.) An unbranched response is a
single leaf under the root. With r in {0, 1} the leaf correctness and L(n) the leaves under n:

  V(n) = mean_{l in L(n)} r_l          V(root) = mean over all leaves of the prompt
  A(n) = [(V(n) - V(root)) + (V(n) - V(parent(n)))] / sqrt(|L(n)|)

Every root-to-leaf path of a branched response is one training sequence whose tokens carry the advantage
of the segment holding them; unbranched responses (paths of length 1) are not trained on but count in
V(root). Behaviour log-probs follow the tokens: prefix tokens keep those from when the prefix was sampled,
continuation tokens those of the continuation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Continuation:
    """One continuation sampled from `offset` tokens into its response (tokens after the cut only)."""

    offset: int
    tokens: np.ndarray
    logprobs: np.ndarray
    acc: float


@dataclasses.dataclass(frozen=True)
class Response:
    """An initial response with its 0/1 correctness and, if it was branched, its continuations."""

    tokens: np.ndarray
    logprobs: np.ndarray
    acc: float
    continuations: tuple[Continuation, ...] = ()

    def __post_init__(self):
        if len(self.tokens) != len(self.logprobs):
            raise ValueError(f"response has {len(self.tokens)} tokens but {len(self.logprobs)} log-probs")
        for c in self.continuations:
            if not 0 <= c.offset < max(len(self.tokens), 1):
                raise ValueError(
                    f"continuation offset {c.offset} outside a {len(self.tokens)}-token response"
                )
            if len(c.tokens) != len(c.logprobs):
                raise ValueError(f"continuation has {len(c.tokens)} tokens but {len(c.logprobs)} log-probs")


@dataclasses.dataclass(frozen=True)
class Path:
    """One training sequence (the response part; the prompt is the prompt's own).

    Attributes:
      prompt: index of the prompt in the batch.
      response: index of the initial response the path starts from.
      tokens, advantages, logprobs: [len] per-token ids, float advantages, behaviour log-probs.
      prefix_len: tokens that come from the initial response (all of them for the original path).
      is_original: True for the original response's own path, False for a continuation's.
      acc: 0/1 correctness of the path's leaf.
    """

    prompt: int
    response: int
    tokens: np.ndarray
    advantages: np.ndarray
    logprobs: np.ndarray
    prefix_len: int
    is_original: bool
    acc: float


@dataclasses.dataclass(frozen=True)
class ResponseTree:
    """Values and advantages of one response's chain (empty for an unbranched response).

    Attributes:
      cuts: [m + 2] segment boundaries 0, u_1, ..., u_m, R (segment j is [cuts[j], cuts[j+1])).
      seg_values, seg_leaves, seg_advantages: [m + 1] V, |L| and A of seg_0..seg_m.
      cont_advantages: per continuation (input order), the advantage of its leaf.
      cont_parent: per continuation, the index j of the segment it hangs off.
    """

    cuts: np.ndarray
    seg_values: np.ndarray
    seg_leaves: np.ndarray
    seg_advantages: np.ndarray
    cont_advantages: np.ndarray
    cont_parent: np.ndarray


@dataclasses.dataclass(frozen=True)
class PromptTrees:
    root_value: float
    num_leaves: int
    trees: list[ResponseTree | None]  # None for unbranched responses


def build_prompt_trees(responses: Sequence[Response]) -> PromptTrees:
    """Values and advantages of every node of one prompt's trees (module docstring)."""
    leaf_rewards = []
    for r in responses:
        leaf_rewards.append(r.acc)
        leaf_rewards.extend(c.acc for c in r.continuations)
    if not leaf_rewards:
        raise ValueError("a prompt needs at least one response")
    v_root = float(np.mean(leaf_rewards))
    trees: list[ResponseTree | None] = []
    for r in responses:
        if not r.continuations:
            trees.append(None)
            continue
        offsets = np.array([c.offset for c in r.continuations], np.int64)
        accs = np.array([c.acc for c in r.continuations], np.float64)
        unique = np.unique(offsets)
        m = len(unique)
        cuts = np.concatenate([[0], unique, [len(r.tokens)]]).astype(np.int64)
        parent = np.searchsorted(unique, offsets)  # continuation at u_{j+1} hangs off seg_j
        # Leaves under seg_j: the original leaf plus every continuation whose parent index is >= j.
        leaves = np.array([1 + np.sum(parent >= j) for j in range(m + 1)], np.float64)
        sums = np.array([r.acc + accs[parent >= j].sum() for j in range(m + 1)], np.float64)
        values = sums / leaves
        parent_values = np.concatenate([[v_root], values[:-1]])
        seg_adv = ((values - v_root) + (values - parent_values)) / np.sqrt(leaves)
        cont_adv = (accs - v_root) + (accs - values[parent])  # leaves: |L| = 1
        trees.append(ResponseTree(cuts, values, leaves.astype(np.int64), seg_adv, cont_adv, parent))
    return PromptTrees(v_root, len(leaf_rewards), trees)


def prompt_paths(
    prompt: int, responses: Sequence[Response], trees: PromptTrees, max_len: int | None = None
) -> list[Path]:
    """The training paths of one prompt: one per leaf of every branched response (section 8.3).

    Paths are cut to `max_len` tokens when given.
    """
    out = []
    for i, (r, tree) in enumerate(zip(responses, trees.trees)):
        if tree is None:
            continue  # unbranched: a path of length 1, not trained on
        seg_len = np.diff(tree.cuts)
        token_adv = np.repeat(tree.seg_advantages, seg_len)  # [R]
        candidates = [(r.tokens, token_adv, r.logprobs, len(r.tokens), True, r.acc)]
        for c, adv, j in zip(r.continuations, tree.cont_advantages, tree.cont_parent):
            cut = int(tree.cuts[j + 1])
            candidates.append(
                (
                    np.concatenate([r.tokens[:cut], c.tokens]),
                    np.concatenate([token_adv[:cut], np.full(len(c.tokens), adv)]),
                    np.concatenate([r.logprobs[:cut], c.logprobs]),
                    cut,
                    False,
                    c.acc,
                )
            )
        for tokens, adv, logp, prefix, original, acc in candidates:
            n = len(tokens) if max_len is None else min(len(tokens), max_len)
            out.append(
                Path(
                    prompt=prompt,
                    response=i,
                    tokens=np.asarray(tokens[:n]),
                    advantages=np.asarray(adv[:n], np.float32),
                    logprobs=np.asarray(logp[:n], np.float32),
                    prefix_len=min(prefix, n),
                    is_original=original,
                    acc=float(acc),
                )
            )
    return out


def filter_zero_variance(paths: Sequence[Path]) -> tuple[list[Path], list[int]]:
    """Drops every path of a prompt whose kept paths' leaf accuracies are all 1 or all 0 (section 8.4).

    Returns the kept paths and the sorted indices of the dropped prompts. Zero-advantage paths inside a
    mixed prompt stay.
    """
    by_prompt: dict[int, list[float]] = {}
    for p in paths:
        by_prompt.setdefault(p.prompt, []).append(p.acc)
    dropped = sorted(q for q, accs in by_prompt.items() if np.mean(accs) in (0.0, 1.0))
    gone = set(dropped)
    return [p for p in paths if p.prompt not in gone], dropped


def pack_paths(paths: Sequence[Path], length: int, pad_id: int = 0) -> dict[str, np.ndarray]:
    """Right-pads paths into arrays: tokens, advantages, logprobs, mask [P, length]; prefix_len, prompt,
    is_original, acc [P]."""
    p = len(paths)
    out = {
        "tokens": np.full((p, length), pad_id, np.int32),
        "advantages": np.zeros((p, length), np.float32),
        "logprobs": np.zeros((p, length), np.float32),
        "mask": np.zeros((p, length), np.int32),
        "prefix_len": np.array([x.prefix_len for x in paths], np.int32),
        "prompt": np.array([x.prompt for x in paths], np.int32),
        "is_original": np.array([x.is_original for x in paths], bool),
        "acc": np.array([x.acc for x in paths], np.float32),
    }
    for i, x in enumerate(paths):
        n = len(x.tokens)
        if n > length:
            raise ValueError(f"path {i} has {n} tokens, more than the packed length {length}")
        out["tokens"][i, :n] = x.tokens
        out["advantages"][i, :n] = x.advantages
        out["logprobs"][i, :n] = x.logprobs
        out["mask"][i, :n] = 1
    return out


def valid_token_count(paths: Sequence[Path]) -> int:
    """Tokens with a non-zero advantage (the paper's "valid tokens", footnote 1)."""
    return int(sum(np.count_nonzero(p.advantages) for p in paths))
