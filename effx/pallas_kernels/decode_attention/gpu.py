"""Split-K decode attention for Hopper GPUs (Pallas Mosaic GPU, ``plgpu``), forward only.

Grid ``(row tiles, kv_heads, batch * splits)``; a CTA computes one KV split for ``64 * w`` query
rows of one KV head (rows = T new tokens x the KV head's query heads, ``reference`` order,
``w`` = 1 or 2 compute warpgroups of 64 rows) plus one memory warpgroup (warp specialisation,
as ``flash_attention/gpu.py``). The memory warpgroup streams the split's K/V tiles with TMA
straight out of the cache layout ``[batch, max_len, kv_heads, head_dim]`` into a
``num_stages``-deep shared-memory ring; the compute warpgroups run the online softmax (base 2)
with WGMMA (S = Q K^T, O += P V).

The row's cache length is read from global memory as a scalar: the split's loop runs over its
blocks up to the last visible one only (``(length + T - 1) // block_k``), so splits past the
length fetch and compute nothing. Blocks entirely below the length skip the element mask
(``lax.cond``); the others build it from the slot index, the length and the query rows'
new-token words (``reference.new_token_bits``, copied to shared memory once per CTA).

Each CTA writes its split's normalised output (input dtype) and float32 log-sum-exp (-inf if
it saw nothing); ``reference.combine_splits`` (XLA) merges them. Supported: bf16/f16, head_dim
a multiple of 64 up to 256, block_k a multiple of 64, T <= 64. A max_len that is not a multiple
of block_k is zero-padded (one copy of the cache per call: pick block_k dividing max_len).
Slots past the new tokens must hold finite values (KVCache starts zeroed), since P = 0 there
multiplies V in the WGMMA.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from effx.pallas_kernels import _gpu_common as gc
from effx.pallas_kernels._gpu_common import LOG2E, WG_ROWS
from effx.pallas_kernels.decode_attention import reference as ref_lib
from effx.pallas_kernels.decode_attention import tpu as tpu_lib
from effx.pallas_kernels.decode_attention.config import BlockSizes


@dataclasses.dataclass(frozen=True)
class _Static:
  t: int
  block_k: int
  num_blocks: int
  steps: int
  splits: int
  num_stages: int
  compute_wgs: int
  scale: float
  cap: float | None


def supported(q, k, *, block_sizes: BlockSizes) -> str | None:
  """None if the Mosaic GPU kernel handles this call, else the reason it does not."""
  reason = gc.unsupported_inputs(q, k)
  if reason is not None:
    return reason
  if block_sizes.block_k % 64:
    return f"block_k {block_sizes.block_k} (GPU kernel: a multiple of 64)"
  if q.shape[1] > ref_lib.MAX_NEW_TOKENS:
    return f"T={q.shape[1]} new tokens (at most {ref_lib.MAX_NEW_TOKENS})"
  return None


def _call(qr, k, v, lengths, words, st: _Static, interpret, p_via_smem: bool | None):
  """qr ``[b, hkv, rows_p, d]``, k/v ``[b, L_p, hkv, d]``, words int32 ``[b, 2, rows_p]`` ->
  (o ``[b, hkv, splits, rows_p, d]`` normalised per split, lse ``[b, hkv, splits, rows_p]``)."""
  interpreting = gc.interpreting(interpret)
  if p_via_smem is None:
    p_via_smem = interpreting
  b, hkv, rows_p, d = qr.shape
  dtype = qr.dtype
  w, bk, ns = st.compute_wgs, st.block_k, st.num_stages
  block_rows = w * WG_ROWS

  def kernel(q_ref, k_ref, v_ref, len_ref, w_ref, o_ref, lse_ref, smem, bars):
    qo_smem, k_smem, v_smem, lse_smem, w_smem, p_smem = smem
    q_bar, k_bar, v_bar, k_used, v_used = bars
    rt = lax.axis_index("rows")
    kvh = lax.axis_index("heads")
    bsp = lax.axis_index("batch_split")
    bi = lax.div(bsp, jnp.int32(st.splits))
    sp = lax.rem(bsp, jnp.int32(st.splits))
    wg = lax.axis_index("wg")
    start = len_ref[bi]
    last = jnp.minimum((start + st.t - 1) // bk, st.num_blocks - 1)
    first = sp * st.steps
    count = jnp.clip(last + 1 - first, 0, st.steps)

    @pl.when(wg < w)
    def _compute():
      plgpu.set_max_registers(gc.compute_registers(w), action="increase")
      row0 = rt * block_rows + wg * WG_ROWS
      q_smem = qo_smem.at[wg]
      plgpu.copy_gmem_to_smem(q_ref.at[bi, kvh, pl.ds(row0, WG_ROWS)], q_smem, q_bar.at[wg])
      plgpu.copy_gmem_to_smem(w_ref.at[bi, :, pl.ds(row0, WG_ROWS)], w_smem.at[wg],
                              q_bar.at[w + wg])
      plgpu.barrier_wait(q_bar.at[w + wg])
      w0 = plgpu.load(w_smem.at[wg, 0], layout=gc.rows_layout())
      w1 = plgpu.load(w_smem.at[wg, 1], layout=gc.rows_layout())
      plgpu.barrier_wait(q_bar.at[wg])

      def step(t, carry):
        acc, m_i, l_i = carry
        slot = gc.ring_slot(t, ns)
        j = first + t
        plgpu.barrier_wait(k_bar.at[slot])
        s = gc.matmul(q_smem, k_smem.at[slot].transpose((1, 0)), (WG_ROWS, bk))
        plgpu.barrier_arrive(k_used.at[slot])
        if st.cap is not None:
          s = (st.cap * LOG2E) * jnp.tanh(s * (st.scale / st.cap))
        else:
          s = s * (st.scale * LOG2E)

        def element_mask(s):
          cols = j * bk + gc.iota((WG_ROWS, bk), 1)
          off = cols - start
          offc = jnp.clip(off, 0, 63)
          word = jnp.where(offc < 32, lax.broadcast_in_dim(w0, (WG_ROWS, bk), [0]),
                           lax.broadcast_in_dim(w1, (WG_ROWS, bk), [0]))
          bit = lax.shift_right_logical(word, jnp.bitwise_and(offc, 31))
          new = (off >= 0) & (off < st.t) & (jnp.bitwise_and(bit, 1) != 0)
          return jnp.where((cols < start) | new, s, -jnp.inf)

        s = lax.cond((j + 1) * bk <= start, lambda x: x, element_mask, s)
        return gc.softmax_pv_step(
            s, acc, m_i, l_i, dtype=dtype, v_tile=v_smem.at[slot], v_loaded=v_bar.at[slot],
            v_free=v_used.at[slot], p_buf=None if p_smem is None else p_smem.at[wg],
            interpreting=interpreting)

      acc, m_i, l_i = lax.fori_loop(0, count, step, gc.softmax_init(d))
      gc.softmax_finish(acc, m_i, l_i, dtype=dtype, o_smem=q_smem, lse_smem=lse_smem.at[wg],
                        o_dst=o_ref.at[bi, kvh, sp, pl.ds(row0, WG_ROWS)],
                        lse_dst=lse_ref.at[bi, kvh, sp, pl.ds(row0, WG_ROWS)],
                        empty_lse=-jnp.inf)

    @pl.when(wg == w)
    def _memory():
      plgpu.set_max_registers(40, action="decrease")

      @pl.loop(0, count)
      def _fetch(t):
        slot = gc.ring_slot(t, ns)
        rows = pl.ds((first + t) * bk, bk)
        gc.fetch_kv(t, ns, k_src=k_ref.at[bi, rows, kvh], k_dst=k_smem.at[slot],
                    k_loaded=k_bar.at[slot], k_free=k_used.at[slot],
                    v_src=v_ref.at[bi, rows, kvh], v_dst=v_smem.at[slot],
                    v_loaded=v_bar.at[slot], v_free=v_used.at[slot])

  def entry(q_ref, k_ref, v_ref, len_ref, w_ref, o_ref, lse_ref):
    tile = functools.partial(gc.tile_smem, dtype)
    smem = (tile(w, WG_ROWS, d), tile(ns, bk, d), tile(ns, bk, d),
            plgpu.SMEM((w, WG_ROWS), jnp.float32), plgpu.SMEM((w, 2, WG_ROWS), jnp.int32),
            tile(w, WG_ROWS, bk) if p_via_smem else None)
    bars = (plgpu.Barrier(num_barriers=2 * w), plgpu.Barrier(num_barriers=ns),
            plgpu.Barrier(num_barriers=ns),
            plgpu.Barrier(num_arrivals=w, num_barriers=ns),
            plgpu.Barrier(num_arrivals=w, num_barriers=ns))
    pl.run_scoped(
        lambda smem_refs, bar_refs: kernel(q_ref, k_ref, v_ref, len_ref, w_ref, o_ref, lse_ref,
                                           smem_refs, bar_refs),
        smem, bars, collective_axes="wg")

  return gc.launch(
      entry,
      out_type=(jax.ShapeDtypeStruct((b, hkv, st.splits, rows_p, d), dtype),
                jax.ShapeDtypeStruct((b, hkv, st.splits, rows_p), jnp.float32)),
      grid=(rows_p // block_rows, hkv, b * st.splits),
      grid_names=("rows", "heads", "batch_split"), compute_wgs=w, interpret=interpret,
  )(qr, k, v, lengths, words)


def decode_attention_gpu(q, k, v, lengths, new_token_mask=None, *,
                         sm_scale: float | None = None, logit_soft_cap: float | None = None,
                         block_sizes: BlockSizes | None = None, interpret=None,
                         return_lse: bool = False, p_via_smem: bool | None = None):
  """Decode attention with the Mosaic GPU kernel (semantics: ``reference.py``), forward only.

  Args: as ``tpu.decode_attention_tpu``; ``interpret``: None on a GPU,
  ``plgpu.InterpretGPUParams(...)`` to run on CPU; ``p_via_smem``: route P through shared
  memory (default: only in interpret mode, whose WGMMA takes shared-memory operands only).
  Raises ValueError when ``supported`` reports a reason.
  """
  ref_lib.check_inputs(q, k, v, lengths, new_token_mask)
  bs = block_sizes or BlockSizes()
  reason = supported(q, k, block_sizes=bs)
  if reason is not None:
    raise ValueError(f"Mosaic GPU decode attention does not support {reason}")
  b, t, h, d = q.shape
  kv_len, hkv = k.shape[1], k.shape[2]
  g = h // hkv
  if new_token_mask is None:
    new_token_mask = ref_lib.default_new_token_mask(b, t)
  tst, splits = tpu_lib.plan(t, kv_len, bs, parallel_units=b * hkv, head_dim=d,
                             sm_scale=sm_scale, logit_soft_cap=logit_soft_cap)
  w = 1 if t * g <= WG_ROWS else 2
  rows_p = -(-(t * g) // (w * WG_ROWS)) * (w * WG_ROWS)
  st = _Static(t=t, block_k=bs.block_k, num_blocks=tst.num_blocks, steps=tst.steps,
               splits=splits, num_stages=bs.num_stages, compute_wgs=w, scale=tst.scale,
               cap=logit_soft_cap)
  pad = tst.num_blocks * bs.block_k - kv_len
  if pad:
    k = jnp.pad(k, ((0, 0), (0, pad), (0, 0), (0, 0)))
    v = jnp.pad(v, ((0, 0), (0, pad), (0, 0), (0, 0)))
  qr = tpu_lib.fold_queries(q, hkv, rows_p)
  words = jnp.swapaxes(tpu_lib.row_bits(new_token_mask.astype(bool), g, rows_p), 1, 2)
  o_s, lse_s = _call(qr, k, v.astype(q.dtype), jnp.asarray(lengths, jnp.int32), words, st,
                     interpret, p_via_smem)
  o, lse = ref_lib.combine_splits(o_s.astype(jnp.float32), lse_s,
                                  (lse_s > -jnp.inf).astype(jnp.float32))
  o = tpu_lib.unfold_rows(o, t, h).astype(q.dtype)
  if not return_lse:
    return o
  return o, tpu_lib.unfold_rows(lse, t, h)
