"""Static attention masks: composable objects with dense arrays and block layouts.

A mask is a frozen (hashable) dataclass describing which key positions a query position may
attend to. Positions are absolute token positions, so one mask object serves training
(positions 0..T-1), decode against a cache (query position = cache length) and draft trees
(positions = length + depth). Every mask offers three views:

* ``mask(q_pos, kv_pos) -> bool [batch, heads_or_1, Tq, Tk]`` from int32 ``q_pos [batch, Tq]``
  and ``kv_pos [batch, Tk]``; traceable ``jnp`` code (use it under ``jit``).
* ``mask.dense(q_len, kv_len) -> np.ndarray bool [heads_or_1, q_len, kv_len]`` with query
  positions ``0..q_len-1`` and key positions ``0..kv_len-1`` (no end-alignment: for a decode
  view against a cache call the mask with real positions instead).
* ``mask.block_layout(q_len, kv_len, block_q, block_k) -> np.ndarray int8 [heads_or_1, nq, nk]``
  over the same positions, ``nq = ceil(q_len / block_q)``: ``EMPTY`` (0) where the tile is
  entirely False, ``FULL`` (2) where entirely True, ``PARTIAL`` (1) otherwise. The last tile
  of each axis is clipped at the length. Layouts are exact and computed without building the
  ``[q_len, kv_len]`` array: masks that depend only on ``d = q - k`` (causal, windows,
  strided, full) use prefix sums over ``d``; global tokens, segment ids and block-structured
  masks (block-sparse, BigBird's random blocks) have closed forms; tiles left ambiguous by a
  composition (e.g. partial & partial) are evaluated tile by tile in bounded chunks.

``heads_or_1`` is 1 for head-shared masks (``num_heads is None``) and ``num_heads`` for
per-head masks (``StridedMask``, ``PerHeadMask``, a 3-D ``BlockSparseMask``). ``a & b``,
``a | b`` and ``~a`` compose masks; a per-head mask combined with a head-shared one broadcasts
over heads, two per-head masks must agree on ``num_heads``.

Masks do NOT include causality unless they say so: an LM uses ``CausalMask() & other``.
Segment (document) separation is data: ``segment_mask`` builds it from ids under ``jit``;
``SegmentMask`` wraps concrete numpy ids for dense arrays and block layouts.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np

EMPTY, PARTIAL, FULL = 0, 1, 2
_UNKNOWN = -1  # internal: tile state not decided analytically; refined by evaluation.
_CHUNK_ELEMENTS = 1 << 22  # elements evaluated at once when refining ambiguous tiles.

__all__ = [
    "EMPTY", "PARTIAL", "FULL", "Mask", "AndMask", "OrMask", "NotMask", "FullMask",
    "CausalMask", "SlidingWindowMask", "GlobalTokensMask", "LocalGlobalMask", "StridedMask",
    "BlockSparseMask", "BigBirdMask", "PerHeadMask", "SegmentMask", "segment_mask",
]


def _check_int(owner: str, name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{owner}.{name}={value!r}: must be an int >= {minimum}")


def _merge_heads(a: int | None, b: int | None, owner: str) -> int | None:
    if a is None:
        return b
    if b is None or a == b:
        return a
    raise ValueError(f"{owner}: num_heads {a} and {b} differ; per-head masks combined with "
                     "& or | must have the same num_heads (or one must be head-shared)")


def _tile_bounds(n: int, block: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """First and last (inclusive) index of each of the n tiles of size block over length."""
    start = np.arange(n, dtype=np.int64) * block
    return start, np.minimum(start + block, length) - 1


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class Mask:
    """Base class. Subclasses provide ``num_heads`` and ``_eval`` (and optionally the fast
    paths ``_diagonal``/``_on_diff`` and ``_layout``)."""

    num_heads: int | None
    # True for masks that are a function of d = q - k only (then _on_diff is defined).
    _diagonal: bool = False

    # ---- to implement -------------------------------------------------------------------
    def _eval(self, q: Any, k: Any, xp: Any) -> Any:
        """q: int [..., 1, Tq, 1], k: int [..., 1, 1, Tk] (numpy or jax) -> bool array
        broadcastable to [..., heads_or_1, Tq, Tk]. Must be elementwise in (q, k)."""
        if self._diagonal:
            return self._on_diff(q - k, xp)
        raise NotImplementedError

    def _on_diff(self, d: Any, xp: Any) -> Any:
        """d = q - k: int [..., 1, A, B] -> bool broadcastable to [..., heads_or_1, A, B]."""
        raise NotImplementedError

    def _layout(self, q_len: int, kv_len: int, bq: int, bk: int) -> np.ndarray:
        """int8 broadcastable to [heads_or_1, nq, nk] with EMPTY/PARTIAL/FULL or _UNKNOWN."""
        if self._diagonal:
            return self._diag_layout(q_len, kv_len, bq, bk)
        return np.full((1, _cdiv(q_len, bq), _cdiv(kv_len, bk)), _UNKNOWN, np.int8)

    # ---- public API ---------------------------------------------------------------------
    @property
    def is_relative(self) -> bool:
        """True if the mask depends only on ``q - k`` (causal, windows, strided, full and their
        compositions). Then the index-based ``block_layout`` is also valid for positions that
        are the index plus a per-row or per-document offset (packed documents with segment
        ids, cache offsets): e.g. ``blockwise_attention(static_layout=mask.is_relative)``."""
        return bool(self._diagonal)

    @property
    def _h1(self) -> int:
        return 1 if self.num_heads is None else self.num_heads

    def __call__(self, q_pos: Any, kv_pos: Any) -> jnp.ndarray:
        """bool [batch, heads_or_1, Tq, Tk] from int q_pos [batch, Tq], kv_pos [batch, Tk]."""
        q_pos, kv_pos = jnp.asarray(q_pos), jnp.asarray(kv_pos)
        if q_pos.ndim != 2 or kv_pos.ndim != 2 or q_pos.shape[0] != kv_pos.shape[0]:
            raise ValueError(f"{type(self).__name__}: q_pos {q_pos.shape} and kv_pos "
                             f"{kv_pos.shape} must be [batch, Tq] and [batch, Tk]")
        out = self._eval(q_pos[:, None, :, None], kv_pos[:, None, None, :], jnp)
        shape = (q_pos.shape[0], self._h1, q_pos.shape[1], kv_pos.shape[1])
        return jnp.broadcast_to(jnp.asarray(out, bool), shape)

    def dense(self, q_len: int, kv_len: int) -> np.ndarray:
        """bool [heads_or_1, q_len, kv_len] for positions 0..q_len-1 and 0..kv_len-1."""
        _check_int(type(self).__name__ + ".dense", "q_len", q_len, 0)
        _check_int(type(self).__name__ + ".dense", "kv_len", kv_len, 0)
        q = np.arange(q_len, dtype=np.int64)[None, :, None]
        k = np.arange(kv_len, dtype=np.int64)[None, None, :]
        out = self._eval(q, k, np)
        return np.array(np.broadcast_to(out, (self._h1, q_len, kv_len)), dtype=bool)

    def block_layout(self, q_len: int, kv_len: int, block_q: int, block_k: int) -> np.ndarray:
        """int8 [heads_or_1, ceil(q_len/block_q), ceil(kv_len/block_k)]: 0 empty, 1 partial,
        2 full, for positions 0..q_len-1 and 0..kv_len-1 (last tiles clipped)."""
        owner = type(self).__name__ + ".block_layout"
        for name, value in (("q_len", q_len), ("kv_len", kv_len), ("block_q", block_q),
                            ("block_k", block_k)):
            _check_int(owner, name, value, 1)
        nq, nk = _cdiv(q_len, block_q), _cdiv(kv_len, block_k)
        layout = np.array(np.broadcast_to(self._layout(q_len, kv_len, block_q, block_k),
                                          (self._h1, nq, nk)), dtype=np.int8)
        unknown = layout == _UNKNOWN
        if unknown.any():
            self._refine(layout, unknown, q_len, kv_len, block_q, block_k)
        return layout

    def __and__(self, other: Mask) -> Mask:
        if not isinstance(other, Mask):
            return NotImplemented
        return AndMask(self, other)

    def __or__(self, other: Mask) -> Mask:
        if not isinstance(other, Mask):
            return NotImplemented
        return OrMask(self, other)

    def __invert__(self) -> Mask:
        return NotMask(self)

    # ---- helpers --------------------------------------------------------------------------
    def _diag_layout(self, q_len: int, kv_len: int, bq: int, bk: int) -> np.ndarray:
        # Every d in [q0 - k1, q1 - k0] occurs in the tile, so prefix sums over d are exact.
        d = np.arange(-(kv_len - 1), q_len, dtype=np.int64)
        allowed = np.broadcast_to(self._on_diff(d[None, None, :], np), (self._h1, 1, d.size))
        csum = np.zeros((self._h1, d.size + 1), np.int64)
        np.cumsum(allowed[:, 0, :], axis=-1, out=csum[:, 1:])
        q0, q1 = _tile_bounds(_cdiv(q_len, bq), bq, q_len)
        k0, k1 = _tile_bounds(_cdiv(kv_len, bk), bk, kv_len)
        lo = q0[:, None] - k1[None, :] + kv_len - 1
        hi = q1[:, None] - k0[None, :] + kv_len - 1
        count = csum[:, hi + 1] - csum[:, lo]
        return np.where(count == 0, EMPTY, np.where(count == hi - lo + 1, FULL, PARTIAL)
                        ).astype(np.int8)

    def _refine(self, layout: np.ndarray, unknown: np.ndarray, q_len: int, kv_len: int,
                bq: int, bk: int) -> None:
        tiles = np.argwhere(unknown.any(axis=0))
        per_chunk = max(1, _CHUNK_ELEMENTS // (self._h1 * bq * bk))
        # Indices past the end are clamped to the last row/column: duplicates change neither
        # "any" nor "all", so clipped edge tiles need no validity mask.
        for s in range(0, len(tiles), per_chunk):
            i, j = tiles[s:s + per_chunk, 0], tiles[s:s + per_chunk, 1]
            q = np.minimum(i[:, None] * bq + np.arange(bq), q_len - 1)
            k = np.minimum(j[:, None] * bk + np.arange(bk), kv_len - 1)
            vals = np.broadcast_to(self._eval(q[:, None, :, None], k[:, None, None, :], np),
                                   (len(i), self._h1, bq, bk))
            state = np.where(~vals.any(axis=(-1, -2)), EMPTY,
                             np.where(vals.all(axis=(-1, -2)), FULL, PARTIAL)).T
            layout[:, i, j] = np.where(unknown[:, i, j], state, layout[:, i, j])


class _SharedMask(Mask):
    """Head-shared mask (``num_heads`` is None)."""

    @property
    def num_heads(self) -> None:
        return None


# ---- composition -----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class AndMask(Mask):
    """Allowed where both ``left`` and ``right`` allow."""

    left: Mask
    right: Mask

    def __post_init__(self) -> None:
        _merge_heads(self.left.num_heads, self.right.num_heads, "AndMask")

    @property
    def num_heads(self) -> int | None:
        return _merge_heads(self.left.num_heads, self.right.num_heads, "AndMask")

    @property
    def _diagonal(self) -> bool:  # type: ignore[override]
        return self.left._diagonal and self.right._diagonal

    def _eval(self, q, k, xp):
        return self.left._eval(q, k, xp) & self.right._eval(q, k, xp)

    def _on_diff(self, d, xp):
        return self.left._on_diff(d, xp) & self.right._on_diff(d, xp)

    def _layout(self, q_len, kv_len, bq, bk):
        if self._diagonal:
            return self._diag_layout(q_len, kv_len, bq, bk)
        a, b = (m._layout(q_len, kv_len, bq, bk) for m in (self.left, self.right))
        a, b = np.broadcast_arrays(a, b)
        out = np.full(a.shape, _UNKNOWN, np.int8)  # partial & partial may be empty
        out[(a == FULL) & (b == FULL)] = FULL
        out[(a == FULL) & (b == PARTIAL) | (a == PARTIAL) & (b == FULL)] = PARTIAL
        out[(a == EMPTY) | (b == EMPTY)] = EMPTY
        return out


@dataclasses.dataclass(frozen=True)
class OrMask(Mask):
    """Allowed where ``left`` or ``right`` allows."""

    left: Mask
    right: Mask

    def __post_init__(self) -> None:
        _merge_heads(self.left.num_heads, self.right.num_heads, "OrMask")

    @property
    def num_heads(self) -> int | None:
        return _merge_heads(self.left.num_heads, self.right.num_heads, "OrMask")

    @property
    def _diagonal(self) -> bool:  # type: ignore[override]
        return self.left._diagonal and self.right._diagonal

    def _eval(self, q, k, xp):
        return self.left._eval(q, k, xp) | self.right._eval(q, k, xp)

    def _on_diff(self, d, xp):
        return self.left._on_diff(d, xp) | self.right._on_diff(d, xp)

    def _layout(self, q_len, kv_len, bq, bk):
        if self._diagonal:
            return self._diag_layout(q_len, kv_len, bq, bk)
        a, b = (m._layout(q_len, kv_len, bq, bk) for m in (self.left, self.right))
        a, b = np.broadcast_arrays(a, b)
        out = np.full(a.shape, _UNKNOWN, np.int8)  # partial | partial may be full
        out[(a == EMPTY) & (b == EMPTY)] = EMPTY
        out[(a == EMPTY) & (b == PARTIAL) | (a == PARTIAL) & (b == EMPTY)] = PARTIAL
        out[(a == FULL) | (b == FULL)] = FULL
        return out


@dataclasses.dataclass(frozen=True)
class NotMask(Mask):
    """Allowed where ``mask`` forbids."""

    mask: Mask

    @property
    def num_heads(self) -> int | None:
        return self.mask.num_heads

    @property
    def _diagonal(self) -> bool:  # type: ignore[override]
        return self.mask._diagonal

    def _eval(self, q, k, xp):
        return ~xp.asarray(self.mask._eval(q, k, xp), dtype=bool)

    def _on_diff(self, d, xp):
        return ~xp.asarray(self.mask._on_diff(d, xp), dtype=bool)

    def _layout(self, q_len, kv_len, bq, bk):
        a = self.mask._layout(q_len, kv_len, bq, bk)
        return np.where(a == _UNKNOWN, _UNKNOWN, np.where(a == PARTIAL, PARTIAL, FULL - a)
                        ).astype(np.int8)


class _Composite(Mask):
    """A named mask defined by a composition stored in ``_impl``."""

    _impl: Mask

    def _set_impl(self, impl: Mask) -> None:
        object.__setattr__(self, "_impl", impl)

    @property
    def num_heads(self) -> int | None:
        return self._impl.num_heads

    @property
    def _diagonal(self) -> bool:  # type: ignore[override]
        return self._impl._diagonal

    def _eval(self, q, k, xp):
        return self._impl._eval(q, k, xp)

    def _on_diff(self, d, xp):
        return self._impl._on_diff(d, xp)

    def _layout(self, q_len, kv_len, bq, bk):
        return self._impl._layout(q_len, kv_len, bq, bk)


# ---- masks that depend on d = q - k only -----------------------------------------------------

@dataclasses.dataclass(frozen=True)
class FullMask(_SharedMask):
    """Every position attends to every position."""

    _diagonal = True

    def _on_diff(self, d, xp):
        return xp.ones(d.shape, dtype=bool)


@dataclasses.dataclass(frozen=True)
class CausalMask(_SharedMask):
    """Allowed iff ``k <= q`` (key position not after the query position)."""

    _diagonal = True

    def _on_diff(self, d, xp):
        return d >= 0


@dataclasses.dataclass(frozen=True)
class SlidingWindowMask(_SharedMask):
    """Allowed iff ``0 <= q - k < window``: the query and the ``window - 1`` keys before it.

    Already causal; ``CausalMask() & SlidingWindowMask(w)`` is the same mask (and is the
    spelling the contracts use)."""

    window: int
    _diagonal = True

    def __post_init__(self) -> None:
        _check_int("SlidingWindowMask", "window", self.window, 1)

    def _on_diff(self, d, xp):
        return (d >= 0) & (d < self.window)


@dataclasses.dataclass(frozen=True)
class StridedMask(Mask):
    """Per-head strided (dilated) shards, S2-Attention style.

    Head ``h`` allows ``(q - k) mod stride == h mod stride`` (floor modulo, so this holds for
    keys before and after the query) or ``0 <= q - k < local_window``. Not causal by itself:
    use ``CausalMask() & StridedMask(...)``. With ``num_heads >= stride`` the heads' union
    covers every key (with causal: the whole causal context). ``local_window=1`` (default)
    lets every query see itself, so no causal row is empty; ``0`` disables the local part.
    """

    stride: int
    num_heads: int
    local_window: int = 1
    _diagonal = True

    def __post_init__(self) -> None:
        _check_int("StridedMask", "stride", self.stride, 1)
        _check_int("StridedMask", "num_heads", self.num_heads, 1)
        _check_int("StridedMask", "local_window", self.local_window, 0)

    def _on_diff(self, d, xp):
        h = xp.arange(self.num_heads).reshape(self.num_heads, 1, 1)
        return (xp.remainder(d - h, self.stride) == 0) | ((d >= 0) & (d < self.local_window))


# ---- global tokens ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class GlobalTokensMask(_SharedMask):
    """The first ``num_global`` positions attend and are attended everywhere:
    allowed iff ``k < num_global or q < num_global`` (not causal by itself)."""

    num_global: int

    def __post_init__(self) -> None:
        _check_int("GlobalTokensMask", "num_global", self.num_global, 1)

    def _eval(self, q, k, xp):
        return (q < self.num_global) | (k < self.num_global)

    def _layout(self, q_len, kv_len, bq, bk):
        g = self.num_global
        q0, q1 = _tile_bounds(_cdiv(q_len, bq), bq, q_len)
        k0, k1 = _tile_bounds(_cdiv(kv_len, bk), bk, kv_len)
        full = (q1[:, None] < g) | (k1[None, :] < g)
        empty = (q0[:, None] >= g) & (k0[None, :] >= g)
        return np.where(full, FULL, np.where(empty, EMPTY, PARTIAL)).astype(np.int8)[None]


@dataclasses.dataclass(frozen=True)
class LocalGlobalMask(_Composite):
    """``SlidingWindowMask(window) | GlobalTokensMask(num_global)`` (Longformer-style local +
    global). Not causal by itself (global queries see everything): AND it with CausalMask."""

    window: int
    num_global: int
    _impl: Mask = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_int("LocalGlobalMask", "window", self.window, 1)
        _check_int("LocalGlobalMask", "num_global", self.num_global, 1)
        self._set_impl(SlidingWindowMask(self.window) | GlobalTokensMask(self.num_global))


# ---- block-structured masks ------------------------------------------------------------------

class _BlockMask(Mask):
    """A mask constant on ``block_size x block_size`` tiles: ``_coarse(q // bs, k // bs)``."""

    block_size: int

    def _coarse(self, qb, kb, xp):
        raise NotImplementedError

    def _eval(self, q, k, xp):
        return self._coarse(xp.floor_divide(q, self.block_size),
                            xp.floor_divide(k, self.block_size), xp)

    def _layout(self, q_len, kv_len, bq, bk):
        # Each coarse cell a tile overlaps contributes at least one element to it, so the tile
        # is empty/full iff the overlapped coarse cells are; 2-D prefix sums count them.
        bs = self.block_size
        nqb, nkb = _cdiv(q_len, bs), _cdiv(kv_len, bs)
        coarse = np.broadcast_to(
            self._coarse(np.arange(nqb)[None, :, None], np.arange(nkb)[None, None, :], np),
            (self._h1, nqb, nkb))
        csum = np.zeros((self._h1, nqb + 1, nkb + 1), np.int64)
        csum[:, 1:, 1:] = coarse.cumsum(axis=1).cumsum(axis=2)
        q0, q1 = _tile_bounds(_cdiv(q_len, bq), bq, q_len)
        k0, k1 = _tile_bounds(_cdiv(kv_len, bk), bk, kv_len)
        r0, r1 = (q0 // bs)[:, None], (q1 // bs + 1)[:, None]
        c0, c1 = (k0 // bs)[None, :], (k1 // bs + 1)[None, :]
        count = csum[:, r1, c1] - csum[:, r0, c1] - csum[:, r1, c0] + csum[:, r0, c0]
        area = (r1 - r0) * (c1 - c0)
        return np.where(count == 0, EMPTY, np.where(count == area, FULL, PARTIAL)
                        ).astype(np.int8)


@dataclasses.dataclass(frozen=True, eq=False)
class BlockSparseMask(_BlockMask):
    """A user block layout at ``block_size`` granularity.

    ``layout`` is either a bool/int array ``[nqb, nkb]`` (head-shared) or ``[heads, nqb, nkb]``
    (per-head; nonzero = allowed; blocks outside the array are forbidden), or a callable
    ``layout(q_block, kv_block) -> bool`` applied elementwise to integer block indices. The
    callable must work on numpy and jax arrays alike (use operators such as ``==``, ``%``,
    ``&``, not ``np.*`` functions) and is head-shared.
    """

    layout: Any
    block_size: int

    def __post_init__(self) -> None:
        _check_int("BlockSparseMask", "block_size", self.block_size, 1)
        if not callable(self.layout):
            arr = np.array(self.layout) != 0
            if arr.ndim not in (2, 3) or 0 in arr.shape:
                raise ValueError(f"BlockSparseMask.layout shape {arr.shape}: must be a "
                                 "non-empty [nqb, nkb] or [heads, nqb, nkb] array or a callable")
            arr.setflags(write=False)
            object.__setattr__(self, "layout", arr)

    @property
    def num_heads(self) -> int | None:
        if callable(self.layout) or self.layout.ndim == 2:
            return None
        return self.layout.shape[0]

    def _key(self) -> tuple:
        if callable(self.layout):
            return (self.layout, self.block_size)
        return (self.layout.shape, self.layout.tobytes(), self.block_size)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BlockSparseMask) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def _coarse(self, qb, kb, xp):
        if callable(self.layout):
            return xp.asarray(self.layout(qb, kb), dtype=bool)
        arr = xp.asarray(self.layout)
        nqb, nkb = arr.shape[-2:]
        valid = (qb >= 0) & (qb < nqb) & (kb >= 0) & (kb < nkb)
        qc, kc = xp.clip(qb, 0, nqb - 1), xp.clip(kb, 0, nkb - 1)
        if arr.ndim == 2:
            return arr[qc, kc] & valid
        h = xp.arange(arr.shape[0]).reshape(arr.shape[0], 1, 1)
        return arr[h, qc, kc] & valid


def _mix32(x: Any, xp: Any) -> Any:
    """A 32-bit integer hash (uint32 -> uint32), identical in numpy and jax."""
    x = x ^ (x >> xp.uint32(16))
    x = x * xp.uint32(0x7FEB352D)
    x = x ^ (x >> xp.uint32(15))
    x = x * xp.uint32(0x846CA68B)
    return x ^ (x >> xp.uint32(16))


@dataclasses.dataclass(frozen=True)
class _RandomBlocksMask(_BlockMask):
    """Query block ``qb`` sees ``num_random_blocks`` key blocks drawn (with replacement) from
    ``0..qb`` by a seeded hash of (seed, qb, draw index)."""

    num_random_blocks: int
    block_size: int
    seed: int

    @property
    def num_heads(self) -> None:
        return None

    def _coarse(self, qb, kb, xp):
        qb = xp.maximum(xp.asarray(qb), 0)
        qu = qb.astype(xp.uint32) * xp.uint32(0x85EBCA6B)
        out = xp.zeros(np.broadcast_shapes(qb.shape, kb.shape), dtype=bool)
        for i in range(self.num_random_blocks):
            salt = _mix32(np.asarray([(self.seed * 0x9E3779B1 + i * 0x632BE59B + 0x2545F491)
                                      & 0xFFFFFFFF], np.uint32), np)[0]
            pick = _mix32(qu ^ xp.uint32(salt), xp) % (qb + 1).astype(xp.uint32)
            out = out | (kb == pick.astype(kb.dtype))
        return out


@dataclasses.dataclass(frozen=True)
class BigBirdMask(_Composite):
    """BigBird: sliding window | global tokens | random key blocks.

    Allowed iff ``0 <= q - k < window`` or ``q < num_global`` or ``k < num_global`` or
    ``k // block_size`` is one of the ``num_random_blocks`` key blocks drawn for query block
    ``q // block_size``. The draws are a deterministic hash of ``(seed, query block, draw)``
    among blocks ``0..q // block_size`` (past and current; with replacement, so a row may get
    fewer distinct blocks), so the mask needs no length and is identical for every sequence
    length, under jit and in numpy. Not causal by itself: use ``CausalMask() & BigBirdMask``.
    """

    window: int
    num_global: int
    num_random_blocks: int
    block_size: int
    seed: int = 0
    _impl: Mask = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_int("BigBirdMask", "window", self.window, 1)
        _check_int("BigBirdMask", "num_global", self.num_global, 0)
        _check_int("BigBirdMask", "num_random_blocks", self.num_random_blocks, 0)
        _check_int("BigBirdMask", "block_size", self.block_size, 1)
        _check_int("BigBirdMask", "seed", self.seed, 0)
        impl: Mask = SlidingWindowMask(self.window)
        if self.num_global:
            impl = impl | GlobalTokensMask(self.num_global)
        if self.num_random_blocks:
            impl = impl | _RandomBlocksMask(self.num_random_blocks, self.block_size, self.seed)
        self._set_impl(impl)


# ---- per-head stacking -----------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class PerHeadMask(Mask):
    """Stacks masks along the head axis: head-shared members take one head each, per-head
    members their ``num_heads``; ``num_heads`` is the total."""

    masks: tuple[Mask, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "masks", tuple(self.masks))
        if not self.masks or not all(isinstance(m, Mask) for m in self.masks):
            raise ValueError(f"PerHeadMask.masks={self.masks!r}: must be a non-empty tuple of "
                             "Mask objects")

    @property
    def num_heads(self) -> int:
        return sum(m._h1 for m in self.masks)

    @property
    def _diagonal(self) -> bool:  # type: ignore[override]
        return all(m._diagonal for m in self.masks)

    def _stack(self, parts, base_shape, xp):
        return xp.concatenate(
            [xp.broadcast_to(p, base_shape[:-3] + (m._h1,) + base_shape[-2:])
             for m, p in zip(self.masks, parts)], axis=-3)

    def _eval(self, q, k, xp):
        base = np.broadcast_shapes(q.shape, k.shape)
        return self._stack([m._eval(q, k, xp) for m in self.masks], base, xp)

    def _on_diff(self, d, xp):
        return self._stack([m._on_diff(d, xp) for m in self.masks], d.shape, xp)

    def _layout(self, q_len, kv_len, bq, bk):
        shape = (_cdiv(q_len, bq), _cdiv(kv_len, bk))
        return np.concatenate(
            [np.broadcast_to(m._layout(q_len, kv_len, bq, bk), (m._h1,) + shape)
             for m in self.masks], axis=0)


# ---- segments (data) -------------------------------------------------------------------------

def segment_mask(q_segment_ids: Any, kv_segment_ids: Any) -> jnp.ndarray:
    """bool [batch, 1, Tq, Tk]: same document and not padding.

    q_segment_ids: int [batch, Tq], kv_segment_ids: int [batch, Tk]; 0 marks padding, which
    attends to nothing and is attended by nothing (padding query rows are empty)."""
    q = jnp.asarray(q_segment_ids)[:, None, :, None]
    k = jnp.asarray(kv_segment_ids)[:, None, None, :]
    return (q == k) & (q != 0)


@dataclasses.dataclass(frozen=True, eq=False)
class SegmentMask(_SharedMask):
    """Document mask for ONE sequence from concrete ids (for dense arrays / block layouts).

    q_segment_ids: int [Tq], kv_segment_ids: int [Tk] (defaults to the query ids). Position
    ``p`` has id ``ids[p]``; positions outside the arrays count as padding (id 0). Allowed iff
    ids are equal and nonzero. Under jit with batched ids use ``segment_mask`` instead."""

    q_segment_ids: Any
    kv_segment_ids: Any = None

    def __post_init__(self) -> None:
        q = np.array(self.q_segment_ids, dtype=np.int64)
        k = q if self.kv_segment_ids is None else np.array(self.kv_segment_ids, dtype=np.int64)
        for name, arr in (("q_segment_ids", q), ("kv_segment_ids", k)):
            if arr.ndim != 1 or arr.size == 0:
                raise ValueError(f"SegmentMask.{name} shape {arr.shape}: must be a non-empty "
                                 "1-D int array (one sequence)")
        q.setflags(write=False)
        k.setflags(write=False)
        object.__setattr__(self, "q_segment_ids", q)
        object.__setattr__(self, "kv_segment_ids", k)

    def _key(self) -> tuple:
        return (self.q_segment_ids.tobytes(), self.kv_segment_ids.tobytes())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SegmentMask) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    @staticmethod
    def _lookup(ids: np.ndarray, pos: Any, xp: Any) -> Any:
        arr = xp.asarray(ids, dtype=xp.int32)
        inside = (pos >= 0) & (pos < ids.size)
        return xp.where(inside, arr[xp.clip(pos, 0, ids.size - 1)], 0)

    def _eval(self, q, k, xp):
        sq = self._lookup(self.q_segment_ids, q, xp)
        sk = self._lookup(self.kv_segment_ids, k, xp)
        return (sq == sk) & (sq != 0)

    @staticmethod
    def _tile_stats(ids: np.ndarray, length: int, block: int):
        n = _cdiv(length, block)
        pos = np.minimum(np.arange(n * block), length - 1)  # clamp: duplicates are harmless
        t = np.where(pos < ids.size, ids[np.minimum(pos, ids.size - 1)], 0).reshape(n, block)
        big = np.iinfo(np.int64).max
        lo = np.where(t == 0, big, t).min(axis=1)
        hi = np.where(t == 0, -big, t).max(axis=1)
        return lo, hi, (t == 0).any(axis=1), (t == 0).all(axis=1)

    def _layout(self, q_len, kv_len, bq, bk):
        qlo, qhi, qzero, qpad = self._tile_stats(self.q_segment_ids, q_len, bq)
        klo, khi, kzero, kpad = self._tile_stats(self.kv_segment_ids, kv_len, bk)
        empty = (qpad[:, None] | kpad[None, :] | (qhi[:, None] < klo[None, :])
                 | (khi[None, :] < qlo[:, None]))
        full = ((~qzero & (qlo == qhi))[:, None] & (~kzero & (klo == khi))[None, :]
                & (qlo[:, None] == klo[None, :]))
        return np.where(empty, EMPTY, np.where(full, FULL, _UNKNOWN)).astype(np.int8)[None]
