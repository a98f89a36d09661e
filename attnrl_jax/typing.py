"""Array aliases and the one legend of dimension letters used across attnrl_jax.

Einsum specs and shape comments use these letters, one meaning each:

  B  batch (rows: prompts, responses or packed sequences)
  T  query length (tokens of the current chunk)
  S  key/value length (tokens attended to; S == T without a cache)
  L  layers
  D  model width (hidden size)
  N  query heads
  K  key/value heads (grouped-query attention: N = K * G)
  G  query heads per key/value head
  H  head dimension
  F  MLP width (intermediate size)
  V  vocabulary

The sampler and FCI add:

  R  sources: prefixes prefilled once for all of their rows (a prompt, or a response to branch from)
  P  prefix length (tokens of a source)
  M  tokens sampled per row at most (max_new_tokens)
  C  FCI step buckets (step 0 is the prompt; later steps past C - 1 share the last)
  Y  segmentations tracked at once ("\\n\\n" and its "\\n" fallback)
  J  FCI slots: the decode slots that carry FCI state
  X  shards of the batch axes (each holds its slots' rows and KV pages)
  A  KV pages per shard in the pool
  MB pages a row's page table names (its positions / page)
  Q  sources entering per shard in one insertion
  W  rows entering per shard in one insertion
"""

from typing import Any

import jax

Array = jax.Array
PRNGKey = jax.Array
# A nested dict of arrays (the model parameters), or of logical-axis tuples with the same structure.
Params = dict[str, Any]
LogicalAxes = tuple[str | None, ...]
