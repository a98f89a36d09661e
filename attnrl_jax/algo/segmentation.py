"""Step segmentation of responses (docs/algorithm.md section 4; paper section 3.1.1 "Step 1").

A response is split into reasoning steps at separator tokens. The separator vocabularies are built once by
decoding every vocabulary id on its own:

  Sigma2 = {v : decode(v) contains "\\n\\n"},   Sigma1 = {v : decode(v) contains "\\n"}.

Sigma2 includes merged BPE tokens such as ".\\n\\n", ":\\n\\n" and "\\n\\n\\n". For a response with R valid
tokens x_1..x_R the separators are the tokens in Sigma2; if there are none, Sigma1; if still none, every
token is its own step. A step ends right after its separator, so the separator belongs to the step it
closes. With e_j the 1-based position of the j-th separator, the response steps are the half-open ranges

  U_c = [e_{c-1}, e_c)  for c = 1..S,  e_0 = 0,

plus a final step [e_m, R) when the last separator is not the last token. Adding the prompt length P gives
absolute coordinates, where the prompt is "step 0", U_0 = [0, P). The think-end step kappa is the 1-based
step holding the last `</think>` token, or -1 when there is none.
"""

from __future__ import annotations

import dataclasses

import numpy as np

NO_THINK_END = -1


@dataclasses.dataclass(frozen=True)
class SeparatorTable:
    """Per-vocabulary-id separator flags and the `</think>` id (built once per tokenizer).

    Attributes:
      double_newline: [V] bool, decode(v) contains "\\n\\n" (Sigma2).
      newline: [V] bool, decode(v) contains "\\n" (Sigma1).
      think_end_id: id of `</think>` (the last id of its encoding), or -1 if the tokenizer has none.
    """

    double_newline: np.ndarray
    newline: np.ndarray
    think_end_id: int = -1

    @classmethod
    def from_tokenizer(cls, tokenizer, vocab_size: int | None = None) -> SeparatorTable:
        """Decodes every id in [0, vocab_size) on its own (default: the tokenizer's full vocabulary).

        `vocab_size` may exceed the tokenizer (a padded embedding); ids past the tokenizer are never
        separators.
        """
        n_tok = len(tokenizer)
        size = n_tok if vocab_size is None else vocab_size
        texts = tokenizer.batch_decode([[i] for i in range(min(size, n_tok))])
        double = np.zeros(size, bool)
        single = np.zeros(size, bool)
        double[: len(texts)] = ["\n\n" in t for t in texts]
        single[: len(texts)] = ["\n" in t for t in texts]
        ids = tokenizer.encode("</think>", add_special_tokens=False)
        return cls(double, single, int(ids[-1]) if ids else -1)

    @classmethod
    def from_strings(cls, vocab: list[str], think_end: str | None = "</think>") -> SeparatorTable:
        """A table for a vocabulary given as the decoded string of each id (tests, toy tokenizers)."""
        double = np.array(["\n\n" in t for t in vocab], bool)
        single = np.array(["\n" in t for t in vocab], bool)
        think = vocab.index(think_end) if think_end is not None and think_end in vocab else -1
        return cls(double, single, think)


@dataclasses.dataclass(frozen=True)
class Steps:
    """The steps of one response.

    Attributes:
      bounds: [S + 1] int response-token offsets 0 = b_0 < b_1 < ... < b_S = R; step c (1-based) is
        [b_{c-1}, b_c). Empty response: [0] and S = 0.
      think_step: 1-based step holding the last `</think>`, or -1.
      prompt_len: P, the number of valid prompt tokens (for absolute coordinates).
    """

    bounds: np.ndarray
    think_step: int
    prompt_len: int

    @property
    def num_steps(self) -> int:
        return len(self.bounds) - 1

    @property
    def starts(self) -> np.ndarray:
        """[S] response offset of each step's first token (the branch offset o_c of section 6)."""
        return self.bounds[:-1]

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.bounds)

    def absolute_bounds(self) -> np.ndarray:
        """[S + 2] boundaries 0, P, P + b_1, ..., P + b_S of prompt step 0 and response steps 1..S."""
        return np.concatenate([[0], self.prompt_len + self.bounds])

    def token_step_ids(self, total_len: int | None = None) -> np.ndarray:
        """Per-token step ids over prompt + response: 0 for the prompt, c for step c, -1 for padding."""
        r = int(self.bounds[-1])
        total = self.prompt_len + r if total_len is None else total_len
        if total < self.prompt_len + r:
            raise ValueError(f"total_len={total} is shorter than prompt + response = {self.prompt_len + r}")
        ids = np.full(total, -1, np.int32)
        ids[: self.prompt_len] = 0
        ids[self.prompt_len : self.prompt_len + r] = np.repeat(np.arange(1, self.num_steps + 1), self.lengths)
        return ids


def segment(tokens: np.ndarray, table: SeparatorTable, prompt_len: int = 0) -> Steps:
    """Splits the valid response tokens `tokens` [R] into steps (module docstring).

    Args:
      tokens: the response's valid token ids (up to and including the first EOS).
      table: separator flags of the vocabulary.
      prompt_len: P, stored for absolute coordinates.
    """
    tokens = np.asarray(tokens, np.int64)
    r = len(tokens)
    if r == 0:
        return Steps(np.zeros(1, np.int64), NO_THINK_END, prompt_len)
    if tokens.min() < 0 or tokens.max() >= len(table.double_newline):
        raise ValueError(
            f"token ids must lie in [0, {len(table.double_newline)}), got range "
            f"[{tokens.min()}, {tokens.max()}]"
        )
    seps = np.flatnonzero(table.double_newline[tokens])
    if len(seps) == 0:
        seps = np.flatnonzero(table.newline[tokens])
    if len(seps) == 0:
        seps = np.arange(r)  # every token is its own step
    ends = seps + 1
    bounds = np.concatenate([[0], ends, [r] if ends[-1] != r else []]).astype(np.int64)
    think_step = NO_THINK_END
    if table.think_end_id >= 0:
        hits = np.flatnonzero(tokens == table.think_end_id)
        if len(hits):
            # Step c holds token i when b_{c-1} <= i < b_c.
            think_step = int(np.searchsorted(bounds, hits[-1], side="right"))
    return Steps(bounds, think_step, prompt_len)
