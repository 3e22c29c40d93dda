"""Pure-jnp (XLA) head-sparse mixture-of-head attention with the kernels' exact semantics.

Shapes: q ``[batch, T, heads, head_dim]``; k, v ``[batch, T, kv_heads, head_dim]`` with
``heads % kv_heads == 0``; ``gates`` ``[batch, T, heads]`` (MoH's per-token head gates, 0 where
the token did not select the head); ``active`` bool ``[batch, nq, heads]`` with
``nq = ceil(T / block_q)``: whether the (query block, head) pair is computed at all.

    y[b, t, h] = gates[b, t, h] * attention(q, k, v)[b, t, h]   if active[b, t // block_q, h]
               = 0                                              otherwise

with causal softmax attention (``segment_ids`` keeps packed documents apart; rows with no
visible key are 0; ``logit_soft_cap`` and ``sm_scale`` as in flash attention). When ``active``
covers every nonzero gate (``activity_map(gates, block_q)``, what MoH routing gives) this is
exactly "dense attention, then gates"; the activity map only says what may be skipped.
Output in q's dtype; scores, softmax and gating in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from effx.pallas_kernels.flash_attention.reference import attention_reference
from effx.pallas_kernels.flash_attention.reference import check_inputs as check_qkv


def num_blocks(length: int, block_q: int) -> int:
  return -(-length // block_q)


def activity_map(gates, block_q: int):
  """bool ``[batch, ceil(T / block_q), heads]``: some token of the block has a nonzero gate."""
  b, t, h = gates.shape
  nq = num_blocks(t, block_q)
  nz = jnp.pad(gates != 0, ((0, 0), (0, nq * block_q - t), (0, 0)))
  return jnp.any(nz.reshape(b, nq, block_q, h), axis=2)


def check_inputs(q, k, v, gates, active, block_q: int) -> None:
  """Validates shapes (one-line ValueErrors)."""
  check_qkv(q, k, v)
  if k.shape[1] != q.shape[1]:
    raise ValueError(f"k length {k.shape[1]} must equal q length {q.shape[1]} (self-attention)")
  if gates.shape != q.shape[:3]:
    raise ValueError(f"gates shape {gates.shape} must be [batch, T, heads]={q.shape[:3]}")
  want = (q.shape[0], num_blocks(q.shape[1], block_q), q.shape[2])
  if active is not None and active.shape != want:
    raise ValueError(f"active shape {active.shape} must be [batch, ceil(T / block_q), heads]="
                     f"{want} (block_q={block_q})")


def expand_active(active, length: int, block_q: int):
  """bool ``[batch, nq, heads]`` -> per token ``[batch, T, heads]``."""
  return jnp.repeat(active, block_q, axis=1)[:, :length]


def moh_attention_reference(q, k, v, gates, *, active=None, block_q: int = 128,
                            segment_ids=None, logit_soft_cap: float | None = None,
                            sm_scale: float | None = None):
  """Dense causal attention, gated, zero on inactive (query block, head) pairs.

  Args:
    q: ``[batch, T, heads, head_dim]``; k, v: ``[batch, T, kv_heads, head_dim]``.
    gates: ``[batch, T, heads]`` per-token head gates.
    active: bool ``[batch, ceil(T / block_q), heads]`` or None (= ``activity_map(gates)``).
    block_q: the activity map's block.
    segment_ids: int32 ``[batch, T]`` or None.
    logit_soft_cap, sm_scale: as ``flash_attention``.

  Returns:
    ``[batch, T, heads, head_dim]`` in q's dtype, differentiable in q, k, v and gates.
  """
  check_inputs(q, k, v, gates, active, block_q)
  if active is None:
    active = activity_map(gates, block_q)
  o = attention_reference(q, k, v, segment_ids=segment_ids, causal=True,
                          logit_soft_cap=logit_soft_cap, sm_scale=sm_scale)
  g = jnp.where(expand_active(active, q.shape[1], block_q), gates.astype(jnp.float32), 0.0)
  return (o.astype(jnp.float32) * g[..., None]).astype(q.dtype)
