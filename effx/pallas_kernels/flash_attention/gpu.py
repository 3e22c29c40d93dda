"""Block-sparse flash attention forward for Hopper GPUs (Pallas Mosaic GPU, ``plgpu``).

One CTA computes ``block_q`` query rows of one (batch, head): ``block_q // 64`` compute
warpgroups of 64 rows each plus one memory warpgroup (warp specialisation). The memory
warpgroup streams the K/V tiles of the CTA's key-block list (``layout.BlockLists``, read from
global memory as int32 scalars) with TMA into a ``num_stages``-deep shared-memory ring; each
slot has a "loaded" barrier (TMA transaction count) and a "consumed" barrier (one arrival per
compute warpgroup). The compute warpgroups run the FlashAttention-2 recurrence with WGMMA
(S = Q K^T and O += P V, P kept in registers) in base 2 (scores pre-multiplied by log2 e),
apply the element mask only on partial tiles (``lax.cond`` on the tile class), and write O and
the natural-log log-sum-exp through shared memory with TMA.

Empty tiles are neither fetched nor computed (they are absent from the lists). Supported:
bf16/f16 inputs, head_dim a multiple of 64 up to 256, causal, sliding window, segment ids,
soft-cap, GQA/MQA, lengths that are not tile multiples (padded, keys masked) and dense
block-sparse masks whose partial tiles are only those that causal/window/padding already make
partial, i.e. block-aligned patterns. ``supported()`` says why a call is not; the entry point
then uses XLA.

Backward: ``flash_attention_gpu`` is a custom_vjp whose forward saves o and the lse; its
backward runs the Mosaic GPU dQ and dK/dV kernels of ``gpu_backward.py`` (FlashAttention-2
recomputation from the lse, O(len) memory, same masks/segments/soft-cap/GQA/block sparsity).
Where ``backward_reason()`` gives a reason (head_dim > 128, backward block sizes other than
64/128, a dense mask that is not block-aligned at the backward tilings) the gradient of that
call is the XLA reference's (``jax.vjp`` of ``attention_reference``, O(q_len * kv_len) memory
per head).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from effx.pallas_kernels import _gpu_common as gc
from effx.pallas_kernels._gpu_common import LOG2E, WG_ROWS
from effx.pallas_kernels.flash_attention import gpu_backward as bwd_lib
from effx.pallas_kernels.flash_attention import layout as layout_lib
from effx.pallas_kernels.flash_attention import reference as ref_lib
from effx.pallas_kernels.flash_attention.config import BlockSizes


@dataclasses.dataclass(frozen=True)
class _Static:
  causal: bool
  window: int | None
  cap: float | None
  scale: float
  kv_len: int
  block_q: int
  block_k: int
  num_stages: int
  groups: int
  per_head: bool
  has_seg: bool
  any_full: bool
  any_partial: bool

  @property
  def compute_wgs(self) -> int:
    return self.block_q // WG_ROWS


def supported(q, k, *, block_sizes: BlockSizes, layout: layout_lib.KernelLayout | None = None
              ) -> str | None:
  """None if the Mosaic GPU kernel handles this call, else the reason it does not."""
  reason = gc.unsupported_inputs(q, k)
  if reason is not None:
    return reason
  if block_sizes.block_q not in (64, 128):
    return f"block_q {block_sizes.block_q} (GPU kernel: 64 or 128)"
  if block_sizes.block_k % 64:
    return f"block_k {block_sizes.block_k} (GPU kernel: a multiple of 64)"
  if layout is not None and layout.has_dense_partial:
    return "dense_mask has partial tiles at the GPU tiling (only block-aligned masks)"
  return None


def _fwd_call(q, k, v, qseg, kvseg, lists: layout_lib.BlockLists, st: _Static, interpret,
              p_via_smem: bool | None = None):
  """q ``[B, Lq_p, H, D]``, k/v ``[B, Lk_p, Hkv, D]`` (padded) -> (o, lse ``[B, H, Lq_p]``).

  ``p_via_smem`` (default: only in interpret mode, whose WGMMA takes shared-memory operands
  only) routes P through shared memory instead of keeping it in registers.
  """
  interpreting = gc.interpreting(interpret)
  if p_via_smem is None:
    p_via_smem = interpreting
  b, lq, h, d = q.shape
  dtype = q.dtype
  w, bk, ns = st.compute_wgs, st.block_k, st.num_stages
  n_qt = lq // st.block_q
  has_seg = st.has_seg

  def kernel(q_ref, k_ref, v_ref, idx_ref, cnt_ref, cls_ref, qseg_ref, kvseg_ref, o_ref,
             lse_ref, smem, bars):
    qo_smem, k_smem, v_smem, lse_smem, qseg_smem, kvseg_smem, p_smem = smem
    q_bar, k_bar, v_bar, seg_bar, k_used, v_used = bars
    bi = lax.axis_index("batch")
    hi = lax.axis_index("heads")
    qt = lax.axis_index("q_seq")
    wg = lax.axis_index("wg")
    hm = hi if st.per_head else 0
    count = cnt_ref[hm, qt]

    @pl.when(wg < w)
    def _compute():
      plgpu.set_max_registers(gc.compute_registers(w), action="increase")
      row0 = qt * st.block_q + wg * WG_ROWS
      q_smem = qo_smem.at[wg]
      plgpu.copy_gmem_to_smem(q_ref.at[bi, pl.ds(row0, WG_ROWS), hi], q_smem, q_bar.at[wg])
      q_ids = None
      if has_seg:
        plgpu.copy_gmem_to_smem(qseg_ref.at[bi, pl.ds(row0, WG_ROWS)], qseg_smem.at[wg],
                                q_bar.at[w + wg])
        plgpu.barrier_wait(q_bar.at[w + wg])
        q_ids = plgpu.load(qseg_smem.at[wg], layout=gc.rows_layout())
      plgpu.barrier_wait(q_bar.at[wg])

      def step(t, carry):
        acc, m_i, l_i = carry
        slot = gc.ring_slot(t, ns)
        j = idx_ref[hm, qt, t]
        cls = cls_ref[hm, qt, t]
        plgpu.barrier_wait(k_bar.at[slot])
        kv_ids = None
        if has_seg:
          plgpu.barrier_wait(seg_bar.at[slot])
          kv_ids = plgpu.load(kvseg_smem.at[slot], layout=gc.cols_layout())
        s = gc.matmul(q_smem, k_smem.at[slot].transpose((1, 0)), (WG_ROWS, bk))
        plgpu.barrier_arrive(k_used.at[slot])
        if st.cap is not None:
          s = (st.cap * LOG2E) * jnp.tanh(s * (st.scale / st.cap))
        else:
          s = s * (st.scale * LOG2E)

        def element_mask(s):
          rows = row0 + gc.iota((WG_ROWS, bk), 0)
          cols = j * bk + gc.iota((WG_ROWS, bk), 1)
          return gc.element_mask(s, rows, cols, causal=st.causal, window=st.window,
                                 kv_len=st.kv_len if st.kv_len % bk else None)

        s = gc.on_partial_tiles(s, cls, layout_lib.FULL, element_mask, any_full=st.any_full,
                                any_partial=st.any_partial)
        if has_seg:
          s = gc.segment_mask(s, q_ids, kv_ids)
        return gc.softmax_pv_step(
            s, acc, m_i, l_i, dtype=dtype, v_tile=v_smem.at[slot], v_loaded=v_bar.at[slot],
            v_free=v_used.at[slot], p_buf=None if p_smem is None else p_smem.at[wg],
            interpreting=interpreting)

      acc, m_i, l_i = lax.fori_loop(0, count, step, gc.softmax_init(d))
      gc.softmax_finish(acc, m_i, l_i, dtype=dtype, o_smem=q_smem, lse_smem=lse_smem.at[wg],
                        o_dst=o_ref.at[bi, pl.ds(row0, WG_ROWS), hi],
                        lse_dst=lse_ref.at[bi, hi, pl.ds(row0, WG_ROWS)], empty_lse=jnp.inf)

    @pl.when(wg == w)
    def _memory():
      plgpu.set_max_registers(40, action="decrease")
      kvh = lax.div(hi, jnp.int32(st.groups))

      @pl.loop(0, count)
      def _fetch(t):
        slot = gc.ring_slot(t, ns)
        j = idx_ref[hm, qt, t]
        rows = pl.ds(j * bk, bk)
        gc.fetch_kv(t, ns, k_src=k_ref.at[bi, rows, kvh], k_dst=k_smem.at[slot],
                    k_loaded=k_bar.at[slot], k_free=k_used.at[slot],
                    v_src=v_ref.at[bi, rows, kvh], v_dst=v_smem.at[slot],
                    v_loaded=v_bar.at[slot], v_free=v_used.at[slot],
                    seg_src=kvseg_ref.at[bi, rows] if has_seg else None,
                    seg_dst=kvseg_smem.at[slot] if has_seg else None,
                    seg_loaded=seg_bar.at[slot] if has_seg else None)

  def entry(q_ref, k_ref, v_ref, idx_ref, cnt_ref, cls_ref, *rest):
    if has_seg:
      qseg_ref, kvseg_ref, o_ref, lse_ref = rest
    else:
      (o_ref, lse_ref), qseg_ref, kvseg_ref = rest, None, None
    tile = functools.partial(gc.tile_smem, dtype)
    smem = (tile(w, WG_ROWS, d), tile(ns, bk, d), tile(ns, bk, d),
            plgpu.SMEM((w, WG_ROWS), jnp.float32),
            plgpu.SMEM((w, WG_ROWS), jnp.int32) if has_seg else None,
            plgpu.SMEM((ns, bk), jnp.int32) if has_seg else None,
            tile(w, WG_ROWS, bk) if p_via_smem else None)
    bars = (plgpu.Barrier(num_barriers=2 * w), plgpu.Barrier(num_barriers=ns),
            plgpu.Barrier(num_barriers=ns), plgpu.Barrier(num_barriers=ns) if has_seg else None,
            plgpu.Barrier(num_arrivals=w, num_barriers=ns),
            plgpu.Barrier(num_arrivals=w, num_barriers=ns))
    pl.run_scoped(
        lambda smem_refs, bar_refs: kernel(q_ref, k_ref, v_ref, idx_ref, cnt_ref, cls_ref,
                                           qseg_ref, kvseg_ref, o_ref, lse_ref, smem_refs,
                                           bar_refs),
        smem, bars, collective_axes="wg")

  args = [q, k, v, jnp.asarray(lists.idx), jnp.asarray(lists.cnt), jnp.asarray(lists.cls)]
  if has_seg:
    args += [qseg, kvseg]
  o, lse = gc.launch(
      entry,
      out_type=(jax.ShapeDtypeStruct(q.shape, dtype),
                jax.ShapeDtypeStruct((b, h, lq), jnp.float32)),
      grid=(h, n_qt, b), grid_names=("heads", "q_seq", "batch"), compute_wgs=w,
      interpret=interpret,
  )(*args)
  return o, lse


def gpu_layout(q_len: int, kv_len: int, block_sizes: BlockSizes, *, causal, window, dense_mask,
               block_mask) -> layout_lib.KernelLayout:
  """The static layout at the GPU kernel's tiling (``block_q`` x ``block_k``)."""
  return layout_lib.make_layout(q_len, kv_len, block_sizes.block_q, block_sizes.block_k,
                                causal=causal, window=window, dense_mask=dense_mask,
                                block_mask=block_mask)


def backward_reason(q, k, *, block_sizes: BlockSizes, causal: bool, window: int | None,
                    dense_mask=None) -> str | None:
  """None if ``flash_attention_gpu``'s gradient runs the Mosaic GPU backward kernels, else why
  it is the XLA reference gradient (assumes the forward is ``supported``)."""
  layouts = bwd_lib.backward_layouts(q.shape[1], k.shape[1], block_sizes, causal=causal,
                                     window=window, dense_mask=dense_mask)
  return bwd_lib.supported_backward(q, k, block_sizes=block_sizes, layouts=layouts)


def flash_attention_gpu(q, k, v, *, segment_ids=None, causal: bool = True,
                        window: int | None = None, block_mask=None, dense_mask=None,
                        logit_soft_cap: float | None = None, sm_scale: float | None = None,
                        block_sizes: BlockSizes | None = None, interpret=None,
                        return_lse: bool = False, p_via_smem: bool | None = None):
  """Flash attention with the Mosaic GPU kernels (forward; backward: ``gpu_backward.py``).

  Args: as ``attention_reference`` plus ``block_sizes`` (GPU: block_q 64 or 128, block_k a
  multiple of 64, num_stages) and ``interpret`` (None on a GPU; ``plgpu.InterpretGPUParams``
  to run on CPU). Raises ValueError when ``supported`` reports a reason. ``p_via_smem``: route
  P through shared memory (default: only in interpret mode, see ``_fwd_call``).

  Returns:
    ``[batch, q_len, heads, head_dim]`` in q's dtype (and the float32 lse
    ``[batch, heads, q_len]`` if ``return_lse``; not differentiable then). The gradient
    (q, k, v) uses the Mosaic GPU backward kernels, or the XLA reference gradient where
    ``backward_reason`` gives a reason.
  """
  bs = block_sizes or BlockSizes()
  b, q_len, h, d = q.shape
  kv_len, hkv = k.shape[1], k.shape[2]
  lay = gpu_layout(q_len, kv_len, bs, causal=causal, window=window, dense_mask=dense_mask,
                   block_mask=block_mask)
  reason = supported(q, k, block_sizes=bs, layout=lay)
  if reason is not None:
    raise ValueError(f"Mosaic GPU flash attention does not support {reason}")
  if lay.per_head and lay.classes.shape[0] != h:
    raise ValueError(f"dense_mask has {lay.classes.shape[0]} heads; expected 1 or {h}")
  visited = lay.classes[lay.classes != layout_lib.EMPTY]
  st = _Static(causal=causal, window=window, cap=logit_soft_cap,
               scale=float(sm_scale) if sm_scale is not None else 1.0 / float(np.sqrt(d)),
               kv_len=kv_len, block_q=bs.block_q, block_k=bs.block_k, num_stages=bs.num_stages,
               groups=h // hkv, per_head=lay.per_head, has_seg=segment_ids is not None,
               any_full=bool((visited == layout_lib.FULL).any()),
               any_partial=bool((visited == layout_lib.PARTIAL).any()))
  seg = ref_lib.as_segment_ids(segment_ids, q_len, kv_len)

  def fwd(q, k, v, seg):
    qp = gc.pad_to(q, 1, bs.block_q)
    kp, vp = gc.pad_to(k, 1, bs.block_k), gc.pad_to(v, 1, bs.block_k)
    qs = kvs = None
    if seg is not None:
      qs, kvs = gc.pad_to(seg.q, 1, bs.block_q), gc.pad_to(seg.kv, 1, bs.block_k)
    o, lse = _fwd_call(qp, kp, vp, qs, kvs, lay.rows, st, interpret, p_via_smem)
    return o[:, :q_len], lse[:, :, :q_len]

  if return_lse:
    return fwd(q, k, v, seg)

  kw = dict(causal=causal, window=window, dense_mask=dense_mask,
            logit_soft_cap=logit_soft_cap, sm_scale=sm_scale)

  @jax.custom_vjp
  def attn(q, k, v, seg):
    return fwd(q, k, v, seg)[0]

  def attn_fwd(q, k, v, seg):
    o, lse = fwd(q, k, v, seg)
    return o, (q, k, v, seg, o, lse)

  def attn_bwd(res, do):
    q, k, v, seg, o, lse = res
    # Static (numpy) layouts, built only when a gradient is traced.
    layouts = bwd_lib.backward_layouts(q_len, kv_len, bs, causal=causal, window=window,
                                       dense_mask=dense_mask)
    if bwd_lib.supported_backward(q, k, block_sizes=bs, layouts=layouts) is None:
      grads = bwd_lib.flash_attention_bwd_gpu(
          q, k, v, o, lse, do, segment_ids=seg, block_sizes=bs, interpret=interpret,
          layouts=layouts, **kw)
      return (*grads, None)
    _, vjp = jax.vjp(
        lambda q, k, v: ref_lib.attention_reference(q, k, v, segment_ids=seg, **kw), q, k, v)
    return (*vjp(do), None)

  attn.defvjp(attn_fwd, attn_bwd)
  return attn(q, k, v, seg)
