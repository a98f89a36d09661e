"""Training and evaluation problems in the verl parquet format, and a checkpointable prompt iterator.

verl's RL format (docs/algorithm.md section 2): `prompt` is a list with one chat message (`role`, `content`),
`reward_model.ground_truth` is a string (training files) or a list of strings (evaluation files), and
`extra_info.index` identifies the problem. The iterator shuffles with a seed per epoch, drops prompts
longer than the maximum (counted), and its whole state is three integers that go into checkpoints.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from attnrl_jax.answers import ground_truths

REQUIRED_COLUMNS = ("prompt", "reward_model")


@dataclasses.dataclass(frozen=True)
class Problem:
    index: int
    data_source: str
    messages: tuple[dict, ...]  # chat messages, the user turn last
    ground_truth: str | tuple[str, ...]

    @property
    def question(self) -> str:
        return self.messages[-1]["content"]


def read_verl_parquet(path: str) -> list[Problem]:
    """Reads a verl-format parquet file; raises an error naming the file and the missing or bad field."""

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such parquet file")
    try:
        table = pq.read_table(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a file that is not parquet
        raise ValueError(f"{path}: not a readable parquet file ({type(e).__name__}: {e})") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(
            f"{path}: missing column(s) {missing}; verl format needs {list(REQUIRED_COLUMNS)} "
            f"(found {table.column_names})"
        )
    problems = []
    for row_id, row in enumerate(table.to_pylist()):
        messages = row["prompt"]
        if not isinstance(messages, list) or not messages or not all("content" in m for m in messages):
            raise ValueError(f"{path}: row {row_id}: 'prompt' must be a non-empty list of chat messages")
        gt = (row.get("reward_model") or {}).get("ground_truth")
        if gt is None:
            raise ValueError(f"{path}: row {row_id}: reward_model.ground_truth is missing")
        try:  # the verifier's own check (non-empty strings), here where the file and row can be named
            ground_truths(gt)
        except ValueError as e:
            raise ValueError(f"{path}: row {row_id}: reward_model.ground_truth: {e}") from None
        # An integer column (common in real data sets) or list holds the integers' decimal strings.
        gt = str(gt) if isinstance(gt, (str, int)) else tuple(str(g) for g in gt)
        info = row.get("extra_info") or {}
        index = info.get("index", row_id)
        problems.append(Problem(int(index), str(row.get("data_source", "")), tuple(messages), gt))
    return problems


def write_verl_parquet(path: str, problems: Sequence[Problem]) -> None:
    """Writes problems in the verl format (tests and the built-in task make their own files)."""

    rows = [
        {
            "data_source": p.data_source,
            "prompt": [dict(m) for m in p.messages],
            "ability": "math",
            "reward_model": {
                "ground_truth": p.ground_truth if isinstance(p.ground_truth, str) else list(p.ground_truth),
                "style": "rule",
            },
            "extra_info": {"index": p.index, "split": "train"},
        }
        for p in problems
    ]
    pq.write_table(pa.Table.from_pylist(rows), path)


@dataclasses.dataclass(frozen=True)
class IteratorState:
    """Everything needed to resume: the shuffle seed, the epoch and the position within it."""

    seed: int = 0
    epoch: int = 0
    position: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> IteratorState:
        return cls(int(d["seed"]), int(d["epoch"]), int(d["position"]))


class PromptIterator:
    """Draws problems in a seeded order, epoch after epoch.

    Args:
      problems: the dataset.
      seed: the shuffle seed (each epoch permutes with (seed, epoch)).
      prompt_len: optional function giving a problem's prompt length in tokens; with `max_prompt_len`,
        longer prompts are dropped once, up front, and counted in `dropped`.
    """

    def __init__(
        self,
        problems: Sequence[Problem],
        seed: int = 0,
        prompt_len: Callable[[Problem], int] | None = None,
        max_prompt_len: int | None = None,
    ):
        kept = list(problems)
        self.dropped = 0
        if max_prompt_len is not None and prompt_len is not None:
            kept = [p for p in problems if prompt_len(p) <= max_prompt_len]
            self.dropped = len(problems) - len(kept)
        if not kept:
            raise ValueError(f"no problem left to train on ({len(problems)} given, {self.dropped} too long)")
        self.problems = kept
        self.state = IteratorState(seed, 0, 0)

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.state.seed, epoch]).permutation(len(self.problems))

    def take(self, n: int) -> list[Problem]:
        """The next n problems (crossing into the next epoch, reshuffled, when one ends)."""
        out = []
        epoch, pos = self.state.epoch, self.state.position
        order = self._order(epoch)
        while len(out) < n:
            if pos == len(order):
                epoch, pos = epoch + 1, 0
                order = self._order(epoch)
            out.append(self.problems[order[pos]])
            pos += 1
        self.state = IteratorState(self.state.seed, epoch, pos)
        return out

    def restore(self, state: IteratorState) -> None:
        if not 0 <= state.position <= len(self.problems):
            raise ValueError(
                f"iterator position {state.position} outside a {len(self.problems)}-problem dataset"
            )
        self.state = state
