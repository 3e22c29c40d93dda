"""Dense masked dot-product attention: the XLA reference path every other path is checked against."""

from __future__ import annotations

import jax
import jax.numpy as jnp

CONTRACTIONS = ("einsum", "broadcast", "auto")


def _einsum_logits(qg: jax.Array, k: jax.Array) -> jax.Array:
  return jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, preferred_element_type=jnp.float32)


def _einsum_combine(probs: jax.Array, v: jax.Array) -> jax.Array:
  return jnp.einsum("bhgqk,bkhd->bqhgd", probs, v, preferred_element_type=jnp.float32)


def _broadcast_logits(qg: jax.Array, k: jax.Array) -> jax.Array:
  """The same logits as `_einsum_logits` from one multiply-and-reduce over head_dim that reads
  k in its stored [batch, kv_len, kv_heads, head_dim] layout ([b, q, k, h, g] -> [b, h, g, q, k])."""
  product = qg.astype(jnp.float32)[:, :, None] * k.astype(jnp.float32)[:, None, :, :, None]
  return jnp.transpose(jnp.sum(product, axis=-1), (0, 3, 4, 1, 2))


def _broadcast_combine(probs: jax.Array, v: jax.Array) -> jax.Array:
  """`_einsum_combine` as one multiply-and-reduce over kv_len, reading v in its stored layout."""
  p = jnp.transpose(probs.astype(jnp.float32), (0, 3, 4, 1, 2))  # [b, q, k, h, g]
  return jnp.sum(p[..., None] * v.astype(jnp.float32)[:, None, :, :, None], axis=2)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array | None,
                          *, sm_scale: float | None = None,
                          logit_soft_cap: float | None = None,
                          contraction: str = "einsum") -> jax.Array:
  """Softmax attention with an explicit boolean mask and grouped KV heads.

  Args:
    q: [batch, q_len, heads, head_dim].
    k, v: [batch, kv_len, kv_heads, head_dim]; heads % kv_heads == 0 (GQA / MQA).
    allowed: bool broadcastable to [batch, heads, q_len, kv_len], or None for no mask.
    sm_scale: logit scale, default 1/sqrt(head_dim).
    logit_soft_cap: if set, logits become cap * tanh(logits / cap).
    contraction: how q.k and p.v are computed. "einsum": batched matmuls. "broadcast":
      multiply-and-reduce fusions that read k and v in their stored layout. "auto": "broadcast"
      for a single query row (batch 1, one new token: a batch-1 decode step) on the CPU backend,
      "einsum" otherwise. XLA:CPU runs that degenerate einsum slowly: an lm_tiny decode step at
      batch 1 took 2.9 ms with it, 1.1 ms with "broadcast" and 1.1 ms with einsums at batch 2;
      elsewhere the two forms were within noise or the einsums faster (BENCHMARKS.md,
      "Decode-step attention on CPU").

  Returns:
    [batch, q_len, heads, head_dim] in q's dtype. Rows with no allowed key are 0.
  """
  if contraction not in CONTRACTIONS:
    raise ValueError(f"attention contraction: got {contraction!r}; allowed: {list(CONTRACTIONS)}")
  batch, q_len, heads, head_dim = q.shape
  if contraction == "auto":  # decided when tracing, from the backend jit compiles for
    single_row = batch == 1 and q_len == 1
    contraction = "broadcast" if single_row and jax.default_backend() == "cpu" else "einsum"
  kv_heads = k.shape[2]
  if heads % kv_heads:
    raise ValueError(f"attention: heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
  groups = heads // kv_heads
  scale = head_dim ** -0.5 if sm_scale is None else sm_scale
  qg = q.reshape(batch, q_len, kv_heads, groups, head_dim)
  logits = _contract(_einsum_logits, _broadcast_logits, contraction, qg, k) * scale
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
  out = _contract(_einsum_combine, _broadcast_combine, contraction, probs.astype(v.dtype), v)
  return out.reshape(batch, q_len, heads, head_dim).astype(q.dtype)


def _contract(einsum_fn, broadcast_fn, contraction: str, *args: jax.Array) -> jax.Array:
  return (einsum_fn if contraction == "einsum" else broadcast_fn)(*args)
