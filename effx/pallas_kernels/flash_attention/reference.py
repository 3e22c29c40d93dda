"""Pure-jnp (XLA) attention with the kernels' exact semantics.

Shapes: q ``[batch, q_len, heads, head_dim]``; k, v ``[batch, kv_len, kv_heads, head_dim]``
with ``heads % kv_heads == 0`` (GQA/MQA). Output ``[batch, q_len, heads, head_dim]`` in q's
dtype. Scores, softmax and the weighted sum run in float32.

Masking (all combined with AND):
* ``causal``: query i sees key j iff ``j <= i`` (positions 0..len-1 on both axes, i.e.
  top-left aligned like ``jax.nn.dot_product_attention`` and ``mask.dense(q_len, kv_len)``);
* ``window=w``: query i sees key j iff ``i - j < w`` (a look-back limit; with ``causal`` this
  is the usual sliding window of w keys including the query's own position);
* ``segment_ids``: query i sees key j iff their segment ids are equal (packed documents);
* ``dense_mask``: a static bool ``[heads_or_1, q_len, kv_len]`` for arbitrary (block-)sparse
  patterns; ``block_mask`` is its tile layout and only matters to the kernels.
A query row with no allowed key outputs 0 (and has log-sum-exp +inf internally).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class SegmentIds(NamedTuple):
  """Segment ids of the queries (int32 ``[batch, q_len]``) and keys (``[batch, kv_len]``)."""
  q: jax.Array
  kv: jax.Array


def as_segment_ids(segment_ids, q_len: int, kv_len: int) -> SegmentIds | None:
  """Accepts None, a SegmentIds/(q, kv) pair, or one ``[batch, len]`` array (self-attention)."""
  if segment_ids is None:
    return None
  if isinstance(segment_ids, (tuple, list)):
    q_ids, kv_ids = segment_ids
  else:
    if q_len != kv_len:
      raise ValueError(
          f"segment_ids: one array needs q_len == kv_len (got {q_len}, {kv_len}); pass (q, kv)")
    q_ids = kv_ids = segment_ids
  q_ids, kv_ids = jnp.asarray(q_ids, jnp.int32), jnp.asarray(kv_ids, jnp.int32)
  if q_ids.shape[-1] != q_len or kv_ids.shape[-1] != kv_len:
    raise ValueError(
        f"segment_ids shapes {q_ids.shape}, {kv_ids.shape} do not match lengths {q_len}, {kv_len}")
  return SegmentIds(q_ids, kv_ids)


def check_inputs(q, k, v) -> None:
  """Validates the q/k/v shapes (one-line ValueErrors)."""
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"q, k, v must be 4-D [batch, len, heads, head_dim], got {q.shape}, "
                     f"{k.shape}, {v.shape}")
  if k.shape != v.shape:
    raise ValueError(f"k.shape {k.shape} must equal v.shape {v.shape}")
  if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
    raise ValueError(f"q {q.shape} and k {k.shape} must agree on batch and head_dim")
  if q.shape[2] % k.shape[2]:
    raise ValueError(f"heads={q.shape[2]} must be a multiple of kv_heads={k.shape[2]}")


def element_mask(q_len: int, kv_len: int, *, causal: bool, window: int | None,
                 dense_mask=None, segment_ids: SegmentIds | None = None) -> jax.Array | None:
  """The combined bool mask, broadcastable to ``[batch, heads, q_len, kv_len]`` (None = all)."""
  mask = None

  def _and(a, b):
    return b if a is None else a & b

  qi = np.arange(q_len)[:, None]
  kj = np.arange(kv_len)[None, :]
  if causal:
    mask = _and(mask, jnp.asarray(kj <= qi)[None, None])
  if window is not None:
    mask = _and(mask, jnp.asarray(qi - kj < window)[None, None])
  if dense_mask is not None:
    mask = _and(mask, jnp.asarray(np.asarray(dense_mask, bool))[None])
  if segment_ids is not None:
    mask = _and(mask, (segment_ids.q[:, None, :, None] == segment_ids.kv[:, None, None, :]))
  return mask


def attention_reference(q, k, v, *, segment_ids=None, causal: bool = True,
                        window: int | None = None, block_mask=None, dense_mask=None,
                        logit_soft_cap: float | None = None, sm_scale: float | None = None,
                        return_lse: bool = False):
  """Reference attention (see the module docstring).

  Args:
    q: ``[batch, q_len, heads, head_dim]``.
    k, v: ``[batch, kv_len, kv_heads, head_dim]``.
    segment_ids: None, ``SegmentIds(q, kv)`` / a (q, kv) pair, or one array for self-attention.
    causal, window, dense_mask: masks (module docstring). block_mask is accepted for signature
      parity with the kernels and must come with dense_mask.
    logit_soft_cap: if set, scores become ``cap * tanh(scores / cap)`` (after scaling).
    sm_scale: score scale, default ``1 / sqrt(head_dim)``.
    return_lse: also return the float32 log-sum-exp ``[batch, heads, q_len]`` (+inf on rows
      with no allowed key).

  Returns:
    ``[batch, q_len, heads, head_dim]`` in q's dtype (and the lse if asked).
  """
  check_inputs(q, k, v)
  if block_mask is not None and dense_mask is None:
    raise ValueError("block_mask needs the dense_mask it was made from (dense_mask=None)")
  b, q_len, h, d = q.shape
  kv_len, kv_h = k.shape[1], k.shape[2]
  g = h // kv_h
  scale = float(sm_scale) if sm_scale is not None else 1.0 / float(np.sqrt(d))
  seg = as_segment_ids(segment_ids, q_len, kv_len)
  qf = q.astype(jnp.float32).reshape(b, q_len, kv_h, g, d)
  s = jnp.einsum("bqhgd,bkhd->bhgqk", qf, k.astype(jnp.float32),
                 precision=jax.lax.Precision.HIGHEST) * scale
  s = s.reshape(b, h, q_len, kv_len)
  if logit_soft_cap is not None:
    s = logit_soft_cap * jnp.tanh(s / logit_soft_cap)
  mask = element_mask(q_len, kv_len, causal=causal, window=window, dense_mask=dense_mask,
                      segment_ids=seg)
  if mask is not None:
    s = jnp.where(mask, s, -jnp.inf)
  m = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
  m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.exp(s - m_safe)
  l = jnp.sum(p, axis=-1, keepdims=True)
  p = p / jnp.where(l == 0.0, 1.0, l)
  o = jnp.einsum("bhgqk,bkhd->bqhgd", p.reshape(b, kv_h, g, q_len, kv_len),
                 v.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
  o = o.reshape(b, q_len, h, d).astype(q.dtype)
  if not return_lse:
    return o
  lse = jnp.where(l[..., 0] == 0.0, jnp.inf, m_safe[..., 0] + jnp.log(l[..., 0]))
  return o, lse
