"""Grouped matmul for Hopper GPUs (Pallas Mosaic GPU, ``plgpu``): forward and both gradients.

Shapes: lhs ``[M, K]`` (rows sorted by group), rhs ``[G, K, N]``, group_sizes int32 ``[G]``
(``sum <= M``), out ``[M, N]``; 16-bit inputs (bf16/f16), float32 accumulation.

``gmm`` (forward, and the lhs gradient ``dout @ rhs[g]^T`` with ``transpose_rhs``): one CTA
per (output column tile, row tile), a single warpgroup. The schedule (``make_schedule``, built
by XLA from group_sizes and read by the kernel as int32 scalars from global memory) gives each
row tile the first and last group whose rows it holds. The CTA visits those groups in order;
per group, a TMA -> shared memory ring (``plgpu.emit_pipeline``, ``num_stages`` deep, one
WGMMA in flight) runs ``lhs_tile @ rhs[g]`` over the contraction with a float32 WGMMA
accumulator, and the rows of that group are selected into a shared-memory output tile that
starts as zeros (a tile that one group owns entirely is stored as is). The tile is written
once with TMA, so a tile spanning several groups costs one full pass per group but no two CTAs
ever write the same rows; tiles past ``sum(group_sizes)`` visit no group and are written as
zeros. The last row tile may extend past M: TMA zero-fills
those rows on load and drops them on store.

``tgmm`` (weight gradient ``out[g] = lhs_g^T @ dout_g``): one CTA per (N tile, K tile, group),
contracting over the group's rows in steps of ``block_k`` rows that start at the group's first
row rounded down to a multiple of 8 (TMA tiles global arrays in 8-row tiles, so a window must
start on one; ``pl.multiple_of`` tells the layout inference), so only the first step can hold
rows of the previous group and only the last rows of the next group (or rows past M, which TMA
zero-fills); those steps' foreign rows are zeroed in shared memory (a select, so non-finite
values in other groups cannot leak) before their WGMMA. Empty groups get zeros.

The kernels take M a multiple of 8 (same tiling); ``grouped_matmul_gpu`` zero-pads M to one
and slices the result.

Limits (``supported``): bf16/f16, K and N multiples of 64; M arbitrary. GPU interpret mode
(``plgpu.InterpretGPUParams``) runs the same kernels on CPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from effx.pallas_kernels.grouped_matmul.config import BlockSizes

SWIZZLE_BYTES = 128
ROW_ALIGN = 8   # rows of the (8, 128 bytes) TMA tiling: row starts and M are multiples
DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def supported(lhs, rhs, *, block_sizes: BlockSizes) -> str | None:
  """None if the Mosaic GPU kernels handle this call, else the reason they do not."""
  dtype = jnp.promote_types(lhs.dtype, rhs.dtype)
  if dtype not in DTYPES:
    return f"dtype {dtype} (the Mosaic GPU kernel takes bf16/f16 inputs)"
  k, n = rhs.shape[1], rhs.shape[2]
  if k % 64 or n % 64:
    return f"K={k}, N={n} (the Mosaic GPU kernel needs multiples of 64)"
  if block_sizes.block_m % 64:
    return f"block_m {block_sizes.block_m} (GPU kernel: a multiple of 64)"
  if block_sizes.block_k % 64:
    return f"block_k {block_sizes.block_k} (GPU kernel: a multiple of 64)"
  if block_sizes.block_n % 64:
    return f"block_n {block_sizes.block_n} (GPU kernel: a multiple of 64)"
  return None


def make_schedule(group_sizes: jax.Array, m: int, tm: int):
  """Row tile -> groups, by XLA (traceable).

  Returns (offsets [G + 1], first [T], last [T]) int32 with T = cdiv(m, tm): tile t holds rows
  of the groups first[t]..last[t] (empty groups in between hold none); ``last < first`` for a
  tile entirely past ``sum(group_sizes)``. first[t] is never an empty group.
  """
  ends = jnp.cumsum(group_sizes.astype(jnp.int32))
  offsets = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends])
  tile_start = jnp.arange(-(-m // tm), dtype=jnp.int32) * tm
  tile_last_row = jnp.minimum(tile_start + tm, ends[-1]) - 1
  first = jnp.searchsorted(ends, tile_start, side="right").astype(jnp.int32)
  last = jnp.searchsorted(ends, tile_last_row, side="right").astype(jnp.int32)
  last = jnp.where(tile_start < ends[-1], last, first - 1)
  return offsets, first, last


def _transforms(dtype) -> tuple:
  elems = SWIZZLE_BYTES // jnp.dtype(dtype).itemsize
  return plgpu.TilingTransform((8, elems)), plgpu.SwizzleTransform(SWIZZLE_BYTES)


def _check_rows(m: int, tile: int) -> None:
  if m % ROW_ALIGN or m < tile:
    raise ValueError(f"lhs rows M={m}: the kernels need a multiple of {ROW_ALIGN} and at "
                     f"least one {tile}-row window (grouped_matmul_gpu pads M)")


def _fit(dim: int, tile: int) -> int:
  """``tile`` if it divides ``dim``, else 64 (``supported`` requires dim % 64 == 0)."""
  return tile if dim % tile == 0 else 64


def _mma_body(acc_ref, wait: int, a_transpose: bool = False, b_transpose: bool = False):
  """Pipeline body: one WGMMA on the slot's tiles, at most ``wait`` left in flight."""

  def body(_, a_smem, b_smem):
    plgpu.wgmma(acc_ref, a_smem.transpose((1, 0)) if a_transpose else a_smem,
                b_smem.transpose((1, 0)) if b_transpose else b_smem)
    plgpu.wgmma_wait(wait)

  return body


def gmm(lhs, rhs, schedule, *, block_sizes: BlockSizes, out_dtype=None,
        transpose_rhs: bool = False, interpret=None) -> jax.Array:
  """``out[r] = lhs[r] @ rhs[g]`` (``rhs[g]^T`` if transpose_rhs) for the rows r of group g.

  Args:
    lhs: ``[M, C]`` bf16/f16, M a multiple of ``ROW_ALIGN`` and >= block_m; rhs ``[G, C, O]``
      (``[G, O, C]`` if transpose_rhs), same dtype.
    schedule: ``make_schedule(group_sizes, M, block_sizes.block_m)``.
    block_sizes: block_m rows, block_k contraction step, block_n output columns (each 64
      where it does not divide its dimension); num_stages pipeline depth.
    out_dtype: default lhs.dtype.
    interpret: None on a GPU; ``plgpu.InterpretGPUParams`` to run on CPU.

  Returns:
    ``[M, O]``; rows past ``sum(group_sizes)`` are 0.
  """
  m, c = lhs.shape
  _check_rows(m, block_sizes.block_m)
  o = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  out_dtype = jnp.dtype(out_dtype or lhs.dtype)
  tm, tc, to = block_sizes.block_m, _fit(c, block_sizes.block_k), _fit(o, block_sizes.block_n)
  steps = c // tc
  stages = max(1, min(block_sizes.num_stages, steps))
  delay = 1 if stages > 1 else 0
  in_tr, out_tr = _transforms(lhs.dtype), _transforms(out_dtype)
  offsets, first, last = schedule
  num_groups = rhs.shape[0]

  def kernel(offsets_ref, first_ref, last_ref, lhs_ref, rhs_ref, out_ref, o_smem):
    ot, mt = lax.axis_index("o"), lax.axis_index("m")
    lo, hi = first_ref[mt], last_ref[mt]
    # The common case: one group owns every row of the tile (no zeros, no merge).
    g0 = jnp.minimum(lo, num_groups - 1)
    whole = (lo == hi) & (offsets_ref[g0] <= mt * tm) & (offsets_ref[g0 + 1] >= (mt + 1) * tm)

    @pl.when(jnp.logical_not(whole))
    def _():
      o_smem[...] = plgpu.layout_cast(jnp.zeros((tm, to), out_dtype), plgpu.Layout.WGMMA)

    rows = mt * tm + plgpu.broadcasted_iota(jnp.int32, (tm, to), 0, layout=plgpu.Layout.WGMMA)
    if transpose_rhs:
      rhs_spec = plgpu.BlockSpec((to, tc), lambda kk: (ot, kk), transforms=in_tr,
                                 delay_release=delay)
    else:
      rhs_spec = plgpu.BlockSpec((tc, to), lambda kk: (kk, ot), transforms=in_tr,
                                 delay_release=delay)
    lhs_spec = plgpu.BlockSpec((tm, tc), lambda kk: (mt, kk), transforms=in_tr,
                               delay_release=delay)

    @pl.loop(lo, hi + 1)
    def _visit(g):
      start, end = offsets_ref[g], offsets_ref[g + 1]

      @pl.when(end > start)
      def _():
        def acc_scope(acc_ref):
          plgpu.emit_pipeline(
              _mma_body(acc_ref, delay, b_transpose=transpose_rhs), grid=(steps,),
              in_specs=[lhs_spec, rhs_spec], max_concurrent_steps=stages,
          )(lhs_ref, rhs_ref.at[g])
          return acc_ref[...]

        acc = pl.run_scoped(acc_scope, plgpu.ACC((tm, to), jnp.float32)).astype(out_dtype)

        @pl.when(whole)
        def _():
          o_smem[...] = acc

        @pl.when(jnp.logical_not(whole))
        def _():
          mask = (rows >= start) & (rows < end)
          o_smem[...] = jnp.where(mask, acc, plgpu.load(o_smem, layout=plgpu.Layout.WGMMA))

    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, out_ref.at[pl.ds(mt * tm, tm), pl.ds(ot * to, to)])
    plgpu.wait_smem_to_gmem(0)

  return plgpu.kernel(
      kernel,
      out_type=jax.ShapeDtypeStruct((m, o), out_dtype),
      scratch_types=[plgpu.SMEM((tm, to), out_dtype, transforms=out_tr)],
      grid=(o // to, -(-m // tm)),
      grid_names=("o", "m"),
      interpret=interpret,
  )(offsets, first, last, lhs, rhs)


def tgmm(lhs, dout, offsets, num_groups: int, *, block_sizes: BlockSizes, out_dtype=None,
         interpret=None) -> jax.Array:
  """``out[g] = lhs[rows of g]^T @ dout[rows of g]`` -> ``[G, K, N]`` (0 for empty groups).

  Args:
    lhs: ``[M, K]``, dout ``[M, N]``, bf16/f16 (same dtype), M a multiple of ``ROW_ALIGN``
      and >= block_k.
    offsets: int32 ``[G + 1]`` group row offsets (``make_schedule(...)[0]``).
    block_sizes: block_k rows per contraction step, block_n the output tile along K and N (64
      where it does not divide); num_stages pipeline depth.
    out_dtype: default lhs.dtype (float32 accumulation).
  """
  m, k = lhs.shape
  _check_rows(m, block_sizes.block_k)
  n = dout.shape[1]
  out_dtype = jnp.dtype(out_dtype or lhs.dtype)
  tr_rows, tk, tn = block_sizes.block_k, _fit(k, block_sizes.block_n), _fit(n, block_sizes.block_n)
  stages = max(2, block_sizes.num_stages)
  in_tr, out_tr = _transforms(lhs.dtype), _transforms(out_dtype)

  def mask_rows(ref, lo, hi):
    """Zero the rows of ``ref`` outside ``[lo, hi)`` (a select: NaNs there do not leak)."""
    rows = plgpu.broadcasted_iota(jnp.int32, ref.shape, 0, layout=plgpu.Layout.WGMMA)
    val = plgpu.load(ref, layout=plgpu.Layout.WGMMA)
    ref[...] = jnp.where((rows >= lo) & (rows < hi), val, jnp.zeros_like(val))

  def kernel(offsets_ref, lhs_ref, dout_ref, out_ref, o_smem):
    nt, kt, g = lax.axis_index("n"), lax.axis_index("k"), lax.axis_index("g")
    start, end = offsets_ref[g], offsets_ref[g + 1]
    # TMA windows start on a tiling row (ROW_ALIGN): the first step may hold rows of the
    # previous group, the last rows of the next group (or past M, zero-filled by TMA).
    base = pl.multiple_of(start - lax.rem(start, jnp.int32(ROW_ALIGN)), ROW_ALIGN)
    steps = lax.div(end - base + (tr_rows - 1), jnp.int32(tr_rows))

    def acc_scope(acc_ref):
      def step(idx, x_smem, d_smem):
        (i,) = idx

        @pl.when(((i == 0) & (start > base)) | (i == steps - 1))
        def _():
          lo, hi = start - base - i * tr_rows, end - base - i * tr_rows
          mask_rows(x_smem, lo, hi)
          mask_rows(d_smem, lo, hi)
          plgpu.commit_smem()

        _mma_body(acc_ref, 1, a_transpose=True)(idx, x_smem, d_smem)

      @pl.when(end > start)
      def _():
        # Static-size windows from ``base``; the views may extend past M (never read there
        # but by TMA, which zero-fills out-of-bounds rows).
        plgpu.emit_pipeline(
            step, grid=(steps,),
            in_specs=[plgpu.BlockSpec((tr_rows, tk), lambda i: (i, kt), transforms=in_tr,
                                      delay_release=1),
                      plgpu.BlockSpec((tr_rows, tn), lambda i: (i, nt), transforms=in_tr,
                                      delay_release=1)],
            max_concurrent_steps=stages,
        )(lhs_ref.at[pl.ds(base, m)], dout_ref.at[pl.ds(base, m)])

      return acc_ref[...]

    acc = pl.run_scoped(acc_scope, plgpu.ACC((tk, tn), jnp.float32))
    o_smem[...] = acc.astype(out_dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, out_ref.at[g, pl.ds(kt * tk, tk), pl.ds(nt * tn, tn)])
    plgpu.wait_smem_to_gmem(0)

  return plgpu.kernel(
      kernel,
      out_type=jax.ShapeDtypeStruct((num_groups, k, n), out_dtype),
      scratch_types=[plgpu.SMEM((tk, tn), out_dtype, transforms=out_tr)],
      grid=(n // tn, k // tk, num_groups),
      grid_names=("n", "k", "g"),
      interpret=interpret,
  )(offsets, lhs, dout)


def grouped_matmul_gpu(lhs, rhs, group_sizes, *, block_sizes: BlockSizes | None = None,
                       out_dtype=None, interpret=None) -> jax.Array:
  """Grouped matmul with the Mosaic GPU kernels and a custom_vjp (``d_lhs`` = ``gmm`` with the
  weights transposed, ``d_rhs`` = ``tgmm``).

  Args:
    lhs: ``[M, K]``; rhs ``[G, K, N]`` (cast to their common dtype, bf16 or f16);
      group_sizes int32 ``[G]``.
    block_sizes: tiles (default ``BlockSizes.for_device("gpu", ...)``).
    out_dtype: default the promoted input dtype.
    interpret: None on a GPU; ``plgpu.InterpretGPUParams(...)`` to run on CPU.

  Returns:
    ``[M, N]``; rows past ``sum(group_sizes)`` are 0. Differentiable in lhs and rhs.
    Raises ValueError when ``supported`` gives a reason. M is zero-padded to a multiple of 8
    and to at least one tile (kernels' limits), the output sliced back.
  """
  bs = block_sizes or BlockSizes.for_device("gpu", lhs.shape[0], lhs.shape[1], rhs.shape[2])
  reason = supported(lhs, rhs, block_sizes=bs)
  if reason is not None:
    raise ValueError(f"Mosaic GPU grouped matmul does not support {reason}")
  dtype = jnp.promote_types(lhs.dtype, rhs.dtype)
  out_dtype = out_dtype or dtype
  num_groups = rhs.shape[0]
  call = functools.partial(gmm, block_sizes=bs, interpret=interpret)

  # Pad M to a multiple of ROW_ALIGN (TMA tiles global arrays in 8-row tiles) and to at
  # least one tile (decoding: no TMA window larger than its array); the padded rows are past
  # sum(group_sizes), hence 0, and sliced off.
  m = lhs.shape[0]
  rows = -(-max(m, bs.block_m, bs.block_k) // ROW_ALIGN) * ROW_ALIGN

  @jax.custom_vjp
  def f(x, w, gs):
    return call(x, w, make_schedule(gs, rows, bs.block_m), out_dtype=out_dtype)

  def f_fwd(x, w, gs):
    sched = make_schedule(gs, rows, bs.block_m)
    return call(x, w, sched, out_dtype=out_dtype), (x, w, sched)

  def f_bwd(res, dout):
    x, w, sched = res
    dout = dout.astype(dtype)
    dx = call(dout, w, sched, out_dtype=x.dtype, transpose_rhs=True)
    dw = tgmm(x, dout, sched[0], num_groups, block_sizes=bs, out_dtype=w.dtype,
              interpret=interpret)
    return dx, dw, None

  f.defvjp(f_fwd, f_bwd)
  x = jnp.pad(lhs.astype(dtype), ((0, rows - m), (0, 0)))
  return f(x, rhs.astype(dtype), group_sizes.astype(jnp.int32))[:m]
