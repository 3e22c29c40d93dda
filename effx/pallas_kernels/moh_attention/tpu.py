"""Head-sparse causal flash attention for TPU (Pallas, Mosaic TPU dialect), forward + backward.

MoH (mixture-of-head attention) activates a few heads per token. A (query block, head) pair
that no token of the block routed to needs no attention at all; these kernels skip such pairs
using a run-time activity map (bool ``[batch, nq, heads]``) that is scalar-prefetched into
SMEM:

* forward ``(batch, heads, nq, nk)``: row ``r = (b, h, i)`` visits key blocks
  ``0 .. last causal block`` if the pair is active (``pl.when``), nothing otherwise; inactive
  rows write O = 0 and L = +inf. Their index maps point at the blocks the previous active row
  used last (``src``: the last active row at or before r), so the pipeline fetches nothing for
  them either. FlashAttention-2 recurrence (reference.md 2.4), m/l lane-replicated
  ``[block_q, 128]``, float32 accumulator in VMEM.
* dQ ``(batch, heads, nq, nk)``: the same rows and skips; P is recomputed from L.
* dK/dV ``(batch, kv_heads, nk, groups * nq)``: key block j sweeps the (head of the group,
  query block) pairs; a step computes only if the pair is active and causally visible. Skipped
  steps fetch the next pair the sweep will compute (``nxt``: next active pair; at most one
  wasted fetch per head of the group), so GQA gradients accumulate in VMEM.

The per-token head gates are applied outside the kernels by XLA, fused into the
``[B, H, T, D] -> [B, T, H, D]`` transposes that the layout needs anyway: ``y = gates * O``,
``dO = gates * dy``, ``dgates = rowsum(dy * O)`` and ``D = rowsum(dO * O)``. Inactive pairs
have O = 0, so their outputs and gate gradients are 0 (the reference's semantics).
Lengths that are not tile multiples are zero-padded (padded rows have gate 0, padded keys are
hidden by causality from real rows).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from effx.pallas_kernels import _tpu_common as tc
from effx.pallas_kernels._tpu_common import NUM_LANES, NUM_SUBLANES, lanes as _lanes
from effx.pallas_kernels.moh_attention import reference as ref_lib
from effx.pallas_kernels.moh_attention.config import BlockSizes


@dataclasses.dataclass(frozen=True)
class _Static:
  """Trace-time constants of one kernel call."""
  cap: float | None
  scale: float
  block_q: int
  block_k: int
  heads: int
  groups: int
  nq: int
  nk: int
  has_seg: bool

  def row(self, b, h, i):
    return (b * self.heads + h) * self.nq + i

  def num_kv_blocks(self, i):
    """Key blocks query block i needs (causal): ``0 .. ((i+1)*bq - 1) // bk``."""
    return jnp.minimum(self.nk, ((i + 1) * self.block_q - 1) // self.block_k + 1)

  def first_q_block(self, j):
    """First query block that sees key block j (causal)."""
    return (j * self.block_k) // self.block_q


def _mask(i, j, st: _Static, qseg_ref, kvseg_ref):
  """Causal (+ segment) element mask of tile (i, j), bool ``[bq, bk]``."""
  bq, bk = st.block_q, st.block_k
  rows = i * bq + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
  cols = j * bk + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
  mask = cols <= rows
  if st.has_seg:
    mask = jnp.logical_and(mask, _lanes(qseg_ref[...], bk) == kvseg_ref[:1, :])
  return mask


def _split(refs, n: int, st: _Static):
  tensors, rest = refs[:n], list(refs[n:])
  qseg = kvseg = None
  if st.has_seg:
    qseg, kvseg = rest[:2]
    rest = rest[2:]
  return tensors, qseg, kvseg, rest


# ------------------------------------------------------------------------------------------------
# Row grids (forward, dQ): (batch, heads, nq, nk)
# ------------------------------------------------------------------------------------------------


def _row_maps(st: _Static):
  """Index maps of the row grids; inactive rows read the blocks of their ``src`` row."""

  def source(b, h, i, src_ref):
    s = src_ref[st.row(b, h, i)]
    return s // (st.heads * st.nq), (s // st.nq) % st.heads, s % st.nq

  def q_map(b, h, i, t, act_ref, src_ref):
    sb, sh, si = source(b, h, i, src_ref)
    return sb, sh, si, 0

  def kv_index(b, h, i, t, act_ref, src_ref):
    sb, sh, si = source(b, h, i, src_ref)
    last = st.num_kv_blocks(si) - 1
    j = jnp.where(act_ref[st.row(b, h, i)] != 0, jnp.minimum(t, last), last)
    return sb, sh, si, j

  def kv_map(b, h, i, t, act_ref, src_ref):
    sb, sh, _, j = kv_index(b, h, i, t, act_ref, src_ref)
    return sb, sh // st.groups, j, 0

  def qseg_map(b, h, i, t, act_ref, src_ref):
    sb, _, si = source(b, h, i, src_ref)
    return sb, si, 0

  def kvseg_map(b, h, i, t, act_ref, src_ref):
    sb, _, _, j = kv_index(b, h, i, t, act_ref, src_ref)
    return sb, 0, j

  def own_map(b, h, i, t, *_):
    return b, h, i, 0

  return q_map, kv_map, qseg_map, kvseg_map, own_map


def _visit_row(act_ref, st: _Static):
  """(row active, i, t, visit-this-step) for the current row-grid step."""
  b, h, i, t = pl.program_id(0), pl.program_id(1), pl.program_id(2), pl.program_id(3)
  active = act_ref[st.row(b, h, i)] != 0
  return i, t, jnp.logical_and(active, t < st.num_kv_blocks(i))


def _fwd_kernel(act_ref, src_ref, *refs, st: _Static):
  (q_ref, k_ref, v_ref), qseg_ref, kvseg_ref, rest = _split(refs, 3, st)
  o_ref, lse_ref, m_scr, l_scr, acc_scr = rest
  i, t, visit = _visit_row(act_ref, st)

  @pl.when(t == 0)
  def _init():
    tc.softmax_init(m_scr, l_scr, acc_scr)

  @pl.when(visit)
  def _visit():
    s, _ = tc.scaled_scores(q_ref[...], k_ref[...], st)
    s = jnp.where(_mask(i, t, st, qseg_ref, kvseg_ref), s, -jnp.inf)
    tc.softmax_update(s, v_ref, m_scr, l_scr, acc_scr, st.block_k)

  @pl.when(t == st.nk - 1)
  def _finish():   # inactive rows: l = 0 -> O = 0, L = +inf
    tc.softmax_finish(o_ref, lse_ref, m_scr, l_scr, acc_scr)


def _row_specs(st: _Static, d: int, n_q_side: int, n_kv_side: int, n_stats: int):
  q_map, kv_map, qseg_map, kvseg_map, _ = _row_maps(st)
  bq, bk = st.block_q, st.block_k
  specs = ([pl.BlockSpec((None, None, bq, d), q_map)] * n_q_side
           + [pl.BlockSpec((None, None, bk, d), kv_map)] * n_kv_side
           + [pl.BlockSpec((None, None, bq, NUM_LANES), q_map)] * n_stats)
  seg_specs = [pl.BlockSpec((None, bq, NUM_LANES), qseg_map),
               pl.BlockSpec((None, NUM_SUBLANES, bk), kvseg_map)]
  return specs, seg_specs


def _fwd(q, k, v, segs, act, src, st: _Static, interpret):
  """q ``[B, H, T_p, D]``, k/v ``[B, Hkv, T_p, D]`` -> (O ungated like q, lse ``[B, H, T_p]``)."""
  b, h, tp, d = q.shape
  bq = st.block_q
  in_specs, seg_specs = _row_specs(st, d, 1, 0, 0)
  kv_specs, _ = _row_specs(st, d, 0, 2, 0)
  in_specs = in_specs[:1] + kv_specs
  args = [q, k, v]
  if st.has_seg:
    in_specs += seg_specs
    args += list(segs)
  own = _row_maps(st)[-1]
  o, lse = pl.pallas_call(
      functools.partial(_fwd_kernel, st=st),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2, grid=(b, h, st.nq, st.nk), in_specs=in_specs,
          out_specs=[pl.BlockSpec((None, None, bq, d), own),
                     pl.BlockSpec((None, None, bq, NUM_LANES), own)],
          scratch_shapes=[pltpu.VMEM((bq, NUM_LANES), jnp.float32),
                          pltpu.VMEM((bq, NUM_LANES), jnp.float32),
                          pltpu.VMEM((bq, d), jnp.float32)]),
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((b, h, tp, NUM_LANES), jnp.float32)],
      compiler_params=tc.compiler_params(),
      interpret=interpret,
      name="effx_moh_fwd",
  )(act, src, *args)
  return o, lse[..., 0]


# ------------------------------------------------------------------------------------------------
# Backward
# ------------------------------------------------------------------------------------------------


def _recompute(q, k, v, do, lse, di, i, j, st: _Static, qseg_ref, kvseg_ref):
  """P and dS (w.r.t. the raw scaled scores) of tile (i, j), float32 ``[bq, bk]``."""
  return tc.recompute(q, k, v, do, lse, di, st, lambda: _mask(i, j, st, qseg_ref, kvseg_ref))


def _dq_kernel(act_ref, src_ref, *refs, st: _Static):
  (q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref), qseg_ref, kvseg_ref, rest = _split(refs, 6, st)
  dq_ref, dq_scr = rest
  i, t, visit = _visit_row(act_ref, st)

  @pl.when(t == 0)
  def _init():
    tc.zero_scratch(dq_scr)

  @pl.when(visit)
  def _visit():
    k = k_ref[...]
    _, ds = _recompute(q_ref[...], k, v_ref[...], do_ref[...], lse_ref[...], di_ref[...], i, t,
                       st, qseg_ref, kvseg_ref)
    tc.accumulate_dq(dq_scr, ds, k)

  @pl.when(t == st.nk - 1)
  def _finish():
    dq_ref[...] = (dq_scr[...] * st.scale).astype(dq_ref.dtype)


def _dkv_kernel(act_ref, nxt_ref, *refs, st: _Static):
  (q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref), qseg_ref, kvseg_ref, rest = _split(refs, 6, st)
  dk_ref, dv_ref, dk_scr, dv_scr = rest
  b, kh, j, t = pl.program_id(0), pl.program_id(1), pl.program_id(2), pl.program_id(3)
  gh, i = t // st.nq, t % st.nq
  h = kh * st.groups + gh
  visit = jnp.logical_and(act_ref[st.row(b, h, i)] != 0, i >= st.first_q_block(j))

  @pl.when(t == 0)
  def _init():
    tc.zero_scratch(dk_scr, dv_scr)

  @pl.when(visit)
  def _visit():
    q, do = q_ref[...], do_ref[...]
    p, ds = _recompute(q, k_ref[...], v_ref[...], do, lse_ref[...], di_ref[...], i, j, st,
                       qseg_ref, kvseg_ref)
    tc.accumulate_dkv(dk_scr, dv_scr, p, ds, q, do)

  @pl.when(t == pl.num_programs(3) - 1)
  def _finish():
    tc.finish_dkv(dk_ref, dv_ref, dk_scr, dv_scr, st.scale)


def _bwd(q, k, v, segs, act, src, nxt, o, lse, do, st: _Static, interpret):
  """Gradients (dq, dk, dv) in the kernel layout; ``do`` is the cotangent of the ungated O."""
  b, h, tp, d = q.shape
  hkv = k.shape[1]
  bq, bk, g, nq = st.block_q, st.block_k, st.groups, st.nq
  lse_l, di_l = tc.backward_stats(o, lse, do)
  cp = tc.compiler_params()

  # ---- dQ: the forward's row grid.
  q_specs, seg_specs = _row_specs(st, d, 1, 0, 0)
  kv_specs, _ = _row_specs(st, d, 0, 2, 0)
  stat_specs, _ = _row_specs(st, d, 0, 0, 2)
  in_specs = q_specs + kv_specs + q_specs + stat_specs
  args = [q, k, v, do, lse_l, di_l]
  if st.has_seg:
    in_specs += seg_specs
    args += list(segs)
  own = _row_maps(st)[-1]
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, st=st),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2, grid=(b, h, nq, st.nk), in_specs=in_specs,
          out_specs=pl.BlockSpec((None, None, bq, d), own),
          scratch_shapes=[pltpu.VMEM((bq, d), jnp.float32)]),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=cp, interpret=interpret, name="effx_moh_dq",
  )(act, src, *args)

  # ---- dK/dV: (batch, kv_heads, nk, groups * nq); skipped steps fetch the next visited pair.
  def pair(bb, kh, j, t, nxt_ref):
    gh, i = t // nq, t % nq
    start = gh * nq + jnp.maximum(i, st.first_q_block(j))   # causally visible from here
    e = nxt_ref[(bb * hkv + kh) * (g * nq) + start]
    return kh * g + e // nq, e % nq

  def qi_map(bb, kh, j, t, act_ref, nxt_ref):
    hh, i = pair(bb, kh, j, t, nxt_ref)
    return bb, hh, i, 0

  def k_map(bb, kh, j, t, *_):
    return bb, kh, j, 0

  in_specs = tc.dkv_in_specs(bq, bk, d, qi_map, k_map)
  args = [q, k, v, do, lse_l, di_l]
  if st.has_seg:
    def qseg_map(bb, kh, j, t, act_ref, nxt_ref):
      return bb, pair(bb, kh, j, t, nxt_ref)[1], 0
    in_specs += [pl.BlockSpec((None, bq, NUM_LANES), qseg_map),
                 pl.BlockSpec((None, NUM_SUBLANES, bk), lambda bb, kh, j, t, *_: (bb, 0, j))]
    args += list(segs)
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, st=st),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2, grid=(b, hkv, st.nk, g * nq), in_specs=in_specs,
          out_specs=[pl.BlockSpec((None, None, bk, d), k_map)] * 2,
          scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32)] * 2),
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype)] * 2,
      compiler_params=cp, interpret=interpret, name="effx_moh_dkv",
  )(act, nxt, *args)
  return dq, dk, dv


# ------------------------------------------------------------------------------------------------
# Entry
# ------------------------------------------------------------------------------------------------


def _pad_time(x, tp: int):
  extra = tp - x.shape[1]
  if not extra:
    return x
  return jnp.pad(x, [(0, 0), (0, extra)] + [(0, 0)] * (x.ndim - 2))


def _fetch_tables(act, hkv: int):
  """Scalar-prefetch tables from the activity map ``act`` int32 ``[B, H, nq]``.

  Returns (act flat ``[B*H*nq]``, src ``[B*H*nq]``: the last active row at or before each row
  in grid order (the row itself when none), nxt ``[B*H*nq]``: for each (b, kv head, step of the
  group sweep ``gh * nq + i``) the next active step of that sweep, else the last active one,
  else the step itself).
  """
  b, h, nq = act.shape
  flat = act.reshape(-1)
  r = jnp.arange(flat.shape[0], dtype=jnp.int32)
  src = jax.lax.cummax(jnp.where(flat != 0, r, -1))
  src = jnp.where(src < 0, r, src).astype(jnp.int32)
  sweep = act.reshape(b, hkv, (h // hkv) * nq) != 0
  s = jnp.arange(sweep.shape[-1], dtype=jnp.int32)
  n = sweep.shape[-1]
  nxt = jax.lax.cummin(jnp.where(sweep, s, n), axis=2, reverse=True)
  prv = jax.lax.cummax(jnp.where(sweep, s, -1), axis=2)
  last = jnp.broadcast_to(prv[..., -1:], prv.shape)
  nxt = jnp.where(nxt < n, nxt, jnp.where(last >= 0, last, s))
  return flat.astype(jnp.int32), src, nxt.reshape(-1).astype(jnp.int32)


def moh_attention_tpu(q, k, v, gates, *, active=None, segment_ids=None,
                      logit_soft_cap: float | None = None, sm_scale: float | None = None,
                      block_sizes: BlockSizes | None = None, interpret=None):
  """Head-sparse MoH attention with the TPU Pallas kernels (semantics: ``reference.py``).

  Args:
    q: ``[batch, T, heads, head_dim]``; k, v: ``[batch, T, kv_heads, head_dim]``.
    gates: ``[batch, T, heads]`` per-token head gates.
    active: bool ``[batch, ceil(T / block_q), heads]`` or None (= ``activity_map(gates,
      block_q)``): which (query block, head) pairs are computed.
    segment_ids: int32 ``[batch, T]`` or None.
    logit_soft_cap, sm_scale: as ``flash_attention``.
    block_sizes: tiles (default 128 x 128); ``block_q`` is the activity map's block.
    interpret: None on a TPU; ``pltpu.InterpretParams(...)`` (or True) to run on CPU.

  Returns:
    ``[batch, T, heads, head_dim]`` in q's dtype, differentiable in q, k, v and gates (the gate
    gradient is 0 on inactive pairs, like the output).
  """
  bs = block_sizes or BlockSizes()
  ref_lib.check_inputs(q, k, v, gates, active, bs.block_q)
  b, t, h, d = q.shape
  hkv = k.shape[2]
  if jax.default_backend() == "tpu" and not interpret and bs.block_k % NUM_LANES:
    raise ValueError(f"BlockSizes.block_k={bs.block_k} must be a multiple of 128 on TPU")
  if active is None:
    active = ref_lib.activity_map(gates, bs.block_q)
  mult = int(np.lcm(bs.block_q, bs.block_k))
  tp = -(-t // mult) * mult
  nq = tp // bs.block_q
  st = _Static(cap=logit_soft_cap,
               scale=float(sm_scale) if sm_scale is not None else 1.0 / float(np.sqrt(d)),
               block_q=bs.block_q, block_k=bs.block_k, heads=h, groups=h // hkv, nq=nq,
               nk=tp // bs.block_k, has_seg=segment_ids is not None)
  act = jnp.pad(active.astype(jnp.int32), ((0, 0), (0, nq - active.shape[1]), (0, 0)))
  act, src, nxt = _fetch_tables(jnp.swapaxes(act, 1, 2), hkv)   # kernel order (b, h, i)
  segs = ()
  if segment_ids is not None:
    seg = _pad_time(jnp.asarray(segment_ids, jnp.int32), tp)
    segs = (jnp.broadcast_to(seg[:, :, None], (b, tp, NUM_LANES)),
            jnp.broadcast_to(seg[:, None, :], (b, NUM_SUBLANES, tp)))

  def prep(x):   # [B, T, H, ...] -> padded [B, H, T_p, ...]
    return jnp.swapaxes(_pad_time(x, tp), 1, 2)

  @jax.custom_vjp
  def attn(qp, kp, vp, segs, act, src, nxt):
    return _fwd(qp, kp, vp, segs, act, src, st, interpret)[0]

  def attn_fwd(qp, kp, vp, segs, act, src, nxt):
    o, lse = _fwd(qp, kp, vp, segs, act, src, st, interpret)
    return o, (qp, kp, vp, segs, act, src, nxt, o, lse)

  def attn_bwd(res, do):
    qp, kp, vp, segs, act, src, nxt, o, lse = res
    dq, dk, dv = _bwd(qp, kp, vp, segs, act, src, nxt, o, lse, do, st, interpret)
    return dq, dk, dv, None, None, None, None

  attn.defvjp(attn_fwd, attn_bwd)
  o = attn(prep(q), prep(k), prep(v), segs, act, src, nxt)
  o = jnp.swapaxes(o, 1, 2)[:, :t]                     # ungated, 0 on inactive pairs
  return (o.astype(jnp.float32) * gates.astype(jnp.float32)[..., None]).astype(q.dtype)
