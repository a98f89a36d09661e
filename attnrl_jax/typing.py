"""Array aliases and the one legend of dimension letters used across attnrl_jax.

Einsum specs and shape comments use these letters:

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
"""

from typing import Any

import jax

Array = jax.Array
PRNGKey = jax.Array
# A nested dict of arrays (the model parameters), or of logical-axis tuples with the same structure.
Params = dict[str, Any]
LogicalAxes = tuple[str | None, ...]
