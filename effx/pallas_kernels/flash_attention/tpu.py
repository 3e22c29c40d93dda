"""Block-sparse flash attention for TPU (Pallas, Mosaic TPU dialect), forward and backward.

Layout and grids (q/k/v are transposed to ``[batch, heads, len, head_dim]`` so that every tile's
last two dims are ``(rows, head_dim)`` as Mosaic wants):

* forward ``(batch, heads, nq, steps)``: step t of query block i visits key block
  ``rows.idx[h, i, t]`` for ``t < rows.cnt[h, i]`` (``layout.BlockLists``). The lists are
  scalar-prefetched into SMEM (``pltpu.PrefetchScalarGridSpec``); the index maps read them, so
  padding steps repeat the last block index and the pipeline fetches nothing, and the body is
  skipped with ``pl.when``. Full tiles skip the element mask. The FlashAttention-2 recurrence
  (reference.md 2.4) keeps m, l (lane-replicated ``[block_q, 128]``) and the float32
  accumulator in VMEM scratch and writes O and the log-sum-exp L at the last step.
* dQ ``(batch, heads, nq, steps)``: the same lists; P is recomputed from L.
* dK/dV ``(batch, kv_heads, nk, groups * steps)``: for key block j the transposed lists
  (``cols``) enumerate the query blocks, for every query head of the kv head's group, so GQA
  gradients accumulate in VMEM without an extra reduction.

``D = rowsum(dO * O)`` is computed by XLA between the forward and the backward kernels.
Lengths that are not tile multiples are zero-padded; padded keys are masked through the
layout (their tiles are partial), padded query rows are sliced off.
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
from effx.pallas_kernels.flash_attention import layout as layout_lib
from effx.pallas_kernels.flash_attention import reference as ref_lib
from effx.pallas_kernels.flash_attention.config import BlockSizes


@dataclasses.dataclass(frozen=True)
class _Static:
  """Trace-time constants of one kernel call."""
  causal: bool
  window: int | None
  cap: float | None
  scale: float
  q_len: int
  kv_len: int
  block_q: int
  block_k: int
  groups: int
  per_head: bool
  has_seg: bool
  has_tiles: bool
  any_full: bool
  any_partial: bool


def _mask(i, j, st: _Static, *, partial: bool, qseg_ref, kvseg_ref, tile_ref):
  """Element mask of tile (i, j) or None (all allowed)."""
  bq, bk = st.block_q, st.block_k
  mask = None

  def _and(a, b):
    return b if a is None else jnp.logical_and(a, b)

  if partial:
    rows = i * bq + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
    cols = j * bk + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
    if st.kv_len % bk:
      mask = _and(mask, cols < st.kv_len)
    if st.causal:
      mask = _and(mask, cols <= rows)
    if st.window is not None:
      mask = _and(mask, rows - cols < st.window)
    if tile_ref is not None:
      mask = _and(mask, tile_ref[...] != 0)
  if st.has_seg:
    q_ids = _lanes(qseg_ref[...], bk)              # [bq, bk]
    kv_ids = kvseg_ref[:1, :]                      # [1, bk]
    mask = _and(mask, q_ids == kv_ids)
  return mask


def _dispatch(cls, st: _Static, body):
  """Runs ``body(partial)`` for the tile class ``cls`` (1 partial, 2 full), tracing only the
  variants that the static layout can produce."""
  if st.any_full and st.any_partial:
    pl.when(cls == layout_lib.FULL)(lambda: body(False))
    pl.when(cls != layout_lib.FULL)(lambda: body(True))
  elif st.any_full:
    body(False)
  else:
    body(True)


def _split_refs(refs, st: _Static, n_tensors: int):
  """Splits kernel refs into (tensor refs, qseg, kvseg, tile, rest)."""
  tensors = refs[:n_tensors]
  rest = list(refs[n_tensors:])
  qseg = kvseg = tile = None
  if st.has_seg:
    qseg, kvseg = rest[0], rest[1]
    rest = rest[2:]
  if st.has_tiles:
    tile = rest[0]
    rest = rest[1:]
  return tensors, qseg, kvseg, tile, rest


# ------------------------------------------------------------------------------------------------
# Forward
# ------------------------------------------------------------------------------------------------


def _fwd_kernel(idx_ref, cnt_ref, cls_ref, *refs, st: _Static, num_scalars: int):
  refs = refs[num_scalars - 3:]
  (q_ref, k_ref, v_ref), qseg_ref, kvseg_ref, tile_ref, rest = _split_refs(refs, st, 3)
  o_ref, lse_ref, m_scr, l_scr, acc_scr = rest
  h, i, t = pl.program_id(1), pl.program_id(2), pl.program_id(3)
  hm = h if st.per_head else 0

  @pl.when(t == 0)
  def _init():
    tc.softmax_init(m_scr, l_scr, acc_scr)

  @pl.when(t < cnt_ref[hm, i])
  def _visit():
    j = idx_ref[hm, i, t]

    def body(partial: bool):
      s, _ = tc.scaled_scores(q_ref[...], k_ref[...], st)
      mask = _mask(i, j, st, partial=partial, qseg_ref=qseg_ref, kvseg_ref=kvseg_ref,
                   tile_ref=tile_ref if partial else None)
      if mask is not None:
        s = jnp.where(mask, s, -jnp.inf)
      tc.softmax_update(s, v_ref, m_scr, l_scr, acc_scr, st.block_k)

    _dispatch(cls_ref[hm, i, t], st, body)

  @pl.when(t == pl.num_programs(3) - 1)
  def _finish():
    tc.softmax_finish(o_ref, lse_ref, m_scr, l_scr, acc_scr)


def _scalar_args(lists: layout_lib.BlockLists, with_tile: bool):
  args = [jnp.asarray(lists.idx), jnp.asarray(lists.cnt), jnp.asarray(lists.cls)]
  if with_tile:
    args.append(jnp.asarray(lists.tile))
  return args


def _fwd(q, k, v, qseg, kvseg, tiles, lay: layout_lib.KernelLayout, st: _Static, interpret):
  """q ``[B, H, Lq_p, D]``, k/v ``[B, Hkv, Lk_p, D]`` -> (o like q, lse ``[B, H, Lq_p]``)."""
  b, h, lq, d = q.shape
  bq, bk = st.block_q, st.block_k
  nq = lq // bq
  lists = lay.rows
  steps = lists.max_steps
  g = st.groups
  ph = st.per_head
  num_scalars = 4 if st.has_tiles else 3

  def hm(hh):
    return hh if ph else 0

  def q_map(bb, hh, i, t, *s):
    return bb, hh, i, 0

  def kv_map(bb, hh, i, t, idx, *s):
    return bb, hh // g, idx[hm(hh), i, t], 0

  in_specs = [pl.BlockSpec((None, None, bq, d), q_map),
              pl.BlockSpec((None, None, bk, d), kv_map),
              pl.BlockSpec((None, None, bk, d), kv_map)]
  args = [q, k, v]
  if st.has_seg:
    in_specs += [pl.BlockSpec((None, bq, NUM_LANES), lambda bb, hh, i, t, *s: (bb, i, 0)),
                 pl.BlockSpec((None, NUM_SUBLANES, bk),
                              lambda bb, hh, i, t, idx, *s: (bb, 0, idx[hm(hh), i, t]))]
    args += [qseg, kvseg]
  if st.has_tiles:
    in_specs.append(pl.BlockSpec(
        (None, bq, bk), lambda bb, hh, i, t, idx, cnt, cls, tile: (tile[hm(hh), i, t], 0, 0)))
    args.append(tiles)
  out_specs = [pl.BlockSpec((None, None, bq, d), q_map),
               pl.BlockSpec((None, None, bq, NUM_LANES), q_map)]
  out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype),
               jax.ShapeDtypeStruct((b, h, lq, NUM_LANES), jnp.float32)]
  scratch = [pltpu.VMEM((bq, NUM_LANES), jnp.float32), pltpu.VMEM((bq, NUM_LANES), jnp.float32),
             pltpu.VMEM((bq, d), jnp.float32)]
  kernel = functools.partial(_fwd_kernel, st=st, num_scalars=num_scalars)
  o, lse = pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=num_scalars, grid=(b, h, nq, steps), in_specs=in_specs,
          out_specs=out_specs, scratch_shapes=scratch),
      out_shape=out_shape,
      compiler_params=tc.compiler_params(),
      interpret=interpret,
      name="effx_flash_fwd",
  )(*_scalar_args(lists, st.has_tiles), *args)
  return o, lse[..., 0]


# ------------------------------------------------------------------------------------------------
# Backward
# ------------------------------------------------------------------------------------------------


def _recompute(q, k, v, do, lse, di, i, j, st: _Static, partial: bool, qseg_ref, kvseg_ref,
               tile_ref):
  """P and dS (w.r.t. the raw scaled scores) of tile (i, j), float32 ``[bq, bk]``."""
  return tc.recompute(q, k, v, do, lse, di, st, lambda: _mask(
      i, j, st, partial=partial, qseg_ref=qseg_ref, kvseg_ref=kvseg_ref,
      tile_ref=tile_ref if partial else None))


def _dq_kernel(idx_ref, cnt_ref, cls_ref, *refs, st: _Static, num_scalars: int):
  refs = refs[num_scalars - 3:]
  (q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref), qseg_ref, kvseg_ref, tile_ref, rest = (
      _split_refs(refs, st, 6))
  dq_ref, dq_scr = rest
  h, i, t = pl.program_id(1), pl.program_id(2), pl.program_id(3)
  hm = h if st.per_head else 0

  @pl.when(t == 0)
  def _init():
    tc.zero_scratch(dq_scr)

  @pl.when(t < cnt_ref[hm, i])
  def _visit():
    j = idx_ref[hm, i, t]

    def body(partial: bool):
      k = k_ref[...]
      _, ds = _recompute(q_ref[...], k, v_ref[...], do_ref[...], lse_ref[...], di_ref[...],
                         i, j, st, partial, qseg_ref, kvseg_ref, tile_ref)
      tc.accumulate_dq(dq_scr, ds, k)

    _dispatch(cls_ref[hm, i, t], st, body)

  @pl.when(t == pl.num_programs(3) - 1)
  def _finish():
    dq_ref[...] = (dq_scr[...] * st.scale).astype(dq_ref.dtype)


def _dkv_kernel(idx_ref, cnt_ref, cls_ref, *refs, st: _Static, num_scalars: int, steps: int):
  refs = refs[num_scalars - 3:]
  (q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref), qseg_ref, kvseg_ref, tile_ref, rest = (
      _split_refs(refs, st, 6))
  dk_ref, dv_ref, dk_scr, dv_scr = rest
  kvh, j, t = pl.program_id(1), pl.program_id(2), pl.program_id(3)
  h = kvh * st.groups + t // steps
  tt = t % steps
  hm = h if st.per_head else 0

  @pl.when(t == 0)
  def _init():
    tc.zero_scratch(dk_scr, dv_scr)

  @pl.when(tt < cnt_ref[hm, j])
  def _visit():
    i = idx_ref[hm, j, tt]

    def body(partial: bool):
      q, do = q_ref[...], do_ref[...]
      p, ds = _recompute(q, k_ref[...], v_ref[...], do, lse_ref[...], di_ref[...], i, j, st,
                         partial, qseg_ref, kvseg_ref, tile_ref)
      tc.accumulate_dkv(dk_scr, dv_scr, p, ds, q, do)

    _dispatch(cls_ref[hm, j, tt], st, body)

  @pl.when(t == pl.num_programs(3) - 1)
  def _finish():
    tc.finish_dkv(dk_ref, dv_ref, dk_scr, dv_scr, st.scale)


def _bwd(q, k, v, qseg, kvseg, tiles, o, lse, do, lay: layout_lib.KernelLayout, st: _Static,
         interpret):
  """Gradients (dq, dk, dv) in the kernel layout ``[B, H(kv), L_p, D]``."""
  b, h, lq, d = q.shape
  _, hkv, lk, _ = k.shape
  bq, bk = st.block_q, st.block_k
  nq, nk = lq // bq, lk // bk
  g = st.groups
  ph = st.per_head
  num_scalars = 4 if st.has_tiles else 3
  lse_l, di_l = tc.backward_stats(o, lse, do)
  cp = tc.compiler_params()

  def hm(hh):
    return hh if ph else 0

  # ---- dQ: grid (b, h, nq, steps) over rows lists.
  rows = lay.rows

  def q_map(bb, hh, i, t, *s):
    return bb, hh, i, 0

  def kv_map(bb, hh, i, t, idx, *s):
    return bb, hh // g, idx[hm(hh), i, t], 0

  in_specs = [pl.BlockSpec((None, None, bq, d), q_map),
              pl.BlockSpec((None, None, bk, d), kv_map),
              pl.BlockSpec((None, None, bk, d), kv_map),
              pl.BlockSpec((None, None, bq, d), q_map),
              pl.BlockSpec((None, None, bq, NUM_LANES), q_map),
              pl.BlockSpec((None, None, bq, NUM_LANES), q_map)]
  args = [q, k, v, do, lse_l, di_l]
  if st.has_seg:
    in_specs += [pl.BlockSpec((None, bq, NUM_LANES), lambda bb, hh, i, t, *s: (bb, i, 0)),
                 pl.BlockSpec((None, NUM_SUBLANES, bk),
                              lambda bb, hh, i, t, idx, *s: (bb, 0, idx[hm(hh), i, t]))]
    args += [qseg, kvseg]
  if st.has_tiles:
    in_specs.append(pl.BlockSpec(
        (None, bq, bk), lambda bb, hh, i, t, idx, cnt, cls, tile: (tile[hm(hh), i, t], 0, 0)))
    args.append(tiles)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, st=st, num_scalars=num_scalars),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=num_scalars, grid=(b, h, nq, rows.max_steps), in_specs=in_specs,
          out_specs=pl.BlockSpec((None, None, bq, d), q_map),
          scratch_shapes=[pltpu.VMEM((bq, d), jnp.float32)]),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=cp, interpret=interpret, name="effx_flash_dq",
  )(*_scalar_args(rows, st.has_tiles), *args)

  # ---- dK/dV: grid (b, kv_heads, nk, groups * steps) over cols lists.
  cols = lay.cols
  steps = cols.max_steps

  def head(kh, t):
    return kh * g + t // steps

  def qi_map(bb, kh, j, t, idx, *s):
    hh = head(kh, t)
    return bb, hh, idx[hm(hh), j, t % steps], 0

  def k_map(bb, kh, j, t, *s):
    return bb, kh, j, 0

  in_specs = tc.dkv_in_specs(bq, bk, d, qi_map, k_map)
  args = [q, k, v, do, lse_l, di_l]
  if st.has_seg:
    def qseg_map(bb, kh, j, t, idx, *s):
      return bb, idx[hm(head(kh, t)), j, t % steps], 0
    in_specs += [pl.BlockSpec((None, bq, NUM_LANES), qseg_map),
                 pl.BlockSpec((None, NUM_SUBLANES, bk), lambda bb, kh, j, t, *s: (bb, 0, j))]
    args += [qseg, kvseg]
  if st.has_tiles:
    def tile_map(bb, kh, j, t, idx, cnt, cls, tile):
      return tile[hm(head(kh, t)), j, t % steps], 0, 0
    in_specs.append(pl.BlockSpec((None, bq, bk), tile_map))
    args.append(tiles)
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, st=st, num_scalars=num_scalars, steps=steps),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=num_scalars, grid=(b, hkv, nk, g * steps), in_specs=in_specs,
          out_specs=[pl.BlockSpec((None, None, bk, d), k_map)] * 2,
          scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32)] * 2),
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype)] * 2,
      compiler_params=cp, interpret=interpret, name="effx_flash_dkv",
  )(*_scalar_args(cols, st.has_tiles), *args)
  return dq, dk, dv


# ------------------------------------------------------------------------------------------------
# Entry
# ------------------------------------------------------------------------------------------------


def _pad_to(x, axis: int, multiple: int):
  n = x.shape[axis]
  extra = -n % multiple
  if not extra:
    return x
  pads = [(0, 0)] * x.ndim
  pads[axis] = (0, extra)
  return jnp.pad(x, pads)


def flash_attention_tpu(q, k, v, *, segment_ids=None, causal: bool = True,
                        window: int | None = None, block_mask=None, dense_mask=None,
                        logit_soft_cap: float | None = None, sm_scale: float | None = None,
                        block_sizes: BlockSizes | None = None, interpret=None):
  """Flash attention with the TPU Pallas kernels (same semantics as ``attention_reference``).

  Args:
    q: ``[batch, q_len, heads, head_dim]``; k, v: ``[batch, kv_len, kv_heads, head_dim]``.
    segment_ids: None, ``reference.SegmentIds`` / a (q, kv) pair (int32 ``[batch, q_len]``,
      ``[batch, kv_len]``), or one array when q_len == kv_len.
    causal, window, block_mask, dense_mask, logit_soft_cap, sm_scale: see ``reference.py``.
    block_sizes: tiles (default 128 x 128).
    interpret: None on a TPU; ``pltpu.InterpretParams(...)`` (or True) to run on CPU.

  Returns:
    ``[batch, q_len, heads, head_dim]`` in q's dtype, differentiable in q, k, v.
  """
  bs = block_sizes or BlockSizes()
  b, q_len, h, d = q.shape
  kv_len, hkv = k.shape[1], k.shape[2]
  scale = float(sm_scale) if sm_scale is not None else 1.0 / float(np.sqrt(d))
  on_hw = jax.default_backend() == "tpu" and not interpret
  for name, val in (("block_k", bs.block_k), ("block_k_bwd", bs.bwd[1])):
    if on_hw and val % NUM_LANES:
      raise ValueError(f"BlockSizes.{name}={val} must be a multiple of 128 on TPU")

  mq = int(np.lcm(bs.block_q, bs.bwd[0]))
  mk = int(np.lcm(bs.block_k, bs.bwd[1]))
  lq_p, lk_p = -(-q_len // mq) * mq, -(-kv_len // mk) * mk

  def make(bq, bk):
    lay = layout_lib.make_layout(q_len, kv_len, bq, bk, causal=causal, window=window,
                                 dense_mask=dense_mask, block_mask=block_mask,
                                 num_q_blocks=lq_p // bq, num_k_blocks=lk_p // bk)
    visited = lay.classes[lay.classes != layout_lib.EMPTY]
    st = _Static(causal=causal, window=window, cap=logit_soft_cap, scale=scale, q_len=q_len,
                 kv_len=kv_len, block_q=bq, block_k=bk, groups=h // hkv, per_head=lay.per_head,
                 has_seg=segment_ids is not None, has_tiles=lay.has_dense_partial,
                 any_full=bool((visited == layout_lib.FULL).any()),
                 any_partial=bool((visited == layout_lib.PARTIAL).any()))
    return lay, st

  segment_ids = ref_lib.as_segment_ids(segment_ids, q_len, kv_len)
  lay_f, st_f = make(bs.block_q, bs.block_k)
  lay_b, st_b = make(*bs.bwd)
  if lay_f.per_head and lay_f.classes.shape[0] != h:
    raise ValueError(f"dense_mask has {lay_f.classes.shape[0]} heads; expected 1 or {h}")

  def prep(x, multiple):   # [B, L, H, D] -> padded [B, H, L_p, D]
    return jnp.swapaxes(_pad_to(x, 1, multiple), 1, 2)

  def segs(seg):
    if seg is None:
      return None, None
    qs = _pad_to(seg.q.astype(jnp.int32), 1, mq)
    ks = _pad_to(seg.kv.astype(jnp.int32), 1, mk)
    return (jnp.broadcast_to(qs[:, :, None], qs.shape + (NUM_LANES,)),
            jnp.broadcast_to(ks[:, None, :], (ks.shape[0], NUM_SUBLANES, ks.shape[1])))

  tiles_f = jnp.asarray(lay_f.tiles) if st_f.has_tiles else None
  tiles_b = jnp.asarray(lay_b.tiles) if st_b.has_tiles else None

  @jax.custom_vjp
  def attn(qp, kp, vp, qseg, kvseg):
    return _fwd(qp, kp, vp, qseg, kvseg, tiles_f, lay_f, st_f, interpret)[0]

  def attn_fwd(qp, kp, vp, qseg, kvseg):
    o, lse = _fwd(qp, kp, vp, qseg, kvseg, tiles_f, lay_f, st_f, interpret)
    return o, (qp, kp, vp, qseg, kvseg, o, lse)

  def attn_bwd(res, do):
    qp, kp, vp, qseg, kvseg, o, lse = res
    dq, dk, dv = _bwd(qp, kp, vp, qseg, kvseg, tiles_b, o, lse, do, lay_b, st_b, interpret)
    return dq, dk, dv, None, None

  attn.defvjp(attn_fwd, attn_bwd)
  qseg, kvseg = segs(segment_ids)
  out = attn(prep(q, mq), prep(k, mk), prep(v, mk), qseg, kvseg)
  return jnp.swapaxes(out, 1, 2)[:, :q_len]
