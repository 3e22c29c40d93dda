"""Pure-jnp (XLA) decode attention with the kernels' exact semantics.

T new query tokens (1..64: one decode step, a few speculative tokens or a draft tree) attend to
a KV cache that already holds them. Shapes: q ``[batch, T, heads, head_dim]``; k, v
``[batch, max_len, kv_heads, head_dim]`` (the cache *after* the T new keys/values were written
at slots ``lengths[b] .. lengths[b] + T - 1``), ``heads % kv_heads == 0`` (GQA/MQA);
``lengths`` int32 ``[batch]`` the cache length *before* the new tokens; ``new_token_mask`` bool
``[batch, T, T]`` (default causal).

Visibility (``effx.attention.mha.cache_attention_mask`` without a static mask): query i of row
b sees slot j iff ``j < lengths[b]`` (an old slot) or ``0 <= j - lengths[b] < T`` and
``new_token_mask[b, i, j - lengths[b]]`` (a new token); nothing else (slots past the new tokens
hold stale or zero entries). Scores, softmax and the weighted sum run in float32; a query with
no visible slot outputs 0. Forward only: decoding needs no gradient (``jax.grad`` through the
kernels is not defined; differentiate the reference if needed).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

MAX_NEW_TOKENS = 64   # the kernels encode a query's new-token mask row in two int32 words


def check_inputs(q, k, v, lengths, new_token_mask) -> None:
  """Validates shapes (one-line ValueErrors naming the argument)."""
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"q, k, v must be 4-D [batch, len, heads, head_dim], got {q.shape}, "
                     f"{k.shape}, {v.shape}")
  if k.shape != v.shape:
    raise ValueError(f"k.shape {k.shape} must equal v.shape {v.shape}")
  b, t, h, d = q.shape
  if k.shape[0] != b or k.shape[3] != d:
    raise ValueError(f"q {q.shape} and k {k.shape} must agree on batch and head_dim")
  if h % k.shape[2]:
    raise ValueError(f"heads={h} must be a multiple of kv_heads={k.shape[2]}")
  if t < 1 or t > k.shape[1]:
    raise ValueError(f"q has {t} new tokens; must be in 1..max_len={k.shape[1]}")
  if lengths.shape != (b,):
    raise ValueError(f"lengths.shape {lengths.shape} must be (batch,)=({b},)")
  if new_token_mask is not None and new_token_mask.shape != (b, t, t):
    raise ValueError(f"new_token_mask.shape {new_token_mask.shape} must be {(b, t, t)}")


def default_new_token_mask(batch: int, t: int) -> jax.Array:
  """Causal bool ``[batch, T, T]``."""
  return jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (batch, t, t))


def visible_mask(lengths: jax.Array, new_token_mask: jax.Array, max_len: int) -> jax.Array:
  """bool ``[batch, T, max_len]``: which slot each new token sees (module docstring)."""
  b, t, _ = new_token_mask.shape
  slots = jnp.arange(max_len, dtype=jnp.int32)[None, :]
  lengths = jnp.asarray(lengths, jnp.int32)[:, None]
  old = slots < lengths                                   # [b, L]
  off = slots - lengths
  in_new = (off >= 0) & (off < t)
  idx = jnp.broadcast_to(jnp.clip(off, 0, t - 1)[:, None, :], (b, t, max_len))
  new = jnp.take_along_axis(new_token_mask, idx, axis=2) & in_new[:, None, :]
  return old[:, None, :] | new


def decode_attention_reference(q, k, v, lengths, new_token_mask=None, *,
                               sm_scale: float | None = None,
                               logit_soft_cap: float | None = None, return_lse: bool = False):
  """Reference decode attention (see the module docstring).

  Args:
    q: ``[batch, T, heads, head_dim]``.
    k, v: ``[batch, max_len, kv_heads, head_dim]`` (cache including the new tokens).
    lengths: int32 ``[batch]`` cache length before the new tokens.
    new_token_mask: bool ``[batch, T, T]`` or None (causal).
    sm_scale: score scale, default ``1 / sqrt(head_dim)``.
    logit_soft_cap: if set, scores become ``cap * tanh(scores / cap)`` (after scaling).
    return_lse: also return the float32 log-sum-exp ``[batch, T, heads]`` (+inf where nothing
      is visible).

  Returns:
    ``[batch, T, heads, head_dim]`` in q's dtype (and the lse if asked).
  """
  check_inputs(q, k, v, lengths, new_token_mask)
  b, t, h, d = q.shape
  max_len, kv_h = k.shape[1], k.shape[2]
  g = h // kv_h
  if new_token_mask is None:
    new_token_mask = default_new_token_mask(b, t)
  scale = float(sm_scale) if sm_scale is not None else 1.0 / float(np.sqrt(d))
  hi = jax.lax.Precision.HIGHEST
  s = jnp.einsum("bqhgd,bkhd->bhgqk", q.reshape(b, t, kv_h, g, d), k,
                 preferred_element_type=jnp.float32, precision=hi) * scale
  if logit_soft_cap is not None:
    s = logit_soft_cap * jnp.tanh(s / logit_soft_cap)
  vis = visible_mask(lengths, new_token_mask.astype(bool), max_len)    # [b, T, L]
  s = jnp.where(vis[:, None, None], s, -jnp.inf)
  m = jnp.max(s, axis=-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.exp(s - m)
  l = jnp.sum(p, axis=-1, keepdims=True)
  p = p / jnp.where(l == 0.0, 1.0, l)
  o = jnp.einsum("bhgqk,bkhd->bqhgd", p, v, preferred_element_type=jnp.float32, precision=hi)
  o = o.reshape(b, t, h, d).astype(q.dtype)
  if not return_lse:
    return o
  lse = jnp.where(l[..., 0] == 0.0, jnp.inf, m[..., 0] + jnp.log(jnp.where(l[..., 0] == 0.0,
                                                                            1.0, l[..., 0])))
  return o, lse.reshape(b, h, t).transpose(0, 2, 1)


def new_token_bits(new_token_mask: jax.Array) -> jax.Array:
  """int32 ``[batch, T, 2]``: bit j of word j // 32 of query i = ``new_token_mask[b, i, j]``.

  The kernels' compact form of the mask (T <= 64): the element mask of a key tile is then a
  shift and an and per element, with no gather.
  """
  b, t, _ = new_token_mask.shape
  if t > MAX_NEW_TOKENS:
    raise ValueError(f"new_token_mask has T={t} new tokens; the kernels take at most "
                     f"{MAX_NEW_TOKENS}")
  m = jnp.pad(new_token_mask.astype(jnp.uint32), ((0, 0), (0, 0), (0, 2 * 32 - t)))
  m = m.reshape(b, t, 2, 32)
  words = jnp.sum(m << jnp.arange(32, dtype=jnp.uint32), axis=-1, dtype=jnp.uint32)
  return jax.lax.bitcast_convert_type(words, jnp.int32)


def combine_splits(acc, m, l):
  """Flash-decoding combine of per-split partials.

  Args:
    acc: float32 ``[..., splits, rows, head_dim]`` unnormalised ``sum_j exp(s_j - m) v_j``.
    m, l: float32 ``[..., splits, rows]`` running max (-inf if the split saw nothing) and sum.

  Returns:
    (o float32 ``[..., rows, head_dim]`` (0 where nothing was visible), lse ``[..., rows]``).
  """
  m_all = jnp.max(m, axis=-2)
  m_safe = jnp.where(jnp.isfinite(m_all), m_all, 0.0)
  w = jnp.exp(m - m_safe[..., None, :])                  # 0 for splits that saw nothing
  l_all = jnp.sum(w * l, axis=-2)
  o = jnp.sum(w[..., None] * acc, axis=-3)
  empty = l_all == 0.0
  o = o / jnp.where(empty, 1.0, l_all)[..., None]
  lse = jnp.where(empty, jnp.inf, m_safe + jnp.log(jnp.where(empty, 1.0, l_all)))
  return o, lse
