"""Dense masked dot-product attention: the XLA reference path every other path is checked against."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array | None,
                          *, sm_scale: float | None = None,
                          logit_soft_cap: float | None = None) -> jax.Array:
  """Softmax attention with an explicit boolean mask and grouped KV heads.

  Args:
    q: [batch, q_len, heads, head_dim].
    k, v: [batch, kv_len, kv_heads, head_dim]; heads % kv_heads == 0 (GQA / MQA).
    allowed: bool broadcastable to [batch, heads, q_len, kv_len], or None for no mask.
    sm_scale: logit scale, default 1/sqrt(head_dim).
    logit_soft_cap: if set, logits become cap * tanh(logits / cap).

  Returns:
    [batch, q_len, heads, head_dim] in q's dtype. Rows with no allowed key are 0.
  """
  batch, q_len, heads, head_dim = q.shape
  kv_heads = k.shape[2]
  if heads % kv_heads:
    raise ValueError(f"attention: heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
  groups = heads // kv_heads
  scale = head_dim ** -0.5 if sm_scale is None else sm_scale
  qg = q.reshape(batch, q_len, kv_heads, groups, head_dim)
  logits = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, preferred_element_type=jnp.float32) * scale
  if logit_soft_cap is not None:
    logits = logit_soft_cap * jnp.tanh(logits / logit_soft_cap)
  if allowed is not None:
    allowed = jnp.broadcast_to(allowed, (batch, heads, q_len, k.shape[1]))
    allowed = allowed.reshape(batch, kv_heads, groups, q_len, k.shape[1])
    logits = jnp.where(allowed, logits, -jnp.inf)
  row_max = jnp.max(logits, axis=-1, keepdims=True)
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  weights = jnp.exp(logits - jax.lax.stop_gradient(row_max))
  denom = jnp.sum(weights, axis=-1, keepdims=True)
  probs = weights / jnp.where(denom > 0, denom, 1.0)
  out = jnp.einsum("bhgqk,bkhd->bqhgd", probs.astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
  return out.reshape(batch, q_len, heads, head_dim).astype(q.dtype)
