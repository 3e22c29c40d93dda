"""Block-sparse flash attention backward for Hopper GPUs (Pallas Mosaic GPU, ``plgpu``).

The FlashAttention-2 backward in two kernels, both warp-specialised like the forward
(``gpu.py``): ``block // 64`` compute warpgroups of 64 rows each plus one memory warpgroup that
streams the inner tiles with TMA into a ``num_stages``-deep shared-memory ring ("loaded"
barriers with TMA transaction counts, one "consumed" barrier per slot with one arrival per
compute warpgroup). XLA computes ``D = rowsum(dO * O)`` (float32) beforehand.

* dQ kernel, grid ``(heads, q blocks, batch)``: a CTA owns ``block_q_bwd`` query rows of one
  head and loops over the 64-key tiles of its row list (``layout.BlockLists`` at tiling
  ``(block_q_bwd, 64)``), recomputing ``S = Q K^T``, ``P = exp2(S' - L')`` from the forward's
  log-sum-exp, ``dP = dO V^T``, ``dS = P (dP - D)`` and accumulating ``dQ += dS K``.
* dK/dV kernel, grid ``(kv_heads, kv blocks, batch)``: a CTA owns ``block_k_bwd`` keys of one
  kv head and loops over the 64-query tiles that see them, for every query head of the GQA
  group (the transposed lists ``cols`` at tiling ``(64, block_k_bwd)``, flattened over the
  group by ``group_lists``), in the transposed orientation: ``S^T = K Q^T``,
  ``dV += P^T dO``, ``dP^T = V dO^T``, ``dK += dS^T Q``. The group's query heads accumulate in
  registers, so GQA/MQA needs no extra reduction.

Everything is float32 in registers; P and dS are cast to the input dtype for their WGMMAs (as
in the forward and every flash kernel). Scores follow the forward: base 2, soft-cap through
``tanh`` (its derivative ``1 - tanh^2`` multiplies dS), the element mask (causal, window,
key padding) only on partial tiles, segment ids on every tile; empty tiles are never visited.
Padded query rows get ``L = +inf`` (so ``P = 0``) and ``dO = 0``; padded keys are masked.

``supported_backward`` says why a call cannot use these kernels (head_dim > 128, block sizes,
a dense mask that is not block-aligned at the backward tilings); ``gpu.py`` then keeps the XLA
reference gradient for exactly that call.
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
from effx.pallas_kernels.flash_attention import layout as layout_lib
from effx.pallas_kernels.flash_attention.config import BlockSizes

STEP = 64        # inner tile: keys per dQ step, queries per dK/dV step


@dataclasses.dataclass(frozen=True)
class _Static:
  """Trace-time constants of one backward kernel call."""
  causal: bool
  window: int | None
  cap: float | None
  scale: float
  kv_len: int
  block: int          # rows owned by a CTA (queries for dQ, keys for dK/dV)
  key_tile: int       # keys per tile (STEP for dQ, block for dK/dV)
  num_stages: int
  groups: int
  per_head: bool
  has_seg: bool
  any_full: bool
  any_partial: bool

  @property
  def compute_wgs(self) -> int:
    return self.block // WG_ROWS


def tilings(block_sizes: BlockSizes) -> tuple[tuple[int, int], tuple[int, int]]:
  """((block_q, block_k) of the dQ kernel, (block_q, block_k) of the dK/dV kernel)."""
  bq, bk = block_sizes.bwd
  return (bq, STEP), (STEP, bk)


def backward_layouts(q_len: int, kv_len: int, block_sizes: BlockSizes, *, causal, window,
                     dense_mask) -> tuple[layout_lib.KernelLayout, layout_lib.KernelLayout]:
  """The static layouts of the dQ and dK/dV kernels (their tilings differ, see ``tilings``)."""
  return tuple(layout_lib.make_layout(q_len, kv_len, bq, bk, causal=causal, window=window,
                                      dense_mask=dense_mask)
               for bq, bk in tilings(block_sizes))


def supported_backward(q, k, *, block_sizes: BlockSizes,
                       layouts: tuple[layout_lib.KernelLayout, ...] | None = None) -> str | None:
  """None if the Mosaic GPU backward kernels handle this call, else the reason they do not.

  Assumes the forward is supported (``gpu.supported`` is None): bf16/f16, head_dim % 64 == 0.
  """
  d = q.shape[-1]
  bq, bk = block_sizes.bwd
  if d > 128:
    return f"head_dim {d} (the Mosaic GPU backward takes head_dim <= 128)"
  if bq not in (64, 128):
    return f"block_q_bwd {bq} (Mosaic GPU backward: 64 or 128)"
  if bk not in (64, 128):
    return f"block_k_bwd {bk} (Mosaic GPU backward: 64 or 128)"
  if layouts is not None and any(lay.has_dense_partial for lay in layouts):
    return ("dense_mask has partial tiles at the backward tilings "
            f"({bq}x{STEP} for dQ, {STEP}x{bk} for dK/dV; only block-aligned masks)")
  return None


def group_lists(cols: layout_lib.BlockLists, heads: int, kv_heads: int, per_head: bool
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Flattens the per-key-block query lists over the query heads of each GQA group.

  Args:
    cols: transposed lists ``[h_or_1, nk, steps]`` (``KernelLayout.cols``).
    heads, kv_heads: query and kv head counts; per_head: whether ``cols`` has one list per head.

  Returns:
    ``(head, blk, cls, cnt)``: int32 ``[kv_heads, nk, S]`` (query head within the group, query
    block, tile class; padded with zeros) and int32 ``[kv_heads, nk]`` valid counts, visiting
    the group's heads in order and each head's query blocks in increasing order.
  """
  g = heads // kv_heads
  hm = (np.arange(heads) if per_head else np.zeros(heads, int)).reshape(kv_heads, g)
  _, nk, steps = cols.idx.shape

  def per_group(x):   # [h_or_1, nk, ...] -> [kv_heads, nk, g * steps]
    return np.moveaxis(x[hm], 2, 1).reshape(kv_heads, nk, g * steps)

  valid = per_group(np.arange(steps)[None, None, :] < cols.cnt[..., None])
  idx, cls = per_group(cols.idx), per_group(cols.cls)
  head = np.broadcast_to(np.arange(g)[:, None], (g, steps)).reshape(-1)
  head = np.broadcast_to(head, valid.shape)
  cnt = valid.sum(-1).astype(np.int32)
  size = max(int(cnt.max(initial=0)), 1)
  order = np.argsort(~valid, axis=-1, kind="stable")[..., :size]
  keep = np.arange(size)[None, None, :] < cnt[..., None]

  def take(x):
    return np.where(keep, np.take_along_axis(x, order, -1), 0).astype(np.int32)

  return take(head), take(idx), take(cls), cnt


def _static(st_kw: dict, lay: layout_lib.KernelLayout, block: int, key_tile: int) -> _Static:
  visited = lay.classes[lay.classes != layout_lib.EMPTY]
  return _Static(block=block, key_tile=key_tile, per_head=lay.per_head,
                 any_full=bool((visited == layout_lib.FULL).any()),
                 any_partial=bool((visited == layout_lib.PARTIAL).any()), **st_kw)


def _masked(s, cls, st: _Static, positions):
  """Element mask (causal / window / key padding) on partial tiles only; ``positions()`` gives
  the tile's (query, key) positions."""
  def apply(x):
    return gc.element_mask(x, *positions(), causal=st.causal, window=st.window,
                           kv_len=st.kv_len if st.kv_len % st.key_tile else None)
  return gc.on_partial_tiles(s, cls, layout_lib.FULL, apply, any_full=st.any_full,
                             any_partial=st.any_partial)


class _Mma:
  """WGMMA helpers: on hardware A may live in registers and accumulation is in place; GPU
  interpret mode takes shared-memory operands only and cannot run ``pl.run_state``."""

  def __init__(self, interpreting: bool):
    self.interpreting = interpreting

  @staticmethod
  def fresh(shape, a, b):
    """``a @ b`` into a new float32 accumulator (a, b: shared-memory refs)."""
    return gc.matmul(a, b, shape)

  def accumulate(self, acc, a, b, stage):
    """``acc + a @ b``; ``a`` a float16/bfloat16 WGMMA-layout array, ``stage`` its shared-memory
    staging buffer in interpret mode (None on hardware)."""
    return gc.accumulate(acc, gc.lhs(a, stage), b, self.interpreting)

  def accumulate_and_product(self, acc, a, b, stage, shape, a2, b2):
    """``(acc + a @ b, a2 @ b2)`` (a2, b2 shared-memory refs); on hardware both WGMMAs are in
    flight together and waited for once."""
    if self.interpreting:
      return self.accumulate(acc, a, b, stage), self.fresh(shape, a2, b2)

    def body(refs):
      acc_ref, out_ref = refs
      plgpu.wgmma(acc_ref, a, b)
      plgpu.wgmma(out_ref, a2, b2)
    return pl.run_state(body)((plgpu.ACC.init(acc), plgpu.ACC.init(gc.zeros(shape))))


# ------------------------------------------------------------------------------------------------
# dQ
# ------------------------------------------------------------------------------------------------


def _dq_call(q, k, v, do, lse2, delta, qseg, kvseg, lists: layout_lib.BlockLists, st: _Static,
             interpret):
  """Padded q/do ``[B, Lq_p, H, D]``, k/v ``[B, Lk_p, Hkv, D]``, lse2 (base 2) and delta
  ``[B, H, Lq_p]`` float32 -> dq ``[B, Lq_p, H, D]`` in q's dtype."""
  interpreting = gc.interpreting(interpret)
  mma = _Mma(interpreting)
  b, lq, h, d = q.shape
  dtype = q.dtype
  w, ns, bk = st.compute_wgs, st.num_stages, STEP
  n_qt = lq // st.block
  has_seg = st.has_seg
  rows_l = gc.rows_layout()
  cols_l = gc.cols_layout()

  def kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, idx_ref, cnt_ref, cls_ref,
             qseg_ref, kvseg_ref, dq_ref, smem, bars):
    (q_smem, do_smem, lse_smem, delta_smem, qseg_smem, k_smem, v_smem, kvseg_smem,
     stage_smem) = smem
    row_bar, k_bar, v_bar, seg_bar, used = bars
    bi = lax.axis_index("batch")
    hi = lax.axis_index("heads")
    # Last query blocks first: under causal masks they have the most work (longest first).
    qt = (n_qt - 1) - lax.axis_index("q_seq")
    wg = lax.axis_index("wg")
    hm = hi if st.per_head else 0
    count = cnt_ref[hm, qt]

    @pl.when(wg < w)
    def _compute():
      plgpu.set_max_registers(gc.compute_registers(w), action="increase")
      row0 = qt * st.block + wg * WG_ROWS
      rows = pl.ds(row0, WG_ROWS)
      qs, dos = q_smem.at[wg], do_smem.at[wg]
      nb = 5 if has_seg else 4
      plgpu.copy_gmem_to_smem(q_ref.at[bi, rows, hi], qs, row_bar.at[nb * wg])
      plgpu.copy_gmem_to_smem(do_ref.at[bi, rows, hi], dos, row_bar.at[nb * wg + 1])
      plgpu.copy_gmem_to_smem(lse_ref.at[bi, hi, rows], lse_smem.at[wg], row_bar.at[nb * wg + 2])
      plgpu.copy_gmem_to_smem(delta_ref.at[bi, hi, rows], delta_smem.at[wg],
                              row_bar.at[nb * wg + 3])
      if has_seg:
        plgpu.copy_gmem_to_smem(qseg_ref.at[bi, rows], qseg_smem.at[wg], row_bar.at[nb * wg + 4])
      for n in range(nb):
        plgpu.barrier_wait(row_bar.at[nb * wg + n])
      lse = plgpu.load(lse_smem.at[wg], layout=rows_l)
      dlt = plgpu.load(delta_smem.at[wg], layout=rows_l)
      q_ids = plgpu.load(qseg_smem.at[wg], layout=rows_l) if has_seg else None
      stage = stage_smem.at[wg] if stage_smem is not None else None
      shape = (WG_ROWS, bk)

      def step(t, dq):
        slot = gc.ring_slot(t, ns)
        j = idx_ref[hm, qt, t]
        cls = cls_ref[hm, qt, t]
        plgpu.barrier_wait(k_bar.at[slot])
        s, th = gc.scores(mma.fresh(shape, qs, k_smem.at[slot].transpose((1, 0))),
                          scale=st.scale, cap=st.cap)
        s = _masked(s, cls, st, lambda: (row0 + gc.iota(shape, 0), j * bk + gc.iota(shape, 1)))
        if has_seg:
          plgpu.barrier_wait(seg_bar.at[slot])
          kv_ids = plgpu.load(kvseg_smem.at[slot], layout=cols_l)
          s = gc.segment_mask(s, q_ids, kv_ids)
        p = jnp.exp2(s - lax.broadcast_in_dim(lse, shape, [0]))
        plgpu.barrier_wait(v_bar.at[slot])
        dp = mma.fresh(shape, dos, v_smem.at[slot].transpose((1, 0)))
        ds = p * (dp - lax.broadcast_in_dim(dlt, shape, [0]))
        if th is not None:
          ds = ds * (1.0 - th * th)
        dq = mma.accumulate(dq, ds.astype(dtype), k_smem.at[slot], stage)
        plgpu.barrier_arrive(used.at[slot])
        return dq

      dq = lax.fori_loop(0, count, step, gc.zeros((WG_ROWS, d)))
      qs[...] = (dq * st.scale).astype(dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(qs, dq_ref.at[bi, rows, hi])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == w)
    def _memory():
      plgpu.set_max_registers(40, action="decrease")
      kvh = lax.div(hi, jnp.int32(st.groups))

      @pl.loop(0, count)
      def _fetch(t):
        slot = gc.ring_slot(t, ns)
        keys = pl.ds(idx_ref[hm, qt, t] * bk, bk)

        @pl.when(t >= ns)
        def _():
          plgpu.barrier_wait(used.at[slot])
          # Segment ids were read through the generic proxy; order those reads before the
          # TMA (async proxy) overwrite.
          plgpu.commit_smem()

        plgpu.copy_gmem_to_smem(k_ref.at[bi, keys, kvh], k_smem.at[slot], k_bar.at[slot])
        if has_seg:
          plgpu.copy_gmem_to_smem(kvseg_ref.at[bi, keys], kvseg_smem.at[slot], seg_bar.at[slot])
        plgpu.copy_gmem_to_smem(v_ref.at[bi, keys, kvh], v_smem.at[slot], v_bar.at[slot])

  def entry(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, idx_ref, cnt_ref, cls_ref, *rest):
    if has_seg:
      qseg_ref, kvseg_ref, dq_ref = rest
    else:
      (dq_ref,), qseg_ref, kvseg_ref = rest, None, None
    smem = (gc.tile_smem(dtype, w, WG_ROWS, d), gc.tile_smem(dtype, w, WG_ROWS, d),
            plgpu.SMEM((w, WG_ROWS), jnp.float32), plgpu.SMEM((w, WG_ROWS), jnp.float32),
            plgpu.SMEM((w, WG_ROWS), jnp.int32) if has_seg else None,
            gc.tile_smem(dtype, ns, bk, d), gc.tile_smem(dtype, ns, bk, d),
            plgpu.SMEM((ns, bk), jnp.int32) if has_seg else None,
            gc.tile_smem(dtype, w, WG_ROWS, bk) if interpreting else None)
    bars = (plgpu.Barrier(num_barriers=(5 if has_seg else 4) * w),
            plgpu.Barrier(num_barriers=ns), plgpu.Barrier(num_barriers=ns),
            plgpu.Barrier(num_barriers=ns) if has_seg else None,
            plgpu.Barrier(num_arrivals=w, num_barriers=ns))
    pl.run_scoped(
        lambda smem_refs, bar_refs: kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
                                           idx_ref, cnt_ref, cls_ref, qseg_ref, kvseg_ref,
                                           dq_ref, smem_refs, bar_refs),
        smem, bars, collective_axes="wg")

  args = [q, k, v, do, lse2, delta, jnp.asarray(lists.idx), jnp.asarray(lists.cnt),
          jnp.asarray(lists.cls)]
  if has_seg:
    args += [qseg, kvseg]
  return gc.launch(
      entry, out_type=jax.ShapeDtypeStruct(q.shape, dtype), grid=(h, n_qt, b),
      grid_names=("heads", "q_seq", "batch"), compute_wgs=w, interpret=interpret,
  )(*args)


# ------------------------------------------------------------------------------------------------
# dK / dV
# ------------------------------------------------------------------------------------------------


def _dkv_call(q, k, v, do, lse2, delta, qseg, kvseg, glists, st: _Static, interpret):
  """Padded inputs as ``_dq_call``; ``glists`` from ``group_lists`` -> (dk, dv) like k."""
  interpreting = gc.interpreting(interpret)
  mma = _Mma(interpreting)
  b, lq, h, d = q.shape
  _, lk, hkv, _ = k.shape
  dtype = q.dtype
  w, ns, bq = st.compute_wgs, st.num_stages, STEP
  has_seg = st.has_seg
  rows_l = gc.rows_layout()
  cols_l = gc.cols_layout()

  def kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, head_ref, blk_ref, cls_ref,
             cnt_ref, qseg_ref, kvseg_ref, dk_ref, dv_ref, smem, bars):
    (k_smem, v_smem, kvseg_smem, q_smem, do_smem, lse_smem, delta_smem, qseg_smem,
     stage_smem) = smem
    row_bar, q_bar, do_bar, lse_bar, delta_bar, seg_bar, used = bars
    bi = lax.axis_index("batch")
    kvh = lax.axis_index("heads")
    kt = lax.axis_index("kv_seq")
    wg = lax.axis_index("wg")
    count = cnt_ref[kvh, kt]

    @pl.when(wg < w)
    def _compute():
      plgpu.set_max_registers(gc.compute_registers(w), action="increase")
      key0 = kt * st.block + wg * WG_ROWS
      keys = pl.ds(key0, WG_ROWS)
      ks, vs = k_smem.at[wg], v_smem.at[wg]
      nb = 3 if has_seg else 2
      plgpu.copy_gmem_to_smem(k_ref.at[bi, keys, kvh], ks, row_bar.at[nb * wg])
      plgpu.copy_gmem_to_smem(v_ref.at[bi, keys, kvh], vs, row_bar.at[nb * wg + 1])
      if has_seg:
        plgpu.copy_gmem_to_smem(kvseg_ref.at[bi, keys], kvseg_smem.at[wg], row_bar.at[nb * wg + 2])
      for n in range(nb):
        plgpu.barrier_wait(row_bar.at[nb * wg + n])
      kv_ids = plgpu.load(kvseg_smem.at[wg], layout=rows_l) if has_seg else None
      stage = stage_smem.at[wg] if stage_smem is not None else None
      shape = (WG_ROWS, bq)

      def step(t, carry):
        dk, dv = carry
        slot = gc.ring_slot(t, ns)
        i = blk_ref[kvh, kt, t]
        cls = cls_ref[kvh, kt, t]
        plgpu.barrier_wait(q_bar.at[slot])
        s, th = gc.scores(mma.fresh(shape, ks, q_smem.at[slot].transpose((1, 0))),
                          scale=st.scale, cap=st.cap)
        s = _masked(s, cls, st, lambda: (i * bq + gc.iota(shape, 1), key0 + gc.iota(shape, 0)))
        if has_seg:
          plgpu.barrier_wait(seg_bar.at[slot])
          q_ids = plgpu.load(qseg_smem.at[slot], layout=cols_l)
          s = gc.segment_mask(s, kv_ids, q_ids)
        plgpu.barrier_wait(lse_bar.at[slot])
        lse = plgpu.load(lse_smem.at[slot], layout=cols_l)
        p = jnp.exp2(s - lax.broadcast_in_dim(lse, shape, [1]))         # P^T [keys, queries]
        plgpu.barrier_wait(do_bar.at[slot])
        dv, dp = mma.accumulate_and_product(                            # dV, dP^T
            dv, p.astype(dtype), do_smem.at[slot], stage, shape, vs,
            do_smem.at[slot].transpose((1, 0)))
        plgpu.barrier_wait(delta_bar.at[slot])
        dlt = plgpu.load(delta_smem.at[slot], layout=cols_l)
        ds = p * (dp - lax.broadcast_in_dim(dlt, shape, [1]))
        if th is not None:
          ds = ds * (1.0 - th * th)
        dk = mma.accumulate(dk, ds.astype(dtype), q_smem.at[slot], stage)
        plgpu.barrier_arrive(used.at[slot])
        return dk, dv

      dk, dv = lax.fori_loop(0, count, step, (gc.zeros((WG_ROWS, d)), gc.zeros((WG_ROWS, d))))
      ks[...] = (dk * st.scale).astype(dtype)
      vs[...] = dv.astype(dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(ks, dk_ref.at[bi, keys, kvh])
      plgpu.copy_smem_to_gmem(vs, dv_ref.at[bi, keys, kvh])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == w)
    def _memory():
      plgpu.set_max_registers(40, action="decrease")

      @pl.loop(0, count)
      def _fetch(t):
        slot = gc.ring_slot(t, ns)
        hq = kvh * st.groups + head_ref[kvh, kt, t]
        rows = pl.ds(blk_ref[kvh, kt, t] * bq, bq)

        @pl.when(t >= ns)
        def _():
          plgpu.barrier_wait(used.at[slot])
          # lse / delta / segment ids were read through the generic proxy; order those reads
          # before the TMA (async proxy) overwrite.
          plgpu.commit_smem()

        plgpu.copy_gmem_to_smem(q_ref.at[bi, rows, hq], q_smem.at[slot], q_bar.at[slot])
        if has_seg:
          plgpu.copy_gmem_to_smem(qseg_ref.at[bi, rows], qseg_smem.at[slot], seg_bar.at[slot])
        plgpu.copy_gmem_to_smem(lse_ref.at[bi, hq, rows], lse_smem.at[slot], lse_bar.at[slot])
        plgpu.copy_gmem_to_smem(do_ref.at[bi, rows, hq], do_smem.at[slot], do_bar.at[slot])
        plgpu.copy_gmem_to_smem(delta_ref.at[bi, hq, rows], delta_smem.at[slot],
                                delta_bar.at[slot])

  def entry(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, head_ref, blk_ref, cls_ref,
            cnt_ref, *rest):
    if has_seg:
      qseg_ref, kvseg_ref, dk_ref, dv_ref = rest
    else:
      (dk_ref, dv_ref), qseg_ref, kvseg_ref = rest, None, None
    smem = (gc.tile_smem(dtype, w, WG_ROWS, d), gc.tile_smem(dtype, w, WG_ROWS, d),
            plgpu.SMEM((w, WG_ROWS), jnp.int32) if has_seg else None,
            gc.tile_smem(dtype, ns, bq, d), gc.tile_smem(dtype, ns, bq, d),
            plgpu.SMEM((ns, bq), jnp.float32), plgpu.SMEM((ns, bq), jnp.float32),
            plgpu.SMEM((ns, bq), jnp.int32) if has_seg else None,
            gc.tile_smem(dtype, w, WG_ROWS, bq) if interpreting else None)
    ring = lambda: plgpu.Barrier(num_barriers=ns)
    bars = (plgpu.Barrier(num_barriers=(3 if has_seg else 2) * w), ring(), ring(), ring(),
            ring(), ring() if has_seg else None, plgpu.Barrier(num_arrivals=w, num_barriers=ns))
    pl.run_scoped(
        lambda smem_refs, bar_refs: kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
                                           head_ref, blk_ref, cls_ref, cnt_ref, qseg_ref,
                                           kvseg_ref, dk_ref, dv_ref, smem_refs, bar_refs),
        smem, bars, collective_axes="wg")

  args = [q, k, v, do, lse2, delta, *(jnp.asarray(x) for x in glists)]
  if has_seg:
    args += [qseg, kvseg]
  return gc.launch(
      entry,
      out_type=(jax.ShapeDtypeStruct(k.shape, dtype), jax.ShapeDtypeStruct(k.shape, dtype)),
      grid=(hkv, lk // st.block, b), grid_names=("heads", "kv_seq", "batch"), compute_wgs=w,
      interpret=interpret,
  )(*args)


# ------------------------------------------------------------------------------------------------
# Entry
# ------------------------------------------------------------------------------------------------


def flash_attention_bwd_gpu(q, k, v, o, lse, do, *, segment_ids=None, causal: bool,
                            window: int | None, dense_mask=None,
                            logit_soft_cap: float | None = None, sm_scale: float | None = None,
                            block_sizes: BlockSizes, interpret=None,
                            layouts: tuple[layout_lib.KernelLayout, ...] | None = None):
  """Gradients of flash attention with the Mosaic GPU dQ and dK/dV kernels.

  Args:
    q, o, do: ``[batch, q_len, heads, head_dim]`` (bf16/f16; o the forward output, do its
      cotangent); k, v: ``[batch, kv_len, kv_heads, head_dim]``.
    lse: float32 ``[batch, heads, q_len]``, the forward's natural-log log-sum-exp (+inf on rows
      with no visible key).
    segment_ids: None or ``reference.SegmentIds``; causal, window, dense_mask, logit_soft_cap,
      sm_scale: as ``attention_reference``.
    block_sizes: ``bwd`` = (queries per dQ CTA, keys per dK/dV CTA), each 64 or 128;
      ``num_stages`` is the depth of both rings.
    interpret: None on a GPU; ``plgpu.InterpretGPUParams`` to run on CPU.
    layouts: ``backward_layouts(...)`` of these arguments if already built.

  Returns:
    ``(dq, dk, dv)`` shaped and typed like q, k, v. Raises ValueError when
    ``supported_backward`` gives a reason.
  """
  b, q_len, h, d = q.shape
  kv_len, hkv = k.shape[1], k.shape[2]
  if layouts is None:
    layouts = backward_layouts(q_len, kv_len, block_sizes, causal=causal, window=window,
                               dense_mask=dense_mask)
  reason = supported_backward(q, k, block_sizes=block_sizes, layouts=layouts)
  if reason is not None:
    raise ValueError(f"Mosaic GPU flash attention backward does not support {reason}")
  lay_q, lay_kv = layouts
  bq, bk = block_sizes.bwd
  st_kw = dict(causal=causal, window=window, cap=logit_soft_cap,
               scale=float(sm_scale) if sm_scale is not None else 1.0 / float(np.sqrt(d)),
               kv_len=kv_len, num_stages=block_sizes.num_stages, groups=h // hkv,
               has_seg=segment_ids is not None)
  st_q, st_kv = _static(st_kw, lay_q, bq, STEP), _static(st_kw, lay_kv, bk, bk)

  delta = jnp.einsum("bqhd,bqhd->bhq", o.astype(jnp.float32), do.astype(jnp.float32))
  qp, dop = gc.pad_to(q, 1, bq), gc.pad_to(do, 1, bq)
  kp, vp = gc.pad_to(k, 1, bk), gc.pad_to(v, 1, bk)
  lse2 = gc.pad_to(lse.astype(jnp.float32) * LOG2E, 2, bq, jnp.inf)   # padded rows: P = 0
  delta = gc.pad_to(delta, 2, bq)
  qs = kvs = None
  if segment_ids is not None:
    qs = gc.pad_to(segment_ids.q.astype(jnp.int32), 1, bq)
    kvs = gc.pad_to(segment_ids.kv.astype(jnp.int32), 1, bk)
  dq = _dq_call(qp, kp, vp, dop, lse2, delta, qs, kvs, lay_q.rows, st_q, interpret)
  glists = group_lists(lay_kv.cols, h, hkv, lay_kv.per_head)
  dk, dv = _dkv_call(qp, kp, vp, dop, lse2, delta, qs, kvs, glists, st_kv, interpret)
  return dq[:, :q_len], dk[:, :kv_len], dv[:, :kv_len]
