"""Small pieces shared by the Mosaic GPU (Hopper, ``plgpu``) attention kernels.

The kernels are warp-specialised: ``w`` compute warpgroups of ``WG_ROWS`` rows each plus one
memory warpgroup (``wg == w``) that streams tiles with TMA into a ``num_stages``-deep
shared-memory ring. Scores are kept in base 2 (pre-multiplied by log2 e) and every float
array in registers is float32 in the WGMMA layout. The helpers here are trace-time functions
called inside ``plgpu.kernel`` bodies (or on their inputs); they add no logic of their own.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

WG_ROWS = 64     # rows of one compute warpgroup (the WGMMA M dimension)
LOG2E = math.log2(math.e)
LN2 = math.log(2.0)


# ------------------------------------------------------------------------------------------------
# Outside the kernels
# ------------------------------------------------------------------------------------------------


def unsupported_inputs(q, k) -> str | None:
  """None if q ``[..., head_dim]`` and k have a dtype (bf16/f16, equal) and head_dim (a multiple
  of 64, <= 256) that the forward kernels take, else the reason."""
  d = q.shape[-1]
  if jnp.dtype(q.dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return f"dtype {q.dtype} (the Mosaic GPU kernel takes bf16/f16)"
  if q.dtype != k.dtype:
    return f"q dtype {q.dtype} != k dtype {k.dtype}"
  if d % 64 or d > 256:
    return f"head_dim {d} (must be a multiple of 64, <= 256)"
  return None


def interpreting(interpret) -> bool:
  """Whether the kernel runs interpreted: explicitly, or off a GPU (where it can only run under
  ``plgpu.force_gpu_interpret_mode``)."""
  return bool(interpret) or jax.default_backend() != "gpu"


def pad_to(x: jax.Array, axis: int, multiple: int, value=0) -> jax.Array:
  """x padded with ``value`` at the end of ``axis`` up to a multiple of ``multiple``."""
  extra = -x.shape[axis] % multiple
  if not extra:
    return x
  pads = [(0, 0)] * x.ndim
  pads[axis] = (0, extra)
  return jnp.pad(x, pads, constant_values=value)


def pad_time(x: jax.Array, length: int) -> jax.Array:
  """x ``[batch, T, ...]`` zero-padded along T to ``length``."""
  extra = length - x.shape[1]
  if not extra:
    return x
  return jnp.pad(x, [(0, 0), (0, extra)] + [(0, 0)] * (x.ndim - 2))


def launch(entry, *, out_type, grid, grid_names, compute_wgs: int, interpret):
  """``plgpu.kernel`` of a warp-specialised kernel: ``compute_wgs`` compute warpgroups plus one
  memory warpgroup, thread axis ``"wg"``, approximate math."""
  return plgpu.kernel(
      entry,
      out_type=out_type,
      grid=grid,
      grid_names=grid_names,
      num_threads=compute_wgs + 1,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
      interpret=interpret,
  )


# ------------------------------------------------------------------------------------------------
# Inside the kernels
# ------------------------------------------------------------------------------------------------


def tile_smem(dtype, *shape):
  """A shared-memory tile in the WGMMA operand layout (8 x 64 tiles, 128-byte swizzle)."""
  return plgpu.SMEM(shape, dtype,
                    transforms=(plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128)))


def rows_layout():
  """Layout of one value per row of a WGMMA-layout tile."""
  return plgpu.Layout.WGMMA.reduce(1)


def cols_layout():
  """Layout of one value per column of a WGMMA-layout tile."""
  return plgpu.Layout.WGMMA.reduce(0)


def zeros(shape) -> jax.Array:
  """float32 zeros of ``shape`` in the WGMMA layout."""
  return plgpu.layout_cast(jnp.full(shape, 0.0, jnp.float32), plgpu.Layout.WGMMA)


def iota(shape, dim: int) -> jax.Array:
  """int32 indices along ``dim`` of a WGMMA-layout tile of ``shape``."""
  return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)


def compute_registers(compute_wgs: int) -> int:
  """Registers per thread of a compute warpgroup (the memory warpgroup keeps 40)."""
  return 232 if compute_wgs == 2 else 240


def ring_slot(t, num_stages: int):
  """The ring slot of step ``t`` (int32)."""
  return lax.rem(t, jnp.int32(num_stages))


def matmul(a, b, shape) -> jax.Array:
  """A fresh float32 WGMMA product ``a @ b`` of ``shape`` (a, b: shared-memory refs; a may be a
  register array on hardware)."""
  def body(acc_ref):
    plgpu.wgmma(acc_ref, a, b)
    return acc_ref[...]
  return pl.run_scoped(body, plgpu.ACC(shape, jnp.float32))


def accumulate(acc, a, b, interpreting: bool) -> jax.Array:
  """``acc + a @ b``; in place on hardware, a fresh product plus an add in interpret mode (which
  cannot run ``pl.run_state``)."""
  if interpreting:
    return acc + matmul(a, b, acc.shape)

  def body(acc_ref):
    plgpu.wgmma(acc_ref, a, b)
  return pl.run_state(body)(plgpu.ACC.init(acc))


def lhs(x, buf):
  """A WGMMA left operand: the array ``x`` in registers (``buf`` None, hardware), else ``x``
  stored to the shared tile ``buf`` (interpret mode's WGMMA takes shared-memory operands only)."""
  if buf is None:
    return x
  buf[...] = x
  plgpu.commit_smem()
  return buf


def scores(raw, *, scale: float, cap: float | None):
  """Raw ``q . k`` -> (base-2 scores ``log2(e) * score``, tanh of the soft-cap or None)."""
  if cap is None:
    return raw * (scale * LOG2E), None
  th = jnp.tanh(raw * (scale / cap))
  return th * (cap * LOG2E), th


def element_mask(s, q_pos, k_pos, *, causal: bool, window: int | None, kv_len: int | None):
  """s with -inf where a causal / window / key-padding mask hides the score; q_pos, k_pos:
  int32 positions shaped like s; ``kv_len`` None: no padded keys in the tile grid."""
  mask = None
  if kv_len is not None:
    mask = k_pos < kv_len
  if causal:
    c = k_pos <= q_pos
    mask = c if mask is None else jnp.logical_and(mask, c)
  if window is not None:
    c = (q_pos - k_pos) < window
    mask = c if mask is None else jnp.logical_and(mask, c)
  return s if mask is None else jnp.where(mask, s, -jnp.inf)


def on_partial_tiles(s, cls, full_class: int, apply, *, any_full: bool, any_partial: bool):
  """``apply(s)`` unless the tile class ``cls`` is ``full_class`` (a ``lax.cond`` only when the
  static layout has both kinds of visited tiles)."""
  if any_partial and any_full:
    return lax.cond(cls == full_class, lambda x: x, apply, s)
  if any_partial:
    return apply(s)
  return s


def segment_mask(s, row_ids, col_ids):
  """s with -inf where the row's and the column's segment ids differ (ids: int32 vectors in
  ``rows_layout`` / ``cols_layout``)."""
  same = (lax.broadcast_in_dim(row_ids, s.shape, [0])
          == lax.broadcast_in_dim(col_ids, s.shape, [1]))
  return jnp.where(same, s, -jnp.inf)


def softmax_init(d: int):
  """(acc ``[WG_ROWS, d]``, running max m, running sum l) of the online softmax, float32."""
  m0 = plgpu.layout_cast(jnp.full((WG_ROWS,), -jnp.inf, jnp.float32), rows_layout())
  l0 = plgpu.layout_cast(jnp.full((WG_ROWS,), 0.0, jnp.float32), rows_layout())
  acc0 = plgpu.layout_cast(jnp.full((WG_ROWS, d), 0.0, jnp.float32), plgpu.Layout.WGMMA)
  return acc0, m0, l0


def softmax_pv_step(s, acc, m_i, l_i, *, dtype, v_tile, v_loaded, v_free, p_buf,
                    interpreting: bool):
  """One online-softmax step (base 2) on the masked scores ``s [WG_ROWS, bk]``: waits for the
  V tile (``v_loaded`` barrier), ``acc = acc * alpha + P V`` with P cast to ``dtype`` (V's;
  through the shared tile ``p_buf`` in interpret mode, else None), arrives on ``v_free``.

  Returns (acc, m, l).
  """
  m_new = jnp.maximum(m_i, s.max(axis=1))
  m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
  alpha = jnp.exp2(m_i - m_use)
  p = jnp.exp2(s - lax.broadcast_in_dim(m_use, s.shape, [0]))
  l_i = l_i * alpha + p.sum(axis=1)
  p_operand = lhs(p.astype(dtype), p_buf)
  plgpu.barrier_wait(v_loaded)
  acc = accumulate(acc * lax.broadcast_in_dim(alpha, acc.shape, [0]), p_operand, v_tile,
                   interpreting)
  plgpu.barrier_arrive(v_free)
  return acc, m_new, l_i


def softmax_finish(acc, m_i, l_i, *, dtype, o_smem, lse_smem, o_dst, lse_dst,
                   empty_lse: float):
  """Writes O = acc / l (in ``dtype``; 0 on rows that saw nothing) and the natural-log lse
  (``empty_lse`` on those rows) through shared memory with TMA, and waits for the stores."""
  empty = l_i == 0.0
  l_safe = jnp.where(empty, 1.0, l_i)
  inv = jnp.where(empty, 0.0, 1.0 / l_safe)
  o_smem[...] = (acc * lax.broadcast_in_dim(inv, acc.shape, [0])).astype(dtype)
  lse_smem[...] = jnp.where(empty, empty_lse, m_i * LN2 + jnp.log(l_safe))
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(o_smem, o_dst)
  plgpu.copy_smem_to_gmem(lse_smem, lse_dst)
  plgpu.wait_smem_to_gmem(0)


def fetch_kv(t, num_stages: int, *, k_src, k_dst, k_loaded, k_free, v_src, v_dst, v_loaded,
             v_free, seg_src=None, seg_dst=None, seg_loaded=None):
  """The memory warpgroup's step ``t``: once the ring has wrapped, waits for the slot's K (then
  V) to be consumed, then TMA-copies K, the keys' segment ids (if ``seg_src``) and V into it."""
  @pl.when(t >= num_stages)
  def _():
    plgpu.barrier_wait(k_free)
    if seg_src is not None:
      # The slot's segment ids were read through the generic proxy; order those reads before
      # the TMA (async proxy) overwrite.
      plgpu.commit_smem()

  plgpu.copy_gmem_to_smem(k_src, k_dst, k_loaded)
  if seg_src is not None:
    plgpu.copy_gmem_to_smem(seg_src, seg_dst, seg_loaded)

  @pl.when(t >= num_stages)
  def _():
    plgpu.barrier_wait(v_free)

  plgpu.copy_gmem_to_smem(v_src, v_dst, v_loaded)
