"""Split-K decode attention (flash-decoding) for TPU (Pallas, Mosaic TPU dialect), forward only.

Grid ``(batch, kv_heads, splits, steps)``. All ``groups = heads // kv_heads`` query heads of a
KV head and all T new tokens are processed together as one ``[rows, head_dim]`` query tile
(row ``r = token * groups + head_in_group``, padded to a multiple of 8), so each K/V tile is read
from HBM once per KV head. Split s covers key blocks ``s * steps .. s * steps + steps - 1`` and
writes float32 partials (unnormalised o, running max m, sum l); ``reference.combine_splits``
(XLA, ``O(splits * rows * head_dim)``) merges them.

The per-row cache lengths are scalar-prefetched into SMEM. The K/V index maps clamp the block
index to the last block holding a visible slot (``(length + T - 1) // block_k``), so steps and
whole splits past a row's length repeat the previous block index (the pipeline fetches nothing)
and their body is skipped with ``pl.when``. Blocks entirely below the length are full (no
element mask); the others build the mask from the slot index, the length and the new-token mask
of each query row, which is passed in a compact form (two int32 words per row: bit j = sees
new token j, ``reference.new_token_bits``), so no gather runs in the kernel.

Cache layout: K/V stay in the cache's ``[batch, max_len, kv_heads, head_dim]`` layout, viewed
(free reshape) as ``[batch, max_len, kv_heads * head_dim]`` with ``[block_k, head_dim]`` tiles
at lane offset ``kv_head * head_dim``, when ``head_dim % 128 == 0`` or ``kv_heads == 1``;
otherwise (a lane-misaligned head) they are transposed to ``[batch, kv_heads, max_len,
head_dim]`` first, which costs one copy of the cache per call. A cache length that is not a
multiple of ``block_k`` needs no padding: the last tile's out-of-range rows are masked (scores)
and zeroed (values); so are the values of slots past the new tokens (stale entries need not
be finite).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from effx.pallas_kernels._tpu_common import NUM_LANES, lanes as _lanes
from effx.pallas_kernels.decode_attention import reference as ref_lib
from effx.pallas_kernels.decode_attention.config import BlockSizes
from effx.pallas_kernels.decode_attention.config import default_splits

NUM_SUBLANES = 8


@dataclasses.dataclass(frozen=True)
class _Static:
  t: int
  kv_len: int
  block_k: int
  num_blocks: int
  steps: int
  scale: float
  cap: float | None


def _last_block(start, st: _Static):
  """Index of the last key block holding a slot visible to some query of the row."""
  return jnp.minimum((start + st.t - 1) // st.block_k, st.num_blocks - 1)


def kv_block_index(s, tt, start, st: _Static):
  """K/V block fetched at step tt of split s for a row of length ``start``: the step's own
  block, clamped to the last visible one (so later steps and splits refetch nothing)."""
  return jnp.minimum(s * st.steps + tt, _last_block(start, st))


def _kernel(len_ref, q_ref, k_ref, v_ref, bits_ref, o_ref, m_ref, l_ref, m_scr, l_scr, acc_scr,
            *, st: _Static):
  bb, s, tt = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  bk = st.block_k
  start = len_ref[bb]
  j = s * st.steps + tt
  rows, head_dim = acc_scr.shape

  @pl.when(tt == 0)
  def _init():
    m_scr[...] = jnp.full(m_scr.shape, -jnp.inf, jnp.float32)
    l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
    acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

  def body(partial: bool):
    q, k, v = q_ref[...], k_ref[...], v_ref[...]
    sc = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                             preferred_element_type=jnp.float32) * st.scale
    if st.cap is not None:
      sc = st.cap * jnp.tanh(sc / st.cap)
    if partial:
      cols = j * bk + jax.lax.broadcasted_iota(jnp.int32, (rows, bk), 1)
      off = cols - start
      offc = jnp.clip(off, 0, 2 * 32 - 1)
      word = jnp.where(offc < 32, _lanes(bits_ref[:, :NUM_LANES], bk),
                       _lanes(bits_ref[:, NUM_LANES:], bk))
      bit = jax.lax.shift_right_logical(word, offc & 31) & 1
      vis = (cols < start) | ((off >= 0) & (off < st.t) & (bit != 0))
      if st.kv_len % bk:
        vis = vis & (cols < st.kv_len)
      sc = jnp.where(vis, sc, -jnp.inf)
      # Slots nobody sees (stale entries, rows past the cache in a ragged last tile, which
      # hold garbage) get v = 0: p = 0 there, but 0 * NaN would still poison the sum.
      slot = j * bk + jax.lax.broadcasted_iota(jnp.int32, v.shape, 0)
      v = jnp.where(slot < jnp.minimum(start + st.t, st.kv_len), v, jnp.zeros_like(v))
    m_prev, l_prev = m_scr[...], l_scr[...]
    m_next = jnp.maximum(m_prev, jnp.max(sc, axis=1, keepdims=True))      # [rows, 128]
    m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)
    alpha = jnp.exp(m_prev - m_safe)
    p = jnp.exp(sc - _lanes(m_safe, bk))
    l_scr[...] = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
    m_scr[...] = m_next
    pv = jax.lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32)
    acc_scr[...] = acc_scr[...] * _lanes(alpha, head_dim) + pv

  @pl.when(j <= _last_block(start, st))
  def _visit():
    full = (j + 1) * bk <= start
    pl.when(full)(lambda: body(False))
    pl.when(jnp.logical_not(full))(lambda: body(True))

  @pl.when(tt == st.steps - 1)
  def _finish():
    o_ref[...] = acc_scr[...]
    m_ref[...] = m_scr[...]
    l_ref[...] = l_scr[...]


def _num_splits(bs: BlockSizes, parallel_units: int, num_blocks: int) -> int:
  if bs.num_splits is not None:
    return max(1, min(bs.num_splits, num_blocks))
  return default_splits(jax.devices()[0].device_kind, parallel_units, num_blocks)


def plan(t: int, kv_len: int, bs: BlockSizes, *, parallel_units: int, head_dim: int,
         sm_scale: float | None = None, logit_soft_cap: float | None = None
         ) -> tuple[_Static, int]:
  """(static constants, number of splits): ``steps`` blocks per split, no empty split."""
  num_blocks = -(-kv_len // bs.block_k)
  splits = _num_splits(bs, parallel_units, num_blocks)
  steps = -(-num_blocks // splits)
  splits = -(-num_blocks // steps)
  st = _Static(t=t, kv_len=kv_len, block_k=bs.block_k, num_blocks=num_blocks, steps=steps,
               scale=float(sm_scale) if sm_scale is not None else 1.0 / float(np.sqrt(head_dim)),
               cap=logit_soft_cap)
  return st, splits


def fold_queries(q: jax.Array, kv_heads: int, rows_p: int) -> jax.Array:
  """q ``[b, T, heads, d]`` -> ``[b, kv_heads, rows_p, d]``, row = token * groups + head."""
  b, t, h, d = q.shape
  g = h // kv_heads
  x = q.reshape(b, t, kv_heads, g, d).transpose(0, 2, 1, 3, 4).reshape(b, kv_heads, t * g, d)
  return jnp.pad(x, ((0, 0), (0, 0), (0, rows_p - t * g), (0, 0)))


def unfold_rows(x: jax.Array, t: int, heads: int) -> jax.Array:
  """``[b, kv_heads, rows_p, ...]`` -> ``[b, T, heads, ...]`` (inverse of ``fold_queries``)."""
  b, kv_heads = x.shape[:2]
  g = heads // kv_heads
  x = x[:, :, :t * g].reshape(b, kv_heads, t, g, *x.shape[3:])
  x = jnp.moveaxis(x, 2, 1)
  return x.reshape(b, t, heads, *x.shape[4:])


def row_bits(new_token_mask: jax.Array, groups: int, rows_p: int) -> jax.Array:
  """int32 ``[b, rows_p, 2]``: the two mask words of each query row (row = token * groups +
  head); padded rows see no new token."""
  bits = ref_lib.new_token_bits(new_token_mask)                      # [b, T, 2]
  b, t, _ = bits.shape
  bits = jnp.repeat(bits, groups, axis=1)
  return jnp.pad(bits, ((0, 0), (0, rows_p - t * groups), (0, 0)))


def decode_attention_tpu(q, k, v, lengths, new_token_mask=None, *, sm_scale: float | None = None,
                         logit_soft_cap: float | None = None,
                         block_sizes: BlockSizes | None = None, interpret=None,
                         return_lse: bool = False):
  """Decode attention with the TPU Pallas kernel (semantics: ``reference.py``), forward only.

  Args:
    q: ``[batch, T, heads, head_dim]``, 1 <= T <= 64.
    k, v: ``[batch, max_len, kv_heads, head_dim]`` (cache including the new tokens).
    lengths: int32 ``[batch]`` cache length before the new tokens.
    new_token_mask: bool ``[batch, T, T]`` or None (causal).
    sm_scale, logit_soft_cap: as the reference.
    block_sizes: ``BlockSizes`` (block_k, num_splits); default ``BlockSizes()``.
    interpret: None on a TPU; ``pltpu.InterpretParams(...)`` (or True) to run on CPU.
    return_lse: also return the float32 lse ``[batch, T, heads]``.

  Returns:
    ``[batch, T, heads, head_dim]`` in q's dtype (and the lse if asked).
  """
  ref_lib.check_inputs(q, k, v, lengths, new_token_mask)
  bs = block_sizes or BlockSizes()
  b, t, h, d = q.shape
  kv_len, hkv = k.shape[1], k.shape[2]
  g = h // hkv
  bk = bs.block_k
  if t > ref_lib.MAX_NEW_TOKENS:
    raise ValueError(f"decode_attention_tpu: T={t} new tokens; at most "
                     f"{ref_lib.MAX_NEW_TOKENS}")
  if jax.default_backend() == "tpu" and not interpret and bk % NUM_LANES:
    raise ValueError(f"BlockSizes.block_k={bk} must be a multiple of 128 on TPU")
  if new_token_mask is None:
    new_token_mask = ref_lib.default_new_token_mask(b, t)
  st, splits = plan(t, kv_len, bs, parallel_units=b * hkv, head_dim=d, sm_scale=sm_scale,
                    logit_soft_cap=logit_soft_cap)
  rows_p = -(-(t * g) // NUM_SUBLANES) * NUM_SUBLANES

  qr = fold_queries(q, hkv, rows_p)
  bits = row_bits(new_token_mask.astype(bool), g, rows_p)            # [b, rows_p, 2]
  bits = jnp.repeat(bits, NUM_LANES, axis=2)                         # [b, rows_p, 256]

  def kv_block(bb, s, tt, len_ref):
    return kv_block_index(s, tt, len_ref[bb], st)

  if d % NUM_LANES == 0 or hkv == 1:   # native cache layout, [block_k, head_dim] lane slices
    kk, vv = k.reshape(b, kv_len, hkv * d), v.reshape(b, kv_len, hkv * d)
    kv_spec = pl.BlockSpec((None, bk, d),
                           lambda bb, hh, s, tt, len_ref: (bb, kv_block(bb, s, tt, len_ref), hh))
  else:
    kk, vv = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
    kv_spec = pl.BlockSpec((None, None, bk, d), lambda bb, hh, s, tt, len_ref: (
        bb, hh, kv_block(bb, s, tt, len_ref), 0))

  in_specs = [pl.BlockSpec((None, None, rows_p, d), lambda bb, hh, s, tt, *_: (bb, hh, 0, 0)),
              kv_spec, kv_spec,
              pl.BlockSpec((None, rows_p, 2 * NUM_LANES), lambda bb, hh, s, tt, *_: (bb, 0, 0))]
  part = lambda w: pl.BlockSpec((None, None, None, rows_p, w),
                                lambda bb, hh, s, tt, *_: (bb, hh, s, 0, 0))
  out_shape = [jax.ShapeDtypeStruct((b, hkv, splits, rows_p, d), jnp.float32),
               jax.ShapeDtypeStruct((b, hkv, splits, rows_p, NUM_LANES), jnp.float32),
               jax.ShapeDtypeStruct((b, hkv, splits, rows_p, NUM_LANES), jnp.float32)]
  scratch = [pltpu.VMEM((rows_p, NUM_LANES), jnp.float32),
             pltpu.VMEM((rows_p, NUM_LANES), jnp.float32),
             pltpu.VMEM((rows_p, d), jnp.float32)]
  acc, m, l = pl.pallas_call(
      functools.partial(_kernel, st=st),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1, grid=(b, hkv, splits, st.steps), in_specs=in_specs,
          out_specs=[part(d), part(NUM_LANES), part(NUM_LANES)], scratch_shapes=scratch),
      out_shape=out_shape,
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name="effx_decode_attention",
  )(jnp.asarray(lengths, jnp.int32), qr, kk, vv, bits)
  o, lse = ref_lib.combine_splits(acc, m[..., 0], l[..., 0])        # [b, hkv, rows_p, (d)]
  o = unfold_rows(o, t, h).astype(q.dtype)
  if not return_lse:
    return o
  return o, unfold_rows(lse, t, h)
