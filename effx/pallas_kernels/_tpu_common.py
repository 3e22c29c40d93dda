"""Small pieces shared by the TPU (Mosaic) attention kernels."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

NUM_LANES = 128  # width of a TPU vector register's lane dimension
NUM_SUBLANES = 8  # rows of a TPU vector register


def lanes(x: jax.Array, n: int) -> jax.Array:
  """``[rows, 128]`` lane-replicated -> ``[rows, n]``."""
  if n == NUM_LANES:
    return x
  if n % NUM_LANES == 0:
    return jnp.tile(x, (1, n // NUM_LANES))
  if n < NUM_LANES:
    return x[:, :n]
  raise NotImplementedError(f"width {n} must be < 128 or a multiple of 128")


def scaled_scores(q: jax.Array, k: jax.Array, st) -> tuple[jax.Array, jax.Array | None]:
  """Scaled (and soft-capped) float32 scores ``[bq, bk]`` of q ``[bq, d]`` and k ``[bk, d]``;
  also returns tanh for the cap's gradient. ``st`` has ``scale`` and ``cap`` (None: no cap)."""
  s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                          preferred_element_type=jnp.float32) * st.scale
  th = None
  if st.cap is not None:
    th = jnp.tanh(s / st.cap)
    s = st.cap * th
  return s, th


def compiler_params() -> pltpu.CompilerParams:
  """Four-dimensional grids whose last axis is the sequential (accumulating) one."""
  return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel",
                                                   "arbitrary"))


def zero_scratch(*refs) -> None:
  """Sets float32 VMEM accumulators to 0."""
  for ref in refs:
    ref[...] = jnp.zeros(ref.shape, jnp.float32)


def softmax_init(m_scr, l_scr, acc_scr) -> None:
  """Online-softmax state: running max -inf, running sum 0 (lane-replicated ``[bq, 128]``) and
  accumulator 0 ``[bq, d]``."""
  m_scr[...] = jnp.full(m_scr.shape, -jnp.inf, jnp.float32)
  l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
  acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)


def softmax_update(s: jax.Array, v_ref, m_scr, l_scr, acc_scr, block_k: int) -> None:
  """One FlashAttention-2 step on the masked float32 scores ``s [bq, block_k]`` (natural base):
  updates m and l and ``acc = acc * alpha + P V`` (P cast to V's dtype)."""
  head_dim = acc_scr.shape[-1]
  m_prev, l_prev = m_scr[...], l_scr[...]
  m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))     # [bq, 128]
  m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)
  alpha = jnp.exp(m_prev - m_safe)
  p = jnp.exp(s - lanes(m_safe, block_k))
  l_scr[...] = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
  m_scr[...] = m_next
  v = v_ref[...]
  pv = jax.lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                           preferred_element_type=jnp.float32)
  acc_scr[...] = acc_scr[...] * lanes(alpha, head_dim) + pv


def softmax_finish(o_ref, lse_ref, m_scr, l_scr, acc_scr) -> None:
  """Writes O = acc / l (0 on rows that saw nothing) and the lse (+inf on those rows)."""
  head_dim = acc_scr.shape[-1]
  l, m = l_scr[...], m_scr[...]
  empty = l == 0.0
  inv = jnp.where(empty, 0.0, 1.0 / jnp.where(empty, 1.0, l))
  o_ref[...] = (acc_scr[...] * lanes(inv, head_dim)).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(empty, jnp.inf, m + jnp.log(jnp.where(empty, 1.0, l)))


def recompute(q, k, v, do, lse, di, st, mask):
  """P and dS (w.r.t. the raw scaled scores) of one tile, float32 ``[bq, bk]``, from the
  forward's lse and ``di = rowsum(dO * O)`` (both lane-replicated ``[bq, 128]``). ``st`` has
  ``scale``, ``cap`` and ``block_k``; ``mask()`` gives the tile's bool mask or None."""
  s, th = scaled_scores(q, k, st)
  m = mask()
  if m is not None:
    s = jnp.where(m, s, -jnp.inf)
  p = jnp.exp(s - lanes(lse, st.block_k))      # lse = +inf on empty rows -> p = 0
  dp = jax.lax.dot_general(do, v, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
  ds = p * (dp - lanes(di, st.block_k))
  if th is not None:
    ds = ds * (1.0 - th * th)
  return p, ds


def accumulate_dq(dq_scr, ds, k) -> None:
  """``dq += dS K`` (dS cast to K's dtype)."""
  dq_scr[...] += jax.lax.dot_general(ds.astype(k.dtype), k, (((1,), (0,)), ((), ())),
                                     preferred_element_type=jnp.float32)


def accumulate_dkv(dk_scr, dv_scr, p, ds, q, do) -> None:
  """``dv += P^T dO`` and ``dk += dS^T Q`` (P, dS cast to dO's, Q's dtype)."""
  dv_scr[...] += jax.lax.dot_general(p.astype(do.dtype).T, do, (((1,), (0,)), ((), ())),
                                     preferred_element_type=jnp.float32)
  dk_scr[...] += jax.lax.dot_general(ds.astype(q.dtype).T, q, (((1,), (0,)), ((), ())),
                                     preferred_element_type=jnp.float32)


def finish_dkv(dk_ref, dv_ref, dk_scr, dv_scr, scale: float) -> None:
  """Writes dk (times the softmax scale) and dv in their refs' dtypes."""
  dk_ref[...] = (dk_scr[...] * scale).astype(dk_ref.dtype)
  dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def backward_stats(o, lse, do):
  """Lane-replicated float32 lse and ``D = rowsum(dO * O)``: ``[B, H, L, 128]`` from o, do
  ``[B, H, L, D]`` and lse ``[B, H, L]``."""
  b, h, length, _ = o.shape
  di = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)
  lse_l = jnp.broadcast_to(lse[..., None], (b, h, length, NUM_LANES))
  di_l = jnp.broadcast_to(di[..., None], (b, h, length, NUM_LANES))
  return lse_l, di_l


def dkv_in_specs(bq: int, bk: int, d: int, qi_map, k_map) -> list[pl.BlockSpec]:
  """BlockSpecs of (q, k, v, do, lse, di) in a dK/dV grid: query-side tiles by ``qi_map``, the
  key block's K and V by ``k_map``."""
  return [pl.BlockSpec((None, None, bq, d), qi_map),
          pl.BlockSpec((None, None, bk, d), k_map),
          pl.BlockSpec((None, None, bk, d), k_map),
          pl.BlockSpec((None, None, bq, d), qi_map),
          pl.BlockSpec((None, None, bq, NUM_LANES), qi_map),
          pl.BlockSpec((None, None, bq, NUM_LANES), qi_map)]
