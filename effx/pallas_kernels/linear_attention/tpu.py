"""Chunked causal linear attention for TPU (Pallas, Mosaic TPU dialect), forward and backward.

Layout: q/k/v are transposed to ``[batch, heads, T_p, d]`` (T padded to a multiple of the chunk
C) so that every tile is ``(C, d)``. The state is kept transposed, ``Sᵀ: [d_v, d_k]``, so that a
per-channel decay ``diag(a) S`` is a row broadcast ``Sᵀ * a[None, :]``.

* forward, grid ``(batch, heads, N)`` (chunks "arbitrary", i.e. sequential): chunk n reads the
  carried ``Sᵀ`` (float32 VMEM scratch), computes the intra-chunk masked quadratic plus the
  state contribution ``(q ⊙ e^{b}) S`` and updates ``Sᵀ <- decay ⊙ Sᵀ + vᵀ (k ⊙ e^{b_C - b})``;
  ``b`` is the in-chunk cumulative log-decay (XLA computes it before the call), every exponent
  used is ``<= 0``. The state before every chunk is written out as the backward's residual
  (``[B, H, N, d_v, d_k]`` float32, like fla's chunk states), and the final state at the last
  chunk.
* backward, grid ``(batch, heads, N)`` visiting the chunks in reverse (the index maps read
  chunk ``N-1-n``): carries ``dSᵀ`` (float32 VMEM scratch; starts at the final-state
  cotangent) and writes dq, dk, dv (float32) per chunk and ``dS_0`` at the end.
* gates: GLA's per-channel gates use sub-chunks inside the chunk (``BlockSizes.sub_chunk``):
  pairs in different sub-chunks factor through the previous sub-chunk boundary (one MXU matmul
  per sub-chunk, all exponents ``<= 0``), pairs in the same sub-chunk use a
  ``[sub, sub, d_k]`` tensor. Their gradient needs no kernel: for any decayed pair term,
  ``dL/dG_t = q_t ⊙ dq_t - k_t ⊙ dk_t`` (G the cumulative log-decay; the final state counts as
  a query after the last token, ``Σ_e Sᵀ ⊙ dSᵀ``), and ``dL/dg = reverse cumsum of dL/dG``
  (XLA, ``O(T·d_k)``). Scalar (RetNet) decays sum that over the channels.
* segments: a document starts wherever the id changes; XLA turns ids into monotone document
  indices. Within a chunk the mask is ``causal & same document``; the scalar-prefetched
  document index at every chunk boundary says which rows see the carried state (``m``), which
  keys reach the chunk's end state (``l``) and whether the state survives the chunk.

Matmul operands are in the inputs' dtype (bf16 stays bf16 on the MXU, as in the flash kernels)
with float32 accumulation; the state, decays and masks are float32.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from effx.pallas_kernels.linear_attention import reference as ref_lib
from effx.pallas_kernels.linear_attention.config import BlockSizes

NUM_LANES = 128
NUM_SUBLANES = 8


@dataclasses.dataclass(frozen=True)
class _Static:
  """Trace-time constants of one kernel call."""
  kind: str          # "none" | "retnet" (scalar per token) | "gla"
  chunk: int
  sub: int
  num_chunks: int
  has_seg: bool
  has_s0: bool
  mm_dtype: Any


# ------------------------------------------------------------------------------------------------
# In-kernel helpers (values, not refs)
# ------------------------------------------------------------------------------------------------


def _mm(a, b, *, ta: bool = False, tb: bool = False):
  """``op(a) @ op(b)`` with float32 accumulation (op = transpose if ta / tb)."""
  prec = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return jax.lax.dot_general(a, b, (((0 if ta else 1,), (1 if tb else 0,)), ((), ())),
                             preferred_element_type=jnp.float32, precision=prec)


def _exp_le0(x, mask):
  """exp(x) where mask else 0 (x is only exponentiated where mask holds)."""
  return jnp.where(mask, jnp.exp(jnp.where(mask, x, 0.0)), 0.0)


def _select(lo: int, n: int, size: int):
  """One-hot float32 ``[n, size]``: row i picks column ``lo + i``. ``x @ sel.T`` takes columns
  ``lo:lo+n`` of x, ``y @ sel`` places ``y`` there (exact MXU matmuls, no lane shuffles)."""
  i = jax.lax.broadcasted_iota(jnp.int32, (n, size), 0)
  j = jax.lax.broadcasted_iota(jnp.int32, (n, size), 1)
  return (j == i + lo).astype(jnp.float32)


def _tri3(c: int, *, lower: bool):
  """bool ``[c, c, 1]``: ``j <= i`` (lower) or ``j >= i`` for axes (i, j)."""
  i = jax.lax.broadcasted_iota(jnp.int32, (c, c, 1), 0)
  j = jax.lax.broadcasted_iota(jnp.int32, (c, c, 1), 1)
  return j <= i if lower else j >= i


def _gla_scores(q, k, b, st: _Static):
  """``A[i, j] = Σ_d q_id k_jd e^{b_id - b_jd}`` for ``j <= i`` (0 above), float32 ``[C, C]``.

  q, k: ``[C, d_k]`` (mm dtype); b: float32 ``[C, d_k]`` in-chunk cumulative log gates.
  """
  c, big = st.sub, st.chunk
  qf, kf = q.astype(jnp.float32), k.astype(jnp.float32)
  row = jax.lax.broadcasted_iota(jnp.int32, (big, 1), 0)
  tri = _tri3(c, lower=True)
  rows = []
  for p in range(big // c):
    lo = p * c
    qp, kp, bp = qf[lo:lo + c], kf[lo:lo + c], b[lo:lo + c]
    # same sub-chunk: [c, c, d_k] with exponents b_i - b_j <= 0 (j <= i)
    e = _exp_le0(bp[:, None, :] - bp[None, :, :], tri)
    diag = jnp.sum(qp[:, None, :] * kp[None, :, :] * e, axis=-1)              # [c, c]
    out = _mm(diag, _select(lo, c, big))                                      # [c, C]
    if p:  # earlier sub-chunks, through the boundary ref = b[lo - 1]
      ref = b[lo - 1:lo]
      valid = row < lo
      ks = jnp.where(valid, kf * _exp_le0(ref - b, valid), 0.0)               # [C, d_k]
      qs = qp * jnp.exp(bp - ref)                                             # [c, d_k]
      out = out + _mm(qs.astype(st.mm_dtype), ks.astype(st.mm_dtype), tb=True)
    rows.append(out)
  return jnp.concatenate(rows, axis=0) if len(rows) > 1 else rows[0]


def _gla_rows(w, x, b, st: _Static):
  """``out_i = Σ_{j <= i} w_ij x_j ⊙ e^{b_i - b_j}``, float32 ``[C, d]`` (w lower-triangular)."""
  c, big = st.sub, st.chunk
  xf = x.astype(jnp.float32)
  row = jax.lax.broadcasted_iota(jnp.int32, (big, 1), 0)
  tri = _tri3(c, lower=True)
  outs = []
  for p in range(big // c):
    lo = p * c
    wp, bp, xp = w[lo:lo + c], b[lo:lo + c], xf[lo:lo + c]
    wpp = _mm(wp, _select(lo, c, big), tb=True)                               # [c, c]
    e = _exp_le0(bp[:, None, :] - bp[None, :, :], tri)                        # [c(i), c(j), d]
    out = jnp.sum(wpp[:, :, None] * xp[None, :, :] * e, axis=1)
    if p:
      ref = b[lo - 1:lo]
      valid = row < lo
      xs = jnp.where(valid, xf * _exp_le0(ref - b, valid), 0.0)
      out = out + jnp.exp(bp - ref) * _mm(wp.astype(st.mm_dtype), xs.astype(st.mm_dtype))
    outs.append(out)
  return jnp.concatenate(outs, axis=0) if len(outs) > 1 else outs[0]


def _gla_cols(wt, x, b, st: _Static):
  """``out_j = Σ_{i >= j} w_ij x_i ⊙ e^{b_i - b_j}`` from ``wt = wᵀ``, float32 ``[C, d]``."""
  c, big = st.sub, st.chunk
  xf = x.astype(jnp.float32)
  row = jax.lax.broadcasted_iota(jnp.int32, (big, 1), 0)
  tri = _tri3(c, lower=False)
  ns = big // c
  outs = []
  for r in range(ns):
    lo, hi = r * c, (r + 1) * c
    wr, br, xr = wt[lo:hi], b[lo:hi], xf[lo:hi]                               # wr[j, i]
    wrr = _mm(wr, _select(lo, c, big), tb=True)                               # [c(j), c(i)]
    e = _exp_le0(br[None, :, :] - br[:, None, :], tri)                        # e^{b_i - b_j}
    out = jnp.sum(wrr[:, :, None] * xr[None, :, :] * e, axis=1)
    if r < ns - 1:  # later sub-chunks, through the boundary end = b[hi - 1]
      end = b[hi - 1:hi]
      valid = row >= hi
      xs = jnp.where(valid, xf * _exp_le0(b - end, valid), 0.0)
      out = out + jnp.exp(end - br) * _mm(wr.astype(st.mm_dtype), xs.astype(st.mm_dtype))
    outs.append(out)
  return jnp.concatenate(outs, axis=0) if len(outs) > 1 else outs[0]


def _masks(bound_ref, bi, ci, docr_ref, docc_ref, st: _Static):
  """(allowed, allowedᵀ [C, C] bool, m, l [C, 1] float32 or None, keep scalar float32 or None)."""
  c = st.chunk
  rows = jax.lax.broadcasted_iota(jnp.int32, (c, c), 0)
  cols = jax.lax.broadcasted_iota(jnp.int32, (c, c), 1)
  allowed, allowed_t = cols <= rows, rows <= cols
  if not st.has_seg:
    return allowed, allowed_t, None, None, None
  d_col = docr_ref[:, :1]                      # [C, 1] document of each row
  d_row = docc_ref[:1, :]                      # [1, C]
  same = d_col == d_row
  prev, last = bound_ref[bi, ci], bound_ref[bi, ci + 1]
  m = (d_col == prev).astype(jnp.float32)      # row sees the carried state
  l = (d_col == last).astype(jnp.float32)      # key reaches the chunk's end state
  keep = jnp.where(prev == last, 1.0, 0.0)     # the carried state survives the chunk
  return allowed & same, allowed_t & same, m, l, keep


def _decays(dec_refs, st: _Static):
  """(e^{b} [C, 1 or d_k], e^{b_C - b} [C, 1 or d_k], e^{b_C} [1, 1 or d_k], b) or Nones."""
  if st.kind == "none":
    return None, None, None, None
  b = dec_refs[0][...]                         # [C, 1] (retnet) or [C, d_k] (gla), float32
  b_last = b[st.chunk - 1:st.chunk]
  return jnp.exp(b), jnp.exp(b_last - b), jnp.exp(b_last), b


def _scale(x, *factors):
  for f in factors:
    if f is not None:
      x = x * f
  return x


def _scores(q, k, dec_refs, b, allowed, st: _Static):
  """Masked decayed intra-chunk scores A (float32 ``[C, C]``) and the pair decay D (or None)."""
  if st.kind == "gla":
    return jnp.where(allowed, _gla_scores(q, k, b, st), 0.0), None
  s = _mm(q, k, tb=True)
  if st.kind == "retnet":
    d = _exp_le0(b - dec_refs[1][...], allowed)          # b_i - b_j, brow = dec_refs[1]
    return s * d, d
  return jnp.where(allowed, s, 0.0), None


# ------------------------------------------------------------------------------------------------
# Forward
# ------------------------------------------------------------------------------------------------


def _n_dec(st: _Static) -> int:
  return {"none": 0, "retnet": 2, "gla": 1}[st.kind]


def _fwd_kernel(bound_ref, *refs, st: _Static, save_states: bool):
  nd = _n_dec(st)
  q_ref, k_ref, v_ref = refs[:3]
  dec_refs = refs[3:3 + nd]
  rest = list(refs[3 + nd:])
  docr_ref = docc_ref = s0_ref = states_ref = None
  if st.has_seg:
    docr_ref, docc_ref = rest[:2]
    rest = rest[2:]
  if st.has_s0:
    s0_ref = rest.pop(0)
  y_ref, st_ref = rest[:2]
  rest = rest[2:]
  if save_states:
    states_ref = rest.pop(0)
  (s_scr,) = rest
  bi, n = pl.program_id(0), pl.program_id(2)

  @pl.when(n == 0)
  def _init():
    if st.has_s0:
      s_scr[...] = s0_ref[...].astype(jnp.float32)
    else:
      s_scr[...] = jnp.zeros(s_scr.shape, jnp.float32)

  s_prev = s_scr[...]                                    # Sᵀ [d_v, d_k] float32
  if save_states:
    states_ref[...] = s_prev
  q, k, v = q_ref[...], k_ref[...], v_ref[...]
  allowed, _, m, l, keep = _masks(bound_ref, bi, n, docr_ref, docc_ref, st)
  e_b, e_out, e_last, b = _decays(dec_refs, st)
  a, _ = _scores(q, k, dec_refs, b, allowed, st)
  q_in = _scale(q.astype(jnp.float32), e_b, m)
  y = _mm(a.astype(st.mm_dtype), v) + _mm(q_in.astype(st.mm_dtype),
                                           s_prev.astype(st.mm_dtype), tb=True)
  y_ref[...] = y.astype(y_ref.dtype)
  k_out = _scale(k.astype(jnp.float32), e_out, l)
  decay = None if e_last is None else (e_last if st.kind == "gla" else e_last[0, 0])
  s_new = _scale(s_prev, decay, keep) + _mm(v, k_out.astype(st.mm_dtype), ta=True)
  s_scr[...] = s_new

  @pl.when(n == st.num_chunks - 1)
  def _finish():
    st_ref[...] = s_new


def _seg_specs(st: _Static, chunk_of):
  c = st.chunk
  return [pl.BlockSpec((None, c, NUM_LANES), lambda bb, hh, n, *s: (bb, chunk_of(n), 0)),
          pl.BlockSpec((None, NUM_SUBLANES, c), lambda bb, hh, n, *s: (bb, 0, chunk_of(n)))]


def _dec_specs(st: _Static, dk: int, chunk_of):
  c = st.chunk
  if st.kind == "retnet":
    return [pl.BlockSpec((None, None, c, 1), lambda bb, hh, n, *s: (bb, hh, chunk_of(n), 0)),
            pl.BlockSpec((None, None, 1, c), lambda bb, hh, n, *s: (bb, hh, 0, chunk_of(n)))]
  if st.kind == "gla":
    return [pl.BlockSpec((None, None, c, dk), lambda bb, hh, n, *s: (bb, hh, chunk_of(n), 0))]
  return []


def _fwd(q, k, v, decs, docs, bounds, s0, st: _Static, interpret, save_states: bool):
  """q/k ``[B, H, T_p, d_k]``, v ``[B, H, T_p, d_v]`` -> (y, final Sᵀ, states or None)."""
  b, h, tp, dk = q.shape
  dv = v.shape[-1]
  c, nc = st.chunk, st.num_chunks
  fwd_chunk = lambda n: n

  def tok(d):
    return pl.BlockSpec((None, None, c, d), lambda bb, hh, n, *s: (bb, hh, n, 0))

  state_spec = pl.BlockSpec((None, None, dv, dk), lambda bb, hh, n, *s: (bb, hh, 0, 0))
  in_specs = [tok(dk), tok(dk), tok(dv)] + _dec_specs(st, dk, fwd_chunk)
  args = [q, k, v, *decs]
  if st.has_seg:
    in_specs += _seg_specs(st, fwd_chunk)
    args += list(docs)
  if st.has_s0:
    in_specs.append(state_spec)
    args.append(s0)
  out_specs = [tok(dv), state_spec]
  out_shape = [jax.ShapeDtypeStruct((b, h, tp, dv), v.dtype),
               jax.ShapeDtypeStruct((b, h, dv, dk), jnp.float32)]
  if save_states:
    out_specs.append(pl.BlockSpec((None, None, None, dv, dk),
                                  lambda bb, hh, n, *s: (bb, hh, n, 0, 0)))
    out_shape.append(jax.ShapeDtypeStruct((b, h, nc, dv, dk), jnp.float32))
  outs = pl.pallas_call(
      functools.partial(_fwd_kernel, st=st, save_states=save_states),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1, grid=(b, h, nc), in_specs=in_specs, out_specs=out_specs,
          scratch_shapes=[pltpu.VMEM((dv, dk), jnp.float32)]),
      out_shape=out_shape,
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name="effx_linear_attn_fwd",
  )(bounds, *args)
  return outs[0], outs[1], (outs[2] if save_states else None)


# ------------------------------------------------------------------------------------------------
# Backward
# ------------------------------------------------------------------------------------------------


def _bwd_kernel(bound_ref, *refs, st: _Static):
  nd = _n_dec(st)
  q_ref, k_ref, v_ref, dy_ref = refs[:4]
  dec_refs = refs[4:4 + nd]
  rest = list(refs[4 + nd:])
  docr_ref = docc_ref = None
  if st.has_seg:
    docr_ref, docc_ref = rest[:2]
    rest = rest[2:]
  states_ref, dst_ref, dq_ref, dk_ref, dv_ref, ds0_ref, ds_scr = rest
  bi, n = pl.program_id(0), pl.program_id(2)
  ci = st.num_chunks - 1 - n                             # chunks in reverse
  mmd = st.mm_dtype

  @pl.when(n == 0)
  def _init():
    ds_scr[...] = dst_ref[...]

  ds = ds_scr[...]                                       # dL/dSᵀ after this chunk [d_v, d_k]
  s_prev = states_ref[...]                               # Sᵀ before this chunk
  q, k, v, dy = q_ref[...], k_ref[...], v_ref[...], dy_ref[...]
  allowed, allowed_t, m, l, keep = _masks(bound_ref, bi, ci, docr_ref, docc_ref, st)
  e_b, e_out, e_last, b = _decays(dec_refs, st)
  a, d = _scores(q, k, dec_refs, b, allowed, st)
  dy_m = dy.astype(mmd)
  da = jnp.where(allowed, _mm(dy_m, v, tb=True), 0.0)     # dA [C, C]
  if st.kind == "gla":
    da_t = jnp.where(allowed_t, _mm(v, dy_m, tb=True), 0.0)   # dAᵀ
    dq = _gla_rows(da, k, b, st)
    dk = _gla_cols(da_t, q, b, st)
  else:
    if d is not None:
      da = da * d
    dq = _mm(da.astype(mmd), k)
    dk = _mm(da.astype(mmd), q, ta=True)
  dv = _mm(a.astype(mmd), dy_m, ta=True)
  # Inter-chunk terms.
  q_scale = None if m is None and e_b is None else _scale(jnp.ones((st.chunk, 1), jnp.float32),
                                                          e_b, m)
  k_scale = None if l is None and e_out is None else _scale(
      jnp.ones((st.chunk, 1), jnp.float32), e_out, l)
  dq = dq + _scale(_mm(dy_m, s_prev.astype(mmd)), q_scale)
  dk = dk + _scale(_mm(v, ds.astype(mmd)), k_scale)
  k_out = _scale(k.astype(jnp.float32), k_scale)
  dv = dv + _mm(k_out.astype(mmd), ds.astype(mmd), tb=True)
  q_in = _scale(q.astype(jnp.float32), q_scale)
  decay = None if e_last is None else (e_last if st.kind == "gla" else e_last[0, 0])
  ds_new = _scale(ds, decay, keep) + _mm(dy_m, q_in.astype(mmd), ta=True)
  ds_scr[...] = ds_new
  dq_ref[...] = dq
  dk_ref[...] = dk
  dv_ref[...] = dv

  @pl.when(n == st.num_chunks - 1)
  def _finish():
    ds0_ref[...] = ds_new


def _bwd(q, k, v, decs, docs, bounds, states, dy, dst, st: _Static, interpret):
  """Returns float32 (dq, dk, dv) in the kernel layout and dSᵀ_0 ``[B, H, d_v, d_k]``."""
  b, h, tp, dk = q.shape
  dv = v.shape[-1]
  c, nc = st.chunk, st.num_chunks
  rev = lambda n: nc - 1 - n

  def tok(d):
    return pl.BlockSpec((None, None, c, d), lambda bb, hh, n, *s: (bb, hh, rev(n), 0))

  state_spec = pl.BlockSpec((None, None, dv, dk), lambda bb, hh, n, *s: (bb, hh, 0, 0))
  in_specs = [tok(dk), tok(dk), tok(dv), tok(dv)] + _dec_specs(st, dk, rev)
  args = [q, k, v, dy, *decs]
  if st.has_seg:
    in_specs += _seg_specs(st, rev)
    args += list(docs)
  in_specs += [pl.BlockSpec((None, None, None, dv, dk),
                            lambda bb, hh, n, *s: (bb, hh, rev(n), 0, 0)), state_spec]
  args += [states, dst]
  out_specs = [tok(dk), tok(dk), tok(dv), state_spec]
  out_shape = [jax.ShapeDtypeStruct((b, h, tp, dk), jnp.float32),
               jax.ShapeDtypeStruct((b, h, tp, dk), jnp.float32),
               jax.ShapeDtypeStruct((b, h, tp, dv), jnp.float32),
               jax.ShapeDtypeStruct((b, h, dv, dk), jnp.float32)]
  return pl.pallas_call(
      functools.partial(_bwd_kernel, st=st),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1, grid=(b, h, nc), in_specs=in_specs, out_specs=out_specs,
          scratch_shapes=[pltpu.VMEM((dv, dk), jnp.float32)]),
      out_shape=out_shape,
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name="effx_linear_attn_bwd",
  )(bounds, *args)


# ------------------------------------------------------------------------------------------------
# Entry
# ------------------------------------------------------------------------------------------------


def _pad_time(x, tp: int):
  extra = tp - x.shape[1]
  if not extra:
    return x
  return jnp.pad(x, [(0, 0), (0, extra)] + [(0, 0)] * (x.ndim - 2))


def _chunk_cumsum(g, c: int):
  """In-chunk cumulative sum along axis 2 of ``[B, H, T_p, ...]`` (float32)."""
  b, h, tp = g.shape[:3]
  gc = g.astype(jnp.float32).reshape((b, h, tp // c, c) + g.shape[3:])
  return jnp.cumsum(gc, axis=3).reshape(g.shape)


def _decay_inputs(g, st: _Static):
  """Kernel decay inputs from padded per-token log decays ``[B, H, T_p(, d_k)]``."""
  if st.kind == "none":
    return ()
  bc = _chunk_cumsum(g, st.chunk)
  if st.kind == "retnet":
    return (bc[..., None], bc[:, :, None, :])   # [B, H, T_p, 1] and [B, H, 1, T_p]
  return (bc,)


def linear_attention_tpu(q, k, v, *, log_decay=None, segment_ids=None, initial_state=None,
                         block_sizes: BlockSizes | None = None, interpret=None):
  """Chunked causal linear attention with the TPU Pallas kernels (semantics: ``reference.py``).

  Args:
    q, k: ``[batch, T, heads, d_k]`` features; v: ``[batch, T, heads, d_v]``.
    log_decay: None ("none"), ``[heads]`` or ``[batch, T, heads]`` ("retnet"), or
      ``[batch, T, heads, d_k]`` ("gla"); entries ``<= 0``.
    segment_ids: int ``[batch, T]`` or None (the state resets where the id changes).
    initial_state: ``[batch, heads, d_k, d_v]`` or None (zeros).
    block_sizes: chunk / GLA sub-chunk (default ``BlockSizes()``).
    interpret: None on a TPU; ``pltpu.InterpretParams(...)`` (or True) to run on CPU.

  Returns:
    ``(y [batch, T, heads, d_v] in v's dtype, final state [batch, heads, d_k, d_v] float32)``,
    differentiable in q, k, v, log_decay and initial_state.
  """
  kind = ref_lib.check_inputs(q, k, v, log_decay, segment_ids, initial_state)
  bs = block_sizes or BlockSizes()
  bsz, t, h, dk = q.shape
  dv = v.shape[-1]
  c = bs.chunk_size
  sub = bs.sub_for(c) if kind == "gla" else c
  on_hw = jax.default_backend() == "tpu" and not interpret
  if on_hw and c % NUM_LANES:
    raise ValueError(f"BlockSizes.chunk_size={c} must be a multiple of 128 on TPU")
  if on_hw and kind == "gla" and sub % NUM_SUBLANES:
    raise ValueError(f"BlockSizes.sub_chunk={sub} must be a multiple of 8 on TPU")
  nc = -(-t // c)
  tp = nc * c
  mm_dtype = jnp.result_type(q.dtype, k.dtype, v.dtype)
  st = _Static(kind=kind, chunk=c, sub=sub, num_chunks=nc, has_seg=segment_ids is not None,
               has_s0=initial_state is not None, mm_dtype=mm_dtype)

  # Document indices (padding continues the last document) and their chunk-boundary values.
  doc = _pad_time(ref_lib.doc_ids(segment_ids, bsz, t), tp)
  if tp > t:
    doc = doc.at[:, t:].set(doc[:, t - 1:t])
  bounds = jnp.concatenate([jnp.zeros((bsz, 1), jnp.int32), doc[:, c - 1::c]], axis=1)
  docs = ()
  if st.has_seg:
    docs = (jnp.broadcast_to(doc[:, :, None], (bsz, tp, NUM_LANES)),
            jnp.broadcast_to(doc[:, None, :], (bsz, NUM_SUBLANES, tp)))

  def prep(x):   # [B, T, H, ...] -> [B, H, T_p, ...]
    return jnp.swapaxes(_pad_time(x, tp), 1, 2)

  g = ref_lib.per_token_log_decay(log_decay, bsz, t)
  gt = None if g is None else prep(g)
  s0t = None if initial_state is None else jnp.swapaxes(initial_state, -1, -2)

  @jax.custom_vjp
  def core(qt, kt, vt, gt, s0t, docs, bounds):
    y, s_t, _ = _fwd(qt, kt, vt, _decay_inputs(gt, st), docs, bounds, s0t, st, interpret,
                     save_states=False)
    return y, s_t

  def core_fwd(qt, kt, vt, gt, s0t, docs, bounds):
    decs = _decay_inputs(gt, st)
    y, s_t, states = _fwd(qt, kt, vt, decs, docs, bounds, s0t, st, interpret, save_states=True)
    return (y, s_t), (qt, kt, vt, gt, s0t, docs, bounds, states, s_t)

  def core_bwd(res, cts):
    qt, kt, vt, gt, s0t, docs, bounds, states, s_t = res
    dy, dst = cts
    decs = _decay_inputs(gt, st)
    dq, dk, dv, ds0 = _bwd(qt, kt, vt, decs, docs, bounds, states, dy.astype(vt.dtype),
                           dst.astype(jnp.float32), st, interpret)
    dg = None
    if gt is not None:
      dgc = qt.astype(jnp.float32) * dq - kt.astype(jnp.float32) * dk   # dL/dG, [B,H,T_p,dk]
      final = jnp.sum(s_t * dst.astype(jnp.float32), axis=-2)           # [B, H, d_k]
      if st.kind == "retnet":
        dgc, final = jnp.sum(dgc, axis=-1), jnp.sum(final, axis=-1)
      dgc = dgc.at[:, :, -1].add(final)
      dg = jnp.flip(jnp.cumsum(jnp.flip(dgc, 2), axis=2), 2).astype(gt.dtype)
    return (dq.astype(qt.dtype), dk.astype(kt.dtype), dv.astype(vt.dtype), dg,
            None if s0t is None else ds0.astype(s0t.dtype), None, None)

  core.defvjp(core_fwd, core_bwd)
  y, s_t = core(prep(q), prep(k), prep(v), gt, s0t, docs, bounds)
  return jnp.swapaxes(y, 1, 2)[:, :t], jnp.swapaxes(s_t, -1, -2)
