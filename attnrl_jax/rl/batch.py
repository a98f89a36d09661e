"""From rollouts to a `TrainBatch`: prompt + response tokens laid out for next-token prediction.

A training sequence is prompt (P tokens) then response (n tokens: a tree path, or a GRPO response). Row
position i predicts token i + 1, so the response token j is predicted at position P - 1 + j: that is where
its advantage, behaviour log-prob and loss mask go. Positions past the end are padding (segment id 0).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from attnrl_jax.algo.trees import Path
from attnrl_jax.rl.train_step import TrainBatch


def build_train_batch(
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    advantages: Sequence[Sequence[float]],
    logprobs: Sequence[Sequence[float]],
    length: int,
    pad_id: int = 0,
    rows: int | None = None,
) -> TrainBatch:
    """Packs (prompt, response) pairs into a right-padded TrainBatch of `length` tokens.

    Args:
      prompts: token ids per sequence.
      responses: the response tokens per sequence.
      advantages, logprobs: per response token, the advantage and the behaviour log-prob.
      length: the row length (prompt + response must fit).
      pad_id: filler token.
      rows: pad the batch to this many rows with empty (all-masked) rows, e.g. to divide into micro-batches.

    Returns:
      TrainBatch with ref_logp zeros (fill it with a reference forward when the KL coefficient is > 0).
    """
    n = len(prompts)
    rows = n if rows is None else rows
    if rows < n:
        raise ValueError(f"rows={rows} is fewer than the {n} sequences")
    tokens = np.full((rows, length), pad_id, np.int32)
    seg = np.zeros((rows, length), np.int32)
    mask = np.zeros((rows, length), np.float32)
    adv = np.zeros((rows, length), np.float32)
    old = np.zeros((rows, length), np.float32)
    for i, (p, r, a, lp) in enumerate(zip(prompts, responses, advantages, logprobs)):
        p, r = list(p), list(r)
        if not p:
            raise ValueError(f"sequence {i} has an empty prompt")
        if not (len(r) == len(a) == len(lp)):
            raise ValueError(f"sequence {i}: {len(r)} tokens, {len(a)} advantages, {len(lp)} log-probs")
        total = len(p) + len(r)
        if total > length:
            raise ValueError(f"sequence {i} has {total} tokens, more than the row length {length}")
        tokens[i, :total] = p + r
        seg[i, :total] = 1
        span = slice(len(p) - 1, total - 1)  # positions that predict the response tokens
        mask[i, span] = 1.0
        adv[i, span] = a
        old[i, span] = lp
    targets = np.concatenate([tokens[:, 1:], np.full((rows, 1), pad_id, np.int32)], axis=1)
    # Host arrays: the trainer places each mini-batch on the mesh (each process feeds its own rows).
    return TrainBatch(
        tokens=tokens,
        targets=targets,
        segment_ids=seg,
        loss_mask=mask,
        advantages=adv,
        old_logp=old,
        ref_logp=np.zeros((rows, length), np.float32),
    )


def paths_to_train_batch(
    prompts: Sequence[Sequence[int]],
    paths: Sequence[Path],
    length: int,
    pad_id: int = 0,
    rows: int | None = None,
) -> TrainBatch:
    """Tree paths (section 8.3) as a TrainBatch; `prompts[path.prompt]` is each path's prompt."""
    return build_train_batch(
        [prompts[p.prompt] for p in paths],
        [p.tokens for p in paths],
        [p.advantages for p in paths],
        [p.logprobs for p in paths],
        length,
        pad_id,
        rows,
    )
