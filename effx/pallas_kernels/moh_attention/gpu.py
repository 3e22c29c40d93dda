"""Head-sparse causal flash attention for Hopper GPUs (Pallas Mosaic GPU, ``plgpu``).

MoH activates a few heads per token; a (query block, head) pair that no token of the block
routed to needs no attention. Every kernel here reads the run-time activity map (int32
``[batch, heads, nq]`` in global memory, one scalar per CTA) and does no work for inactive
pairs:

* forward, one CTA per (head, query block, batch): ``block_q // 64`` compute warpgroups of 64
  rows plus one memory warpgroup that streams the causally visible K/V tiles with TMA into a
  ``num_stages``-deep shared-memory ring ("loaded" barriers with transaction counts, "consumed"
  barriers with one arrival per compute warpgroup). FlashAttention-2 recurrence with WGMMA in
  base 2 (scores pre-multiplied by log2 e), the causal element mask only on diagonal tiles
  (``lax.cond``). An inactive CTA fetches nothing and writes O = 0 and lse = +inf.
* dQ, one CTA per (head, query block, batch), the same structure: P is recomputed from the
  saved lse, ``dS = P * (dP - D)``, ``dQ += dS K``. Inactive CTAs write zeros.
* dK/dV, one CTA per (kv head, 128-key block, batch), two compute warpgroups of 64 keys each
  (K and V stay in shared memory) plus a memory warpgroup streaming 64-row query tiles (Q, dO,
  lse, D) of the CTA's visit list: the active (head of the GQA group, query tile) pairs, sorted
  by query tile, built by XLA (``_dkv_tables``) so that the pairs a key block sees causally are
  a suffix ``start[j] .. count`` of one list per (batch, kv head). ``S^T = K Q^T``,
  ``dV += P^T dO``, ``dP^T = V dO^T``, ``dK += dS^T Q``; GQA accumulates in registers.

Per-token head gates are applied by XLA outside the kernels (``y = gates * O``; its autodiff
gives ``dgates = rowsum(dy * O)`` and ``dO = gates * dy``); ``D = rowsum(dO * O)`` is XLA.
Lengths that are not tile multiples are zero-padded: causality hides padded keys from real
rows, and padded rows have ``dO = 0`` so they add nothing to dK/dV.

Supported (``supported``): bf16/f16, head_dim a multiple of 64 up to 256, block_q 64 or 128,
block_k a multiple of 64, segment ids, soft-cap, GQA/MQA. The backward kernels need
head_dim <= 128 (the dK and dV accumulators of 64 x head_dim float32 each live in registers);
above that ``backward_supported`` gives the reason and the gradient is the XLA reference's
(dense, every head).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from effx.pallas_kernels import _gpu_common as gc
from effx.pallas_kernels._gpu_common import LOG2E, WG_ROWS
from effx.pallas_kernels.moh_attention import reference as ref_lib
from effx.pallas_kernels.moh_attention.config import BlockSizes

DQ_BLOCK_K = 64       # keys per dQ step
DKV_BLOCK_K = 128     # keys per dK/dV CTA (two compute warpgroups)
DKV_BLOCK_Q = 64      # query rows per dK/dV step
SMEM_BYTES = 227 * 1024   # Hopper's shared memory per CTA


@dataclasses.dataclass(frozen=True)
class _Static:
  """Trace-time constants of one call (``tp``: padded length)."""
  cap: float | None
  scale: float
  block_q: int
  block_k: int
  num_stages: int
  groups: int
  tp: int
  has_seg: bool
  interpreting: bool

  @property
  def nq(self) -> int:
    return self.tp // self.block_q


def supported(q, k, *, block_sizes: BlockSizes) -> str | None:
  """None if the Mosaic GPU forward handles this call, else the reason it does not."""
  reason = gc.unsupported_inputs(q, k)
  if reason is not None:
    return reason
  d = q.shape[-1]
  if block_sizes.block_q not in (64, 128):
    return f"block_q {block_sizes.block_q} (GPU kernel: 64 or 128)"
  if block_sizes.block_k % 64:
    return f"block_k {block_sizes.block_k} (GPU kernel: a multiple of 64)"
  need = _fwd_smem_bytes(block_sizes, d, jnp.dtype(q.dtype).itemsize)
  if need > SMEM_BYTES:
    return (f"block_k {block_sizes.block_k} x num_stages {block_sizes.num_stages} at head_dim "
            f"{d} needs {need} bytes of shared memory (> {SMEM_BYTES})")
  return None


def _fwd_smem_bytes(bs: BlockSizes, d: int, itemsize: int) -> int:
  """Shared memory of the forward kernel: Q tiles, the K/V ring, lse and segment ids."""
  return ((bs.block_q + 2 * bs.num_stages * bs.block_k) * d * itemsize
          + bs.block_q * 8 + bs.num_stages * bs.block_k * 4)


def backward_supported(q) -> str | None:
  """None if the Mosaic GPU dQ and dK/dV kernels handle q's head_dim, else why not."""
  if q.shape[-1] > 128:
    return f"head_dim {q.shape[-1]} > 128 (dK/dV accumulators exceed the register file)"
  return None


# ------------------------------------------------------------------------------------------------
# Shared pieces
# ------------------------------------------------------------------------------------------------


def _causal(s, row0, col0, *, keys_on_rows: bool):
  """Causal mask of a WGMMA-layout tile whose rows start at position ``row0`` and columns at
  ``col0``; rows are queries (or keys if ``keys_on_rows``)."""
  rows = row0 + gc.iota(s.shape, 0)
  cols = col0 + gc.iota(s.shape, 1)
  return jnp.where(rows <= cols if keys_on_rows else cols <= rows, s, -jnp.inf)


def _masked(s, full, row0, col0, *, keys_on_rows: bool, row_ids=None, col_ids=None):
  """The causal mask applied only when the tile is not ``full`` (segments always)."""
  causal = lambda x: _causal(x, row0, col0, keys_on_rows=keys_on_rows)
  s = lax.cond(full, lambda x: x, causal, s)
  if row_ids is not None:
    s = gc.segment_mask(s, row_ids, col_ids)
  return s


def _kv_blocks(qt, block_q: int, block_k: int):
  """Key tiles a causal query block ``qt`` needs: ``ceil((qt + 1) * block_q / block_k)``."""
  return lax.div((qt + 1) * block_q + (block_k - 1), jnp.int32(block_k))


# ------------------------------------------------------------------------------------------------
# Forward
# ------------------------------------------------------------------------------------------------


def _stream_kv(st: _Static, count, bk: int, bi, hi, src, ring, bars) -> None:
  """The memory warpgroup of the forward and dQ kernels: streams the ``count`` causally
  visible K/V tiles of ``bk`` keys (and their segment ids) of batch ``bi``, query head ``hi``
  into the ``st.num_stages``-deep ring. ``src`` = (k, v, seg or None) GMEM refs, ``ring`` =
  (k, v, seg) SMEM rings, ``bars`` = (k loaded, v loaded, seg loaded, k free, v free)."""
  k_ref, v_ref, seg_ref = src
  k_smem, v_smem, kvseg_smem = ring
  k_bar, v_bar, seg_bar, k_used, v_used = bars
  ns = st.num_stages
  plgpu.set_max_registers(40, action="decrease")
  kvh = lax.div(hi, jnp.int32(st.groups))

  @pl.loop(0, count)
  def _fetch(t):
    slot = gc.ring_slot(t, ns)
    rows = pl.ds(t * bk, bk)
    gc.fetch_kv(t, ns, k_src=k_ref.at[bi, rows, kvh], k_dst=k_smem.at[slot],
                k_loaded=k_bar.at[slot], k_free=k_used.at[slot],
                v_src=v_ref.at[bi, rows, kvh], v_dst=v_smem.at[slot],
                v_loaded=v_bar.at[slot], v_free=v_used.at[slot],
                seg_src=seg_ref.at[bi, rows] if st.has_seg else None,
                seg_dst=kvseg_smem.at[slot] if st.has_seg else None,
                seg_loaded=seg_bar.at[slot] if st.has_seg else None)


def _fwd_call(q, k, v, seg, act, st: _Static, interpret):
  """q ``[B, Tp, H, D]``, k/v ``[B, Tp, Hkv, D]``, act int32 ``[B, H, nq]`` ->
  (O ungated ``[B, Tp, H, D]`` like q, natural-log lse float32 ``[B, H, Tp]``)."""
  b, tp, h, d = q.shape
  dtype = q.dtype
  w, bk, ns, nq = st.block_q // WG_ROWS, st.block_k, st.num_stages, st.nq

  def kernel(q_ref, k_ref, v_ref, act_ref, seg_ref, o_ref, lse_ref, smem, bars):
    q_smem, k_smem, v_smem, lse_smem, qseg_smem, kvseg_smem, p_smem = smem
    q_bar, k_bar, v_bar, seg_bar, k_used, v_used = bars
    bi, hi = lax.axis_index("batch"), lax.axis_index("heads")
    qt = (nq - 1) - lax.axis_index("q_seq")   # the longest causal rows start first
    wg = lax.axis_index("wg")
    count = jnp.where(act_ref[bi, hi, qt] != 0, _kv_blocks(qt, st.block_q, bk), 0)

    @pl.when(wg < w)
    def _compute():
      plgpu.set_max_registers(gc.compute_registers(w), action="increase")
      row0 = qt * st.block_q + wg * WG_ROWS
      qs = q_smem.at[wg]

      @pl.when(count > 0)
      def _load_q():
        plgpu.copy_gmem_to_smem(q_ref.at[bi, pl.ds(row0, WG_ROWS), hi], qs, q_bar.at[wg])
        if st.has_seg:
          plgpu.copy_gmem_to_smem(seg_ref.at[bi, pl.ds(row0, WG_ROWS)], qseg_smem.at[wg],
                                  q_bar.at[w + wg])
          plgpu.barrier_wait(q_bar.at[w + wg])
        plgpu.barrier_wait(q_bar.at[wg])

      q_ids = plgpu.load(qseg_smem.at[wg], layout=gc.rows_layout()) if st.has_seg else None

      def step(t, carry):
        acc, m_i, l_i = carry
        slot = gc.ring_slot(t, ns)
        plgpu.barrier_wait(k_bar.at[slot])
        kv_ids = None
        if st.has_seg:
          plgpu.barrier_wait(seg_bar.at[slot])
          kv_ids = plgpu.load(kvseg_smem.at[slot], layout=gc.cols_layout())
        s = gc.matmul(qs, k_smem.at[slot].transpose((1, 0)), (WG_ROWS, bk))
        plgpu.barrier_arrive(k_used.at[slot])
        s, _ = gc.scores(s, scale=st.scale, cap=st.cap)
        s = _masked(s, (t + 1) * bk - 1 <= row0, row0, t * bk, keys_on_rows=False,
                    row_ids=q_ids, col_ids=kv_ids)
        return gc.softmax_pv_step(
            s, acc, m_i, l_i, dtype=dtype, v_tile=v_smem.at[slot], v_loaded=v_bar.at[slot],
            v_free=v_used.at[slot], p_buf=None if p_smem is None else p_smem.at[wg],
            interpreting=st.interpreting)

      acc, m_i, l_i = lax.fori_loop(0, count, step, gc.softmax_init(d))
      # An inactive pair ran no step: O = 0, lse = +inf.
      gc.softmax_finish(acc, m_i, l_i, dtype=dtype, o_smem=qs, lse_smem=lse_smem.at[wg],
                        o_dst=o_ref.at[bi, pl.ds(row0, WG_ROWS), hi],
                        lse_dst=lse_ref.at[bi, hi, pl.ds(row0, WG_ROWS)], empty_lse=jnp.inf)

    pl.when(wg == w)(lambda: _stream_kv(
        st, count, bk, bi, hi, (k_ref, v_ref, seg_ref), (k_smem, v_smem, kvseg_smem),
        (k_bar, v_bar, seg_bar, k_used, v_used)))

  def entry(q_ref, k_ref, v_ref, act_ref, *rest):
    seg_ref, (o_ref, lse_ref) = (rest[0], rest[1:]) if st.has_seg else (None, rest)
    smem = (gc.tile_smem(dtype, w, WG_ROWS, d), gc.tile_smem(dtype, ns, bk, d),
            gc.tile_smem(dtype, ns, bk, d),
            plgpu.SMEM((w, WG_ROWS), jnp.float32),
            plgpu.SMEM((w, WG_ROWS), jnp.int32) if st.has_seg else None,
            plgpu.SMEM((ns, bk), jnp.int32) if st.has_seg else None,
            gc.tile_smem(dtype, w, WG_ROWS, bk) if st.interpreting else None)
    bars = (plgpu.Barrier(num_barriers=2 * w), plgpu.Barrier(num_barriers=ns),
            plgpu.Barrier(num_barriers=ns),
            plgpu.Barrier(num_barriers=ns) if st.has_seg else None,
            plgpu.Barrier(num_arrivals=w, num_barriers=ns),
            plgpu.Barrier(num_arrivals=w, num_barriers=ns))
    pl.run_scoped(lambda s, br: kernel(q_ref, k_ref, v_ref, act_ref, seg_ref, o_ref, lse_ref,
                                       s, br),
                  smem, bars, collective_axes="wg")

  args = [q, k, v, act] + ([seg] if st.has_seg else [])
  return gc.launch(
      entry,
      out_type=(jax.ShapeDtypeStruct(q.shape, dtype),
                jax.ShapeDtypeStruct((b, h, tp), jnp.float32)),
      grid=(h, nq, b), grid_names=("heads", "q_seq", "batch"),
      compute_wgs=w, interpret=interpret,
  )(*args)


# ------------------------------------------------------------------------------------------------
# Backward
# ------------------------------------------------------------------------------------------------


def _xla_bwd(qp, kp, vp, seg, act, do, st: _Static):
  """The XLA reference's gradient of the ungated, activity-masked O (dense: every head)."""
  ones = jnp.ones(qp.shape[:3], jnp.float32)
  active = jnp.swapaxes(act, 1, 2) != 0

  def ungated(q, k, v):
    return ref_lib.moh_attention_reference(q, k, v, ones, active=active, block_q=st.block_q,
                                           segment_ids=seg, logit_soft_cap=st.cap,
                                           sm_scale=st.scale)
  return jax.vjp(ungated, qp, kp, vp)[1](do)


def _dq_call(q, k, v, do, lse2, delta, seg, act, st: _Static, interpret):
  """dQ ``[B, Tp, H, D]`` (q's dtype) over the active (query block, head) pairs, 0 elsewhere.

  ``lse2``: the forward's lse times log2(e); ``delta``: ``rowsum(dO * O)``; both float32
  ``[B, H, Tp]``.
  """
  b, tp, h, d = q.shape
  dtype = q.dtype
  w, bk, ns, nq = st.block_q // WG_ROWS, DQ_BLOCK_K, st.num_stages, st.nq

  def kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, act_ref, seg_ref, dq_ref, smem,
             bars):
    q_smem, do_smem, k_smem, v_smem, stat_smem, qseg_smem, kvseg_smem, ds_smem = smem
    row_bar, k_bar, v_bar, seg_bar, k_used, v_used = bars
    bi, hi = lax.axis_index("batch"), lax.axis_index("heads")
    qt = (nq - 1) - lax.axis_index("q_seq")
    wg = lax.axis_index("wg")
    count = jnp.where(act_ref[bi, hi, qt] != 0, _kv_blocks(qt, st.block_q, bk), 0)

    @pl.when(wg < w)
    def _compute():
      plgpu.set_max_registers(gc.compute_registers(w), action="increase")
      row0 = qt * st.block_q + wg * WG_ROWS
      rows = pl.ds(row0, WG_ROWS)
      qs, dos = q_smem.at[wg], do_smem.at[wg]
      loads = [(q_ref.at[bi, rows, hi], qs), (do_ref.at[bi, rows, hi], dos),
               (lse_ref.at[bi, hi, rows], stat_smem.at[wg, 0]),
               (delta_ref.at[bi, hi, rows], stat_smem.at[wg, 1])]
      if st.has_seg:
        loads.append((seg_ref.at[bi, rows], qseg_smem.at[wg]))

      @pl.when(count > 0)
      def _load_rows():
        for n, (src, dst) in enumerate(loads):
          plgpu.copy_gmem_to_smem(src, dst, row_bar.at[n * w + wg])
        for n in range(len(loads)):
          plgpu.barrier_wait(row_bar.at[n * w + wg])

      lse = plgpu.load(stat_smem.at[wg, 0], layout=gc.rows_layout())
      delta = plgpu.load(stat_smem.at[wg, 1], layout=gc.rows_layout())
      q_ids = plgpu.load(qseg_smem.at[wg], layout=gc.rows_layout()) if st.has_seg else None
      dq0 = gc.zeros((WG_ROWS, d))

      def step(t, dq):
        slot = gc.ring_slot(t, ns)
        plgpu.barrier_wait(k_bar.at[slot])
        kv_ids = None
        if st.has_seg:
          plgpu.barrier_wait(seg_bar.at[slot])
          kv_ids = plgpu.load(kvseg_smem.at[slot], layout=gc.cols_layout())
        s, th = gc.scores(gc.matmul(qs, k_smem.at[slot].transpose((1, 0)), (WG_ROWS, bk)),
                          scale=st.scale, cap=st.cap)
        s = _masked(s, (t + 1) * bk - 1 <= row0, row0, t * bk, keys_on_rows=False,
                    row_ids=q_ids, col_ids=kv_ids)
        p = jnp.exp2(s - lax.broadcast_in_dim(lse, s.shape, [0]))
        plgpu.barrier_wait(v_bar.at[slot])
        dp = gc.matmul(dos, v_smem.at[slot].transpose((1, 0)), (WG_ROWS, bk))
        plgpu.barrier_arrive(v_used.at[slot])
        ds = p * (dp - lax.broadcast_in_dim(delta, dp.shape, [0]))
        if th is not None:
          ds = ds * (1.0 - th * th)
        ds_op = gc.lhs(ds.astype(dtype), None if ds_smem is None else ds_smem.at[wg])
        dq = gc.accumulate(dq, ds_op, k_smem.at[slot], st.interpreting)
        plgpu.barrier_arrive(k_used.at[slot])
        return dq

      dq = lax.fori_loop(0, count, step, dq0)
      qs[...] = (dq * st.scale).astype(dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(qs, dq_ref.at[bi, rows, hi])
      plgpu.wait_smem_to_gmem(0)

    pl.when(wg == w)(lambda: _stream_kv(
        st, count, bk, bi, hi, (k_ref, v_ref, seg_ref), (k_smem, v_smem, kvseg_smem),
        (k_bar, v_bar, seg_bar, k_used, v_used)))

  def entry(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, act_ref, *rest):
    seg_ref, (dq_ref,) = (rest[0], rest[1:]) if st.has_seg else (None, rest)
    smem = (gc.tile_smem(dtype, w, WG_ROWS, d), gc.tile_smem(dtype, w, WG_ROWS, d),
            gc.tile_smem(dtype, ns, bk, d), gc.tile_smem(dtype, ns, bk, d),
            plgpu.SMEM((w, 2, WG_ROWS), jnp.float32),
            plgpu.SMEM((w, WG_ROWS), jnp.int32) if st.has_seg else None,
            plgpu.SMEM((ns, bk), jnp.int32) if st.has_seg else None,
            gc.tile_smem(dtype, w, WG_ROWS, bk) if st.interpreting else None)
    bars = (plgpu.Barrier(num_barriers=(5 if st.has_seg else 4) * w),
            plgpu.Barrier(num_barriers=ns), plgpu.Barrier(num_barriers=ns),
            plgpu.Barrier(num_barriers=ns) if st.has_seg else None,
            plgpu.Barrier(num_arrivals=w, num_barriers=ns),
            plgpu.Barrier(num_arrivals=w, num_barriers=ns))
    pl.run_scoped(lambda s, br: kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, act_ref,
                                       seg_ref, dq_ref, s, br),
                  smem, bars, collective_axes="wg")

  args = [q, k, v, do, lse2, delta, act] + ([seg] if st.has_seg else [])
  return gc.launch(
      entry, out_type=jax.ShapeDtypeStruct(q.shape, dtype),
      grid=(h, nq, b), grid_names=("heads", "q_seq", "batch"),
      compute_wgs=w, interpret=interpret,
  )(*args)


def _dkv_tables(act, groups: int, block_q: int):
  """Visit lists of the dK/dV kernel from the activity map ``act`` int32 ``[B, H, nq]``.

  Returns (lst int32 ``[B, Hkv, groups * nt]``: the active (head of the group ``g``, 64-row
  query tile ``i``) pairs coded ``g * nt + i``, sorted by ``i``, then padding; start int32
  ``[B, Hkv, nkb]``: the first list entry whose tile a key block ``j`` (of DKV_BLOCK_K keys)
  sees causally; count int32 ``[B, Hkv]``: the number of active entries).
  """
  b, h, _ = act.shape
  tiles = jnp.repeat(act != 0, block_q // DKV_BLOCK_Q, axis=2)     # [B, H, nt]
  nt = tiles.shape[2]
  tiles = tiles.reshape(b, h // groups, groups, nt)
  code = np.arange(groups)[:, None] * nt + np.arange(nt)[None, :]  # [groups, nt]
  flat = jnp.swapaxes(tiles, 2, 3).reshape(b, h // groups, nt * groups)   # tile-major
  order = jnp.argsort(jnp.logical_not(flat), axis=-1, stable=True)  # active first, in order
  lst = jnp.asarray(code.T.reshape(-1), jnp.int32)[order]
  per_tile = tiles.sum(axis=2, dtype=jnp.int32)                    # [B, Hkv, nt]
  before = jnp.cumsum(per_tile, axis=-1) - per_tile
  first = np.arange(nt * DKV_BLOCK_Q // DKV_BLOCK_K) * (DKV_BLOCK_K // DKV_BLOCK_Q)
  return lst, before[..., first], per_tile.sum(axis=-1, dtype=jnp.int32)


def _dkv_call(q, k, v, do, lse2, delta, seg, tables, st: _Static, interpret):
  """(dK, dV) ``[B, Tp, Hkv, D]`` (k's dtype) from the active pairs of each key block's
  visit list (``_dkv_tables``); GQA groups accumulate in the CTA."""
  b, tp, hkv, d = k.shape
  dtype = k.dtype
  w, bq, ns = DKV_BLOCK_K // WG_ROWS, DKV_BLOCK_Q, st.num_stages
  nkb, nt = tp // DKV_BLOCK_K, tp // DKV_BLOCK_Q

  def kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, lst_ref, start_ref, cnt_ref,
             seg_ref, dk_ref, dv_ref, smem, bars):
    k_smem, v_smem, q_smem, do_smem, stat_smem, kseg_smem, qseg_smem, p_smem, ds_smem = smem
    key_bar, q_bar, do_bar, lse_bar, delta_bar, seg_bar, used = bars
    bi, kvh = lax.axis_index("batch"), lax.axis_index("kv_heads")
    j = lax.axis_index("kv_seq")      # the first key blocks see the most queries: start first
    wg = lax.axis_index("wg")
    t0, t1 = start_ref[bi, kvh, j], cnt_ref[bi, kvh]

    def pair(t):
      """(query head, first query row) of list entry t."""
      e = lst_ref[bi, kvh, t]
      return kvh * st.groups + lax.div(e, jnp.int32(nt)), lax.rem(e, jnp.int32(nt)) * bq

    @pl.when(wg < w)
    def _compute():
      plgpu.set_max_registers(gc.compute_registers(w), action="increase")
      row0 = j * DKV_BLOCK_K + wg * WG_ROWS
      rows = pl.ds(row0, WG_ROWS)
      ks, vs = k_smem.at[wg], v_smem.at[wg]
      loads = [(k_ref.at[bi, rows, kvh], ks), (v_ref.at[bi, rows, kvh], vs)]
      if st.has_seg:
        loads.append((seg_ref.at[bi, rows], kseg_smem.at[wg]))

      @pl.when(t1 > t0)
      def _load_keys():
        for n, (src, dst) in enumerate(loads):
          plgpu.copy_gmem_to_smem(src, dst, key_bar.at[n * w + wg])
        for n in range(len(loads)):
          plgpu.barrier_wait(key_bar.at[n * w + wg])

      k_ids = plgpu.load(kseg_smem.at[wg], layout=gc.rows_layout()) if st.has_seg else None
      zeros = gc.zeros((WG_ROWS, d))

      def step(t, carry):
        dk, dv = carry
        slot = lax.rem(t - t0, jnp.int32(ns))
        _, col0 = pair(t)
        plgpu.barrier_wait(q_bar.at[slot])
        plgpu.barrier_wait(lse_bar.at[slot])
        q_ids = None
        if st.has_seg:
          plgpu.barrier_wait(seg_bar.at[slot])
          q_ids = plgpu.load(qseg_smem.at[slot], layout=gc.cols_layout())
        qs = q_smem.at[slot]
        s, th = gc.scores(gc.matmul(ks, qs.transpose((1, 0)), (WG_ROWS, bq)),   # S^T
                          scale=st.scale, cap=st.cap)
        s = _masked(s, row0 + (WG_ROWS - 1) <= col0, row0, col0, keys_on_rows=True,
                    row_ids=k_ids, col_ids=q_ids)
        lse = plgpu.load(stat_smem.at[slot, 0], layout=gc.cols_layout())
        p = jnp.exp2(s - lax.broadcast_in_dim(lse, s.shape, [1]))
        p_op = gc.lhs(p.astype(dtype), None if p_smem is None else p_smem.at[wg])
        plgpu.barrier_wait(do_bar.at[slot])
        dos = do_smem.at[slot]
        dv = gc.accumulate(dv, p_op, dos, st.interpreting)
        dp = gc.matmul(vs, dos.transpose((1, 0)), (WG_ROWS, bq))               # dP^T
        plgpu.barrier_wait(delta_bar.at[slot])
        delta = plgpu.load(stat_smem.at[slot, 1], layout=gc.cols_layout())
        ds = p * (dp - lax.broadcast_in_dim(delta, dp.shape, [1]))
        if th is not None:
          ds = ds * (1.0 - th * th)
        ds_op = gc.lhs(ds.astype(dtype), None if ds_smem is None else ds_smem.at[wg])
        dk = gc.accumulate(dk, ds_op, qs, st.interpreting)
        plgpu.barrier_arrive(used.at[slot])
        return dk, dv

      dk, dv = lax.fori_loop(t0, t1, step, (zeros, zeros))
      ks[...] = (dk * st.scale).astype(dtype)
      vs[...] = dv.astype(dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(ks, dk_ref.at[bi, rows, kvh])
      plgpu.copy_smem_to_gmem(vs, dv_ref.at[bi, rows, kvh])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == w)
    def _memory():
      plgpu.set_max_registers(40, action="decrease")

      @pl.loop(t0, t1)
      def _fetch(t):
        slot = lax.rem(t - t0, jnp.int32(ns))
        hq, r0 = pair(t)
        rows = pl.ds(r0, bq)

        @pl.when(t - t0 >= ns)
        def _():
          plgpu.barrier_wait(used.at[slot])
          plgpu.commit_smem()   # lse/D/ids were read through the generic proxy

        plgpu.copy_gmem_to_smem(q_ref.at[bi, rows, hq], q_smem.at[slot], q_bar.at[slot])
        plgpu.copy_gmem_to_smem(lse_ref.at[bi, hq, rows], stat_smem.at[slot, 0],
                                lse_bar.at[slot])
        if st.has_seg:
          plgpu.copy_gmem_to_smem(seg_ref.at[bi, rows], qseg_smem.at[slot], seg_bar.at[slot])
        plgpu.copy_gmem_to_smem(do_ref.at[bi, rows, hq], do_smem.at[slot], do_bar.at[slot])
        plgpu.copy_gmem_to_smem(delta_ref.at[bi, hq, rows], stat_smem.at[slot, 1],
                                delta_bar.at[slot])

  def entry(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, lst_ref, start_ref, cnt_ref,
            *rest):
    seg_ref, (dk_ref, dv_ref) = (rest[0], rest[1:]) if st.has_seg else (None, rest)
    smem = (gc.tile_smem(dtype, w, WG_ROWS, d), gc.tile_smem(dtype, w, WG_ROWS, d),
            gc.tile_smem(dtype, ns, bq, d), gc.tile_smem(dtype, ns, bq, d),
            plgpu.SMEM((ns, 2, bq), jnp.float32),
            plgpu.SMEM((w, WG_ROWS), jnp.int32) if st.has_seg else None,
            plgpu.SMEM((ns, bq), jnp.int32) if st.has_seg else None,
            gc.tile_smem(dtype, w, WG_ROWS, bq) if st.interpreting else None,
            gc.tile_smem(dtype, w, WG_ROWS, bq) if st.interpreting else None)
    slots = lambda: plgpu.Barrier(num_barriers=ns)
    bars = (plgpu.Barrier(num_barriers=(3 if st.has_seg else 2) * w), slots(), slots(),
            slots(), slots(), slots() if st.has_seg else None,
            plgpu.Barrier(num_arrivals=w, num_barriers=ns))
    pl.run_scoped(lambda s, br: kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
                                       lst_ref, start_ref, cnt_ref, seg_ref, dk_ref, dv_ref,
                                       s, br),
                  smem, bars, collective_axes="wg")

  args = [q, k, v, do, lse2, delta, *tables] + ([seg] if st.has_seg else [])
  return gc.launch(
      entry, out_type=(jax.ShapeDtypeStruct(k.shape, dtype),) * 2,
      grid=(hkv, nkb, b), grid_names=("kv_heads", "kv_seq", "batch"),
      compute_wgs=w, interpret=interpret,
  )(*args)


def _bwd(qp, kp, vp, seg, act, o, lse, do, st: _Static, interpret):
  """(dq, dk, dv) padded like the inputs; ``do`` is the cotangent of the ungated O."""
  delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)
  delta = jnp.swapaxes(delta, 1, 2)                                 # [B, H, Tp]
  lse2 = lse * LOG2E
  do = do.astype(qp.dtype)
  dq = _dq_call(qp, kp, vp, do, lse2, delta, seg, act, st, interpret)
  tables = _dkv_tables(act, st.groups, st.block_q)
  dk, dv = _dkv_call(qp, kp, vp, do, lse2, delta, seg, tables, st, interpret)
  return dq, dk, dv


# ------------------------------------------------------------------------------------------------
# Entry
# ------------------------------------------------------------------------------------------------


def moh_attention_gpu(q, k, v, gates, *, active=None, segment_ids=None,
                      logit_soft_cap: float | None = None, sm_scale: float | None = None,
                      block_sizes: BlockSizes | None = None, interpret=None):
  """Head-sparse MoH attention with the Mosaic GPU kernels (semantics: ``reference.py``).

  Args:
    q: ``[batch, T, heads, head_dim]`` bf16/f16; k, v: ``[batch, T, kv_heads, head_dim]``.
    gates: ``[batch, T, heads]`` per-token head gates.
    active: bool ``[batch, ceil(T / block_q), heads]`` or None (= ``activity_map(gates,
      block_q)``): which (query block, head) pairs are computed.
    segment_ids: int32 ``[batch, T]`` or None.
    logit_soft_cap, sm_scale: as ``flash_attention``.
    block_sizes: tiles (``supported`` lists the GPU constraints); ``block_q`` is the activity
      map's block.
    interpret: None on a GPU; ``plgpu.InterpretGPUParams(...)`` to run on CPU (or run under
      ``plgpu.force_gpu_interpret_mode``).

  Returns:
    ``[batch, T, heads, head_dim]`` in q's dtype, differentiable in q, k, v and gates (the gate
    gradient is 0 on inactive pairs, like the output). Raises ValueError when ``supported``
    reports a reason.
  """
  bs = block_sizes or BlockSizes()
  ref_lib.check_inputs(q, k, v, gates, active, bs.block_q)
  reason = supported(q, k, block_sizes=bs)
  if reason is not None:
    raise ValueError(f"Mosaic GPU MoH attention does not support {reason}")
  b, t, h, d = q.shape
  if active is None:
    active = ref_lib.activity_map(gates, bs.block_q)
  mult = int(np.lcm.reduce([bs.block_q, bs.block_k, DKV_BLOCK_K]))
  tp = -(-t // mult) * mult
  st = _Static(cap=logit_soft_cap,
               scale=float(sm_scale) if sm_scale is not None else 1.0 / float(np.sqrt(d)),
               block_q=bs.block_q, block_k=bs.block_k, num_stages=bs.num_stages,
               groups=h // k.shape[2], tp=tp, has_seg=segment_ids is not None,
               interpreting=bool(interpret) or jax.default_backend() != "gpu")
  act = jnp.pad(active.astype(jnp.int32), ((0, 0), (0, st.nq - active.shape[1]), (0, 0)))
  act = jnp.swapaxes(act, 1, 2)                          # [B, H, nq]
  seg = None
  if segment_ids is not None:
    seg = gc.pad_time(jnp.asarray(segment_ids, jnp.int32), tp)
  qp, kp, vp = (gc.pad_time(x, tp) for x in (q, k, v))
  kernel_bwd = backward_supported(q) is None

  @jax.custom_vjp
  def attn(qp, kp, vp, seg, act):
    return _fwd_call(qp, kp, vp, seg, act, st, interpret)[0]

  def attn_fwd(qp, kp, vp, seg, act):
    o, lse = _fwd_call(qp, kp, vp, seg, act, st, interpret)
    return o, (qp, kp, vp, seg, act, o, lse)

  def attn_bwd(res, do):
    qp, kp, vp, seg, act, o, lse = res
    if kernel_bwd:
      dq, dk, dv = _bwd(qp, kp, vp, seg, act, o, lse, do, st, interpret)
    else:
      dq, dk, dv = _xla_bwd(qp, kp, vp, seg, act, do, st)
    return dq, dk, dv, None, None

  attn.defvjp(attn_fwd, attn_bwd)
  o = attn(qp, kp, vp, seg, act)[:, :t]                 # ungated, 0 on inactive pairs
  return (o.astype(jnp.float32) * gates.astype(jnp.float32)[..., None]).astype(q.dtype)
