"""Static (trace-time, numpy) block layouts for the flash-attention kernels.

A kernel tiles the score matrix into ``[block_q, block_k]`` tiles. Everything that is known
before tracing -- causality, the sliding window, an arbitrary dense element mask and the
padding of the key axis -- is folded here into one int8 class per tile:

* ``0`` empty: no allowed (query, key) pair; the kernel never visits (nor fetches) the tile;
* ``1`` partial: the kernel visits it and applies the element mask;
* ``2`` full: every pair is allowed; the kernel skips the element mask
  (segment ids, which are data, are still applied).

The kernels consume the layout in a compacted form: for every (mask head, query block) the
list of non-empty key blocks in increasing order (``BlockLists``), padded to a common length
by repeating the last valid entry, so that a pipeline whose block index does not change
fetches nothing. The transposed lists (for every key block, the query blocks that see it)
drive the dK/dV kernel.

Conventions (shared with ``reference.py``): query i and key j sit at positions i and j
(top-left aligned, as ``jax.nn.dot_product_attention`` and ``mask.dense(q_len, kv_len)``);
``causal`` allows ``j <= i``; ``window=w`` allows ``i - j < w``.
"""

from __future__ import annotations

import dataclasses

import numpy as np

EMPTY, PARTIAL, FULL = 0, 1, 2


def _cdiv(a: int, b: int) -> int:
  return -(-a // b)


def analytic_layout(q_len: int, kv_len: int, block_q: int, block_k: int, *, causal: bool,
                    window: int | None) -> np.ndarray:
  """Tile classes of causal/window/key-padding masks, int8 ``[nq, nk]`` (no dense mask)."""
  nq, nk = _cdiv(q_len, block_q), _cdiv(kv_len, block_k)
  i = np.arange(nq)[:, None]
  j = np.arange(nk)[None, :]
  r0 = i * block_q                                   # first / last real query row
  r1 = np.minimum((i + 1) * block_q, q_len) - 1
  c0 = j * block_k                                   # first / last real key
  c1 = np.minimum((j + 1) * block_k, kv_len) - 1
  empty = np.zeros((nq, nk), bool)
  full = np.broadcast_to((j + 1) * block_k <= kv_len, (nq, nk)).copy()  # padded keys -> partial
  if causal:   # allowed iff key <= row
    empty |= r1 < c0
    full &= c1 <= r0
  if window is not None:   # allowed iff row - key < window
    empty |= c1 <= r0 - window
    full &= c0 > r1 - window
  return np.where(empty, EMPTY, np.where(full, FULL, PARTIAL)).astype(np.int8)


def dense_layout(dense: np.ndarray, block_q: int, block_k: int) -> np.ndarray:
  """Tile classes of a dense bool mask ``[heads_or_1, q_len, kv_len]`` -> int8 ``[h, nq, nk]``.

  Only real (unpadded) rows and keys count; key padding is the analytic layout's business.
  """
  h, q_len, kv_len = dense.shape
  nq, nk = _cdiv(q_len, block_q), _cdiv(kv_len, block_k)

  def tiles(fill: bool) -> np.ndarray:
    padded = np.full((h, nq * block_q, nk * block_k), fill, bool)
    padded[:, :q_len, :kv_len] = dense
    return padded.reshape(h, nq, block_q, nk, block_k)

  any_ = tiles(False).any(axis=(2, 4))
  all_ = tiles(True).all(axis=(2, 4))
  return np.where(~any_, EMPTY, np.where(all_, FULL, PARTIAL)).astype(np.int8)


def combine(*layouts: np.ndarray) -> np.ndarray:
  """Elementwise AND of tile classes (broadcasting over the head axis)."""
  out = layouts[0]
  for lay in layouts[1:]:
    empty = (out == EMPTY) | (lay == EMPTY)
    full = (out == FULL) & (lay == FULL)
    out = np.where(empty, EMPTY, np.where(full, FULL, PARTIAL)).astype(np.int8)
  return out


@dataclasses.dataclass(frozen=True, eq=False)
class BlockLists:
  """Compacted tile lists (numpy, static) that drive a kernel grid.

  Attributes:
    idx: int32 ``[h, n_outer, max_steps]``, the inner block index visited at each step
      (padded with the last valid index).
    cnt: int32 ``[h, n_outer]``, the number of valid steps.
    cls: int32 ``[h, n_outer, max_steps]``, the tile class at each step (1 or 2; 0 = padding).
    tile: int32 ``[h, n_outer, max_steps]``, index into ``tiles`` of the dense partial mask
      (0 = the all-true tile), or None when there is no dense mask.
  """
  idx: np.ndarray
  cnt: np.ndarray
  cls: np.ndarray
  tile: np.ndarray | None

  @property
  def max_steps(self) -> int:
    return self.idx.shape[-1]


def compact(layout: np.ndarray, tile_ids: np.ndarray | None, *, transpose: bool) -> BlockLists:
  """Lists the non-empty tiles of ``layout`` ``[h, nq, nk]`` per query block (or per key block)."""
  if transpose:
    layout = np.swapaxes(layout, 1, 2)
    tile_ids = None if tile_ids is None else np.swapaxes(tile_ids, 1, 2)
  h, n_outer, n_inner = layout.shape
  nonempty = layout != EMPTY
  cnt = nonempty.sum(-1).astype(np.int32)
  steps = max(int(cnt.max(initial=0)), 1)
  # Stable sort puts the non-empty inner indices first, in increasing order.
  order = np.argsort(~nonempty, axis=-1, kind="stable")[..., :steps].astype(np.int32)
  if n_inner < steps:  # cannot happen (steps <= n_inner) but keep shapes honest
    raise AssertionError("layout compaction")
  t = np.arange(steps)[None, None, :]
  last = np.maximum(cnt[..., None] - 1, 0)
  idx = np.where(t < cnt[..., None], order, np.take_along_axis(order, last, -1))
  idx = np.where(cnt[..., None] > 0, idx, 0).astype(np.int32)
  cls = np.take_along_axis(layout, idx, -1).astype(np.int32) * (t < cnt[..., None])
  tile = None
  if tile_ids is not None:
    tile = np.take_along_axis(tile_ids, idx, -1).astype(np.int32)
  return BlockLists(idx=idx, cnt=cnt, cls=cls.astype(np.int32), tile=tile)


def partial_tiles(dense: np.ndarray, dense_classes: np.ndarray, block_q: int,
                  block_k: int) -> tuple[np.ndarray, np.ndarray]:
  """Deduplicated dense-mask tiles of the partial tiles.

  Returns ``(tiles, tile_ids)``: int8 ``[num_unique, block_q, block_k]`` with ``tiles[0]`` all
  ones, and int32 ``[h, nq, nk]`` pointing each tile to its mask (0 for empty/full tiles).
  """
  h, q_len, kv_len = dense.shape
  _, nq, nk = dense_classes.shape
  padded = np.zeros((h, nq * block_q, nk * block_k), np.int8)
  padded[:, :q_len, :kv_len] = dense
  padded[:, q_len:, :kv_len] = 1   # padded rows: anything goes
  uniq: dict[bytes, int] = {np.ones((block_q, block_k), np.int8).tobytes(): 0}
  tiles = [np.ones((block_q, block_k), np.int8)]
  tile_ids = np.zeros((h, nq, nk), np.int32)
  for hh, i, j in zip(*np.nonzero(dense_classes == PARTIAL)):
    t = padded[hh, i * block_q:(i + 1) * block_q, j * block_k:(j + 1) * block_k]
    key = t.tobytes()
    if key not in uniq:
      uniq[key] = len(tiles)
      tiles.append(np.ascontiguousarray(t))
    tile_ids[hh, i, j] = uniq[key]
  return np.stack(tiles), tile_ids


@dataclasses.dataclass(frozen=True, eq=False)
class KernelLayout:
  """Everything static a kernel needs about the mask, for one tiling.

  Attributes:
    classes: int8 ``[h, nq, nk]`` tile classes (h = 1 or the number of query heads).
    rows: lists over key blocks per query block (forward, dQ).
    cols: lists over query blocks per key block (dK/dV).
    tiles: int8 ``[u, block_q, block_k]`` dense partial-tile masks, or None (no dense mask).
    has_dense_partial: whether some visited tile needs the dense element mask.
  """
  classes: np.ndarray
  rows: BlockLists
  cols: BlockLists
  tiles: np.ndarray | None
  has_dense_partial: bool

  @property
  def per_head(self) -> bool:
    return self.classes.shape[0] > 1

  @property
  def density(self) -> float:
    return float((self.classes != EMPTY).mean())


def make_layout(q_len: int, kv_len: int, block_q: int, block_k: int, *, causal: bool,
                window: int | None, dense_mask: np.ndarray | None = None,
                block_mask: np.ndarray | None = None, num_q_blocks: int | None = None,
                num_k_blocks: int | None = None) -> KernelLayout:
  """Builds the static layout of a kernel tiling.

  Args:
    q_len, kv_len: unpadded lengths.
    block_q, block_k: the kernel tile.
    causal, window: see the module docstring.
    dense_mask: optional bool ``[heads_or_1, q_len, kv_len]`` (the truth for arbitrary masks).
    block_mask: optional int8 ``[heads_or_1, nq, nk]`` made from ``dense_mask``; if its grid
      equals this tiling it is checked against ``dense_mask`` (a tile marked empty or full
      that is not raises; partial is always safe), otherwise it belongs to another tiling and
      is ignored. The kernels always use the layout rebuilt from the dense mask.
    num_q_blocks, num_k_blocks: grid size when the kernel pads further than one tile; the
      extra (all-padding) blocks are empty.

  Returns:
    The KernelLayout.
  """
  analytic = analytic_layout(q_len, kv_len, block_q, block_k, causal=causal,
                             window=window)[None]
  tiles = tile_ids = None
  has_dense_partial = False
  classes = analytic
  if dense_mask is not None:
    dense = np.asarray(dense_mask, bool)
    if dense.ndim != 3 or dense.shape[1:] != (q_len, kv_len):
      raise ValueError(f"dense_mask shape {dense.shape} must be [heads_or_1, {q_len}, {kv_len}]")
    dcls = dense_layout(dense, block_q, block_k)
    if block_mask is not None:
      bm = np.asarray(block_mask)
      # It may be conservative (partial where the dense mask is empty or full), never wrong.
      if bm.shape == dcls.shape and (((bm == EMPTY) & (dcls != EMPTY)).any()
                                     or ((bm == FULL) & (dcls != FULL)).any()):
        raise ValueError(
            f"block_mask does not match dense_mask at block sizes ({block_q}, {block_k})")
    tiles, tile_ids = partial_tiles(dense, dcls, block_q, block_k)
    classes = combine(analytic, dcls)
    # Tiles that are visited and partial in the dense mask need the dense element mask.
    tile_ids = np.where(classes == EMPTY, 0, tile_ids).astype(np.int32)
    has_dense_partial = bool((tile_ids != 0).any())
  elif block_mask is not None:
    raise ValueError("block_mask needs the dense_mask it was made from (dense_mask=None)")
  nq, nk = classes.shape[1:]
  extra = ((0, 0), (0, (num_q_blocks or nq) - nq), (0, (num_k_blocks or nk) - nk))
  classes = np.pad(classes, extra)
  if tile_ids is not None:
    tile_ids = np.pad(tile_ids, extra)
  rows = compact(classes, tile_ids, transpose=False)
  cols = compact(classes, tile_ids, transpose=True)
  return KernelLayout(classes=classes, rows=rows, cols=cols, tiles=tiles,
                      has_dense_partial=has_dense_partial)
