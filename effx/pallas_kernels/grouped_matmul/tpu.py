"""Grouped matmul for TPU (Pallas, Mosaic TPU dialect): forward, lhs and weight gradients.

Work list (``make_work``, computed by XLA from ``group_sizes`` and scalar-prefetched into SMEM):
rows are cut into ``block_m`` tiles and a tile spanning several groups is visited once per
group (megablox-style), the rows of the other groups masked. The list enumerates, in row order,
for each group ``max(1, #tiles it touches)`` items (an empty group still gets one item, so its
weight gradient is written as 0), then one item per tile past ``sum(group_sizes)`` (so those
rows are written as 0). Both ``item_tile`` and ``item_group`` are non-decreasing, so the visits
of an output tile (forward: an m tile; weight gradient: a group) are consecutive, which is what
lets the output block stay in VMEM across them. The list has a static bound of
``num_m_tiles + G`` entries; padding entries repeat the last real one (same block indices: no
DMA) and their body is skipped.

Kernels:
* ``gmm``: grid ``(n tiles, items, k tiles)``; out[tile] = (first visit ? 0 : out[tile]) with
  the group's rows replaced by ``lhs_tile @ rhs[g]`` (float32 VMEM accumulator over k).
  ``transpose_rhs=True`` contracts with ``rhs[g]^T`` (``[G, N, K]`` read as is), which is the
  lhs gradient ``dout @ rhs[g]^T`` without transposing the weights in HBM.
* ``tgmm``: grid ``(k tiles, n tiles, items)``; ``out[g] = sum over g's items of
  lhs_tile^T @ dout_tile`` with rows of other groups zeroed (selects, not products, so garbage
  in the rows of a partial last tile cannot leak), accumulated in a float32 VMEM scratch and
  written at the group's last item.

M needs no padding: the last tile may be partial (its out-of-range rows are masked and their
writes dropped). K and N use ``block_k`` / ``block_n`` when they divide them, else the whole
dimension.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from effx.pallas_kernels.grouped_matmul.config import BlockSizes


def make_work(group_sizes: jax.Array, m: int, tm: int):
  """The work list of the module docstring (traceable; W = cdiv(m, tm) + G).

  Returns (offsets [G + 1], item_group [W], item_tile [W], num_items [1]), all int32; the
  tail items (tiles past the last row of the last group) carry group G - 1 (their rows are
  outside it, so they only write zeros).
  """
  sizes = group_sizes.astype(jnp.int32)
  num_groups = sizes.shape[0]
  tiles_m = -(-m // tm)
  ends = jnp.cumsum(sizes)
  starts = ends - sizes
  offsets = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends])
  total = ends[-1]
  first_tile = jnp.minimum(starts // tm, tiles_m - 1)
  last_tile = (ends - 1) // tm
  per_group = jnp.where(sizes > 0, last_tile - first_tile + 1, 1)
  used_tiles = (total + tm - 1) // tm
  counts = jnp.concatenate([per_group, (tiles_m - used_tiles)[None]])     # [G + 1]
  cum = jnp.cumsum(counts)
  item_start = cum - counts
  num_items = cum[-1]
  w = tiles_m + num_groups
  i = jnp.minimum(jnp.arange(w, dtype=jnp.int32), num_items - 1)         # pad: repeat last
  grp = jnp.searchsorted(cum, i, side="right").astype(jnp.int32)          # in [0, G]
  first = jnp.concatenate([first_tile, used_tiles[None]])
  tile = jnp.minimum(first[grp] + i - item_start[grp], tiles_m - 1)
  grp = jnp.minimum(grp, num_groups - 1)
  return offsets, grp, tile.astype(jnp.int32), num_items.astype(jnp.int32)[None]


def _fit(dim: int, tile: int) -> int:
  return tile if dim % tile == 0 else dim


@dataclasses.dataclass(frozen=True)
class _Static:
  tm: int
  tc: int        # contraction tile
  to: int        # output tile
  m: int
  num_c: int


def _row_mask(offsets_ref, g, tile, shape, tm):
  rows = tile * tm + jax.lax.broadcasted_iota(jnp.int32, shape, 0)
  return (rows >= offsets_ref[g]) & (rows < offsets_ref[g + 1])


def _gmm_kernel(offsets_ref, group_ref, tile_ref, num_ref, lhs_ref, rhs_ref, out_ref, acc_scr,
                *, st: _Static, transpose_rhs: bool):
  i, c = pl.program_id(1), pl.program_id(2)

  @pl.when(i < num_ref[0])
  def _visit():
    @pl.when(c == 0)
    def _init():
      acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    dims = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))
    acc_scr[...] += jax.lax.dot_general(lhs_ref[...], rhs_ref[...], dims,
                                        preferred_element_type=jnp.float32)

    @pl.when(c == st.num_c - 1)
    def _store():
      g, tile = group_ref[i], tile_ref[i]
      first = jnp.logical_or(i == 0, tile_ref[jnp.maximum(i - 1, 0)] != tile)
      mask = _row_mask(offsets_ref, g, tile, acc_scr.shape, st.tm)
      new = acc_scr[...].astype(out_ref.dtype)

      @pl.when(first)
      def _():
        out_ref[...] = jnp.where(mask, new, jnp.zeros_like(new))

      @pl.when(jnp.logical_not(first))
      def _():
        out_ref[...] = jnp.where(mask, new, out_ref[...])


def gmm(lhs, rhs, group_sizes, *, block_sizes: BlockSizes, out_dtype=None,
        transpose_rhs: bool = False, interpret=None, work=None):
  """``out[r] = lhs[r] @ rhs[g]`` (``rhs[g]^T`` if transpose_rhs) for rows r of group g.

  Args:
    lhs: ``[M, C]``; rhs: ``[G, C, O]`` (``[G, O, C]`` if transpose_rhs); group_sizes int32
      ``[G]``; block_sizes: (block_m, block_k = contraction, block_n = output) for the
      forward; the lhs gradient passes (block_m, block_n, block_k).
    work: a precomputed ``make_work(group_sizes, M, block_m)``.

  Returns:
    ``[M, O]`` in out_dtype (default lhs.dtype); rows past sum(group_sizes) are 0.
  """
  m, c = lhs.shape
  o = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  tm = block_sizes.block_m
  tc, to = _fit(c, block_sizes.block_k), _fit(o, block_sizes.block_n)
  st = _Static(tm=tm, tc=tc, to=to, m=m, num_c=c // tc)
  offsets, grp, tile, num = work if work is not None else make_work(group_sizes, m, tm)
  w = grp.shape[0]
  if transpose_rhs:
    rhs_spec = pl.BlockSpec((None, to, tc), lambda n, i, cc, off, g, t, nm: (g[i], n, cc))
  else:
    rhs_spec = pl.BlockSpec((None, tc, to), lambda n, i, cc, off, g, t, nm: (g[i], cc, n))
  return pl.pallas_call(
      functools.partial(_gmm_kernel, st=st, transpose_rhs=transpose_rhs),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=4, grid=(o // to, w, c // tc),
          in_specs=[pl.BlockSpec((tm, tc), lambda n, i, cc, off, g, t, nm: (t[i], cc)),
                    rhs_spec],
          out_specs=pl.BlockSpec((tm, to), lambda n, i, cc, off, g, t, nm: (t[i], n)),
          scratch_shapes=[pltpu.VMEM((tm, to), jnp.float32)]),
      out_shape=jax.ShapeDtypeStruct((m, o), out_dtype or lhs.dtype),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "arbitrary", "arbitrary")),
      interpret=interpret,
      name="effx_gmm",
  )(offsets, grp, tile, num, lhs, rhs)


def _tgmm_kernel(offsets_ref, group_ref, tile_ref, num_ref, lhs_ref, dout_ref, out_ref, acc_scr,
                 *, st: _Static):
  i = pl.program_id(2)
  n_items = num_ref[0]

  @pl.when(i < n_items)
  def _visit():
    g, tile = group_ref[i], tile_ref[i]
    first = jnp.logical_or(i == 0, group_ref[jnp.maximum(i - 1, 0)] != g)
    last = jnp.logical_or(i == n_items - 1, group_ref[jnp.minimum(i + 1, n_items - 1)] != g)

    @pl.when(first)
    def _init():
      acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    x, d = lhs_ref[...], dout_ref[...]
    x = jnp.where(_row_mask(offsets_ref, g, tile, x.shape, st.tm), x, jnp.zeros_like(x))
    d = jnp.where(_row_mask(offsets_ref, g, tile, d.shape, st.tm), d, jnp.zeros_like(d))
    acc_scr[...] += jax.lax.dot_general(x, d, (((0,), (0,)), ((), ())),
                                        preferred_element_type=jnp.float32)

    @pl.when(last)
    def _store():
      out_ref[...] = acc_scr[...].astype(out_ref.dtype)


def tgmm(lhs, dout, group_sizes, num_groups: int, *, block_sizes: BlockSizes, out_dtype=None,
         interpret=None, work=None):
  """``out[g] = lhs[rows of g]^T @ dout[rows of g]`` -> ``[G, K, N]`` (0 for empty groups).

  Args: lhs ``[M, K]``, dout ``[M, N]``, group_sizes int32 ``[G]``; block_sizes (block_m is
  the contraction tile here); work: a precomputed ``make_work(group_sizes, M, block_m)``.
  """
  m, k = lhs.shape
  n = dout.shape[1]
  tm = block_sizes.block_m
  tk, tn = _fit(k, block_sizes.block_k), _fit(n, block_sizes.block_n)
  st = _Static(tm=tm, tc=tm, to=tn, m=m, num_c=1)
  offsets, grp, tile, num = work if work is not None else make_work(group_sizes, m, tm)
  w = grp.shape[0]
  return pl.pallas_call(
      functools.partial(_tgmm_kernel, st=st),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=4, grid=(k // tk, n // tn, w),
          in_specs=[pl.BlockSpec((tm, tk), lambda kk, nn, i, off, g, t, nm: (t[i], kk)),
                    pl.BlockSpec((tm, tn), lambda kk, nn, i, off, g, t, nm: (t[i], nn))],
          out_specs=pl.BlockSpec((None, tk, tn), lambda kk, nn, i, off, g, t, nm: (g[i], kk, nn)),
          scratch_shapes=[pltpu.VMEM((tk, tn), jnp.float32)]),
      out_shape=jax.ShapeDtypeStruct((num_groups, k, n), out_dtype or lhs.dtype),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name="effx_tgmm",
  )(offsets, grp, tile, num, lhs, dout)


def grouped_matmul_tpu(lhs, rhs, group_sizes, *, block_sizes: BlockSizes | None = None,
                       out_dtype=None, interpret=None):
  """Grouped matmul with the TPU kernels and a custom_vjp (``d_lhs`` = ``gmm`` with the
  weights transposed, ``d_rhs`` = ``tgmm``).

  Args:
    lhs: ``[M, K]``; rhs ``[G, K, N]`` (cast to a common dtype); group_sizes int32 ``[G]``.
    block_sizes: tiles (default ``BlockSizes()``).
    out_dtype: default the promoted input dtype.
    interpret: None on a TPU; ``pltpu.InterpretParams(...)`` (or True) to run on CPU.

  Returns:
    ``[M, N]``; rows past ``sum(group_sizes)`` are 0. Differentiable in lhs and rhs.
  """
  bs = block_sizes or BlockSizes()
  dtype = jnp.promote_types(lhs.dtype, rhs.dtype)
  out_dtype = out_dtype or dtype
  on_hw = jax.default_backend() == "tpu" and not interpret
  if on_hw:
    for name, dim, tile in (("block_k", lhs.shape[1], bs.block_k),
                            ("block_n", rhs.shape[2], bs.block_n)):
      if dim % tile == 0 and tile % 128:
        raise ValueError(f"BlockSizes.{name}={tile} must be a multiple of 128 on TPU")
  # Few rows (decoding): one tile of round_up(M, 16) rows instead of a mostly empty one.
  bs = dataclasses.replace(bs, block_m=min(bs.block_m, -(-max(lhs.shape[0], 1) // 16) * 16))
  bwd_bs = BlockSizes(block_m=bs.block_m, block_k=bs.block_n, block_n=bs.block_k)
  num_groups = rhs.shape[0]

  @jax.custom_vjp
  def f(x, w, gs):
    return gmm(x, w, gs, block_sizes=bs, out_dtype=out_dtype, interpret=interpret)

  def f_fwd(x, w, gs):
    work = make_work(gs, x.shape[0], bs.block_m)
    out = gmm(x, w, gs, block_sizes=bs, out_dtype=out_dtype, interpret=interpret, work=work)
    return out, (x, w, gs, work)

  def f_bwd(res, dout):
    x, w, gs, work = res
    dout = dout.astype(dtype)
    dx = gmm(dout, w, gs, block_sizes=bwd_bs, out_dtype=x.dtype, transpose_rhs=True,
             interpret=interpret, work=work)
    dw = tgmm(x, dout, gs, num_groups, block_sizes=bs, out_dtype=w.dtype, interpret=interpret,
              work=work)
    return dx, dw, None

  f.defvjp(f_fwd, f_bwd)
  return f(lhs.astype(dtype), rhs.astype(dtype), group_sizes.astype(jnp.int32))
