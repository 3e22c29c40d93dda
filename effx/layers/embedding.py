"""Token embedding, optionally tied to the output projection."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from effx.layers.initializers import partitioned


class Embed(nn.Module):
  """Token embedding table `[vocab_size, features]` (logical axes "vocab", "embed").

  `__call__` looks tokens up; `attend` projects hidden states back onto the vocabulary with
  the same table (weight tying).

  Attributes:
    vocab_size: number of rows.
    features: embedding width.
    dtype: compute dtype of the outputs.
    param_dtype: dtype of the table.
    init_scale: standard deviation of the normal initialiser.
  """

  vocab_size: int
  features: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  init_scale: float = 1.0

  def setup(self):
    self.embedding = self.param(
        "embedding", partitioned(nn.initializers.normal(self.init_scale), ("vocab", "embed")),
        (self.vocab_size, self.features), self.param_dtype)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    """tokens: int [batch, seq] -> [batch, seq, features] in `dtype`."""
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise TypeError(f"Embed: tokens must be an integer array, got dtype {tokens.dtype}")
    return jnp.take(self.embedding, tokens, axis=0).astype(self.dtype)

  def attend(self, x: jax.Array) -> jax.Array:
    """x: [..., features] -> logits [..., vocab_size] (float32 accumulation, `dtype` out)."""
    return jnp.einsum("...d,vd->...v", x.astype(self.dtype), self.embedding.astype(self.dtype),
                      preferred_element_type=jnp.float32).astype(self.dtype)
