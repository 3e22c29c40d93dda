"""Memory-efficient blockwise attention in plain XLA (online softmax over key tiles).

The query axis is cut into tiles of ``block_q`` and the key axis into tiles of ``block_k``.
Each query tile runs the FlashAttention-2 forward recurrence (reference.md 2.4) over a static
list of key tiles; no ``[Tq, Tk]`` array is ever built, so memory is O(T) (the largest
temporaries are ``[batch, heads, block_q, block_k]`` score tiles).

Tile skipping, two layers:
* static: when positions are the sequence indices (``q_pos``/``kv_pos`` omitted, or
  ``static_layout=True``), ``mask.block_layout`` decides at trace time which key tiles each
  query tile visits; the per-query-tile lists are padded to the longest one. Causal visits
  ~half the tiles, a sliding window O(window / block_k) per query tile.
* dynamic: every visited tile evaluates its element mask (static mask at the given positions,
  segment ids, ``kv_mask``, key padding) and runs the matmuls under ``lax.cond`` only if some
  entry is allowed; padded list entries are skipped the same way. With traced positions
  (``static_layout=False``) every tile is visited but empty ones cost only the mask.

Differentiable by autodiff through the scans; the per-query-tile body is ``jax.checkpoint``-ed
so the backward pass keeps O(T) residuals. This is the XLA reference the Pallas kernels are
checked against (values, gradients and log-sum-exp).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from effx.attention.masks import FullMask, Mask

__all__ = ["blockwise_attention", "key_tile_lists"]


def key_tile_lists(mask: Mask, q_len: int, kv_len: int, block_q: int, block_k: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Static key-tile schedule from ``mask.block_layout`` (union over heads).

    Returns ``(index int32 [nq, C], valid bool [nq, C])``: query tile ``i`` visits key tiles
    ``index[i, s]`` for ``valid[i, s]``; ``C`` is the largest count (>= 1); padding repeats
    the last visited tile (or 0) and is marked invalid.
    """
    nonempty = (mask.block_layout(q_len, kv_len, block_q, block_k) > 0).any(axis=0)
    counts = nonempty.sum(axis=1)
    c = max(1, int(counts.max()))
    index = np.zeros((nonempty.shape[0], c), np.int32)
    valid = np.zeros((nonempty.shape[0], c), bool)
    for i, row in enumerate(nonempty):
        cols = np.flatnonzero(row)
        index[i, :cols.size] = cols
        index[i, cols.size:] = cols[-1] if cols.size else 0
        valid[i, :cols.size] = True
    return index, valid


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def blockwise_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask: Mask | None = None,
    q_pos: jax.Array | None = None,
    kv_pos: jax.Array | None = None,
    segment_ids: jax.Array | tuple[jax.Array, jax.Array] | None = None,
    kv_mask: jax.Array | None = None,
    block_q: int = 128,
    block_k: int = 128,
    sm_scale: float | None = None,
    logit_soft_cap: float | None = None,
    static_layout: bool | None = None,
    return_lse: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Softmax attention computed tile by tile, skipping masked-out key tiles.

    Args:
      q: [batch, q_len, heads, head_dim].
      k: [batch, kv_len, kv_heads, head_dim]; v: [batch, kv_len, kv_heads, v_dim];
        heads % kv_heads == 0 (query head h reads kv head h // (heads // kv_heads)).
      mask: static Mask (None = every key); a per-head mask needs num_heads == heads.
      q_pos, kv_pos: int32 [batch, q_len] / [batch, kv_len] positions the mask is evaluated
        at; default the indices 0..len-1.
      segment_ids: int32 [batch, T] (self-attention) or a pair (q_ids [batch, q_len],
        kv_ids [batch, kv_len]); equal nonzero ids attend, 0 = padding attends nothing.
      kv_mask: bool [batch, kv_len] or [batch, 1 or kv_heads or heads, kv_len]; False drops a key
        (unused cache slots, KV-cache eviction policies).
      block_q, block_k: tile sizes (clipped to the lengths; lengths need not be multiples).
      sm_scale: logit scale, default 1/sqrt(head_dim).
      logit_soft_cap: logits become cap * tanh(logits / cap).
      static_layout: use ``mask.block_layout`` over indices to skip tiles statically. Default:
        only when q_pos and kv_pos are omitted. Pass True with explicit positions only if every
        pair the mask allows at those positions also lies in a tile the index-based layout
        keeps; otherwise attention is silently dropped. ``static_layout=mask.is_relative`` is
        safe when positions are the index plus a per-row or per-document offset (packed
        documents whose positions restart, with segment ids separating them; cache offsets).
      return_lse: also return the log-sum-exp of the allowed logits.

    Returns:
      out [batch, q_len, heads, v_dim] in q's dtype (rows with no allowed key are 0), and
      with return_lse also lse float32 [batch, heads, q_len] (-inf for empty rows).
    """
    _check(q.ndim == 4 and k.ndim == 4 and v.ndim == 4,
           f"blockwise_attention: q, k, v must be 4-D, got {q.shape}, {k.shape}, {v.shape}")
    batch, q_len, heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    _check(k.shape[0] == batch and k.shape[3] == head_dim and v.shape[:3] == k.shape[:3],
           f"blockwise_attention: k {k.shape} / v {v.shape} do not match q {q.shape}")
    _check(q_len > 0 and kv_len > 0, f"blockwise_attention: empty q_len={q_len} or kv_len={kv_len}")
    _check(heads % kv_heads == 0,
           f"blockwise_attention: heads={heads} must be a multiple of kv_heads={kv_heads}")
    mask = FullMask() if mask is None else mask
    _check(mask.num_heads in (None, heads),
           f"blockwise_attention: mask.num_heads={mask.num_heads}; allowed None or heads={heads}")
    for name, value in (("block_q", block_q), ("block_k", block_k)):
        _check(isinstance(value, int) and value >= 1,
               f"blockwise_attention.{name}={value!r}: must be an int >= 1")
    if static_layout is None:
        static_layout = q_pos is None and kv_pos is None
    groups = heads // kv_heads
    v_dim = v.shape[3]
    bq, bk = min(block_q, q_len), min(block_k, kv_len)
    nq, nk = -(-q_len // bq), -(-kv_len // bk)
    scale = head_dim ** -0.5 if sm_scale is None else sm_scale

    # ---- per-token side inputs, padded to whole tiles --------------------------------------
    def positions(p, length, name):
        if p is None:
            return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
        p = jnp.asarray(p, jnp.int32)
        _check(p.shape == (batch, length),
               f"blockwise_attention.{name} shape {p.shape}: must be {(batch, length)}")
        return p

    def pad(x, length, axis=1):
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, length - x.shape[axis])
        return jnp.pad(x, widths)

    qp = pad(positions(q_pos, q_len, "q_pos"), nq * bq)
    kp = pad(positions(kv_pos, kv_len, "kv_pos"), nk * bk)
    key_ok = pad(jnp.ones((batch, kv_len), bool), nk * bk)  # [b, Tk_pad]; padding is False
    if kv_mask is not None:
        kv_mask = jnp.asarray(kv_mask, bool)
        _check(kv_mask.shape in ((batch, kv_len), (batch, 1, kv_len), (batch, kv_heads, kv_len),
                                 (batch, heads, kv_len)),
               f"blockwise_attention.kv_mask shape {kv_mask.shape}: must be [batch, kv_len] or "
               f"[batch, 1 or kv_heads or heads, kv_len] with kv_len={kv_len}")
        if kv_mask.ndim == 2:
            kv_mask = kv_mask[:, None, None, :]
        elif kv_mask.shape[1] == 1:
            kv_mask = kv_mask[:, :, None, :]
        else:
            kv_mask = kv_mask.reshape(batch, kv_heads, kv_mask.shape[1] // kv_heads, kv_len)
        key_ok = pad(kv_mask, nk * bk, axis=3) & pad(jnp.ones((batch, 1, 1, kv_len), bool),
                                                     nk * bk, axis=3)
    else:
        key_ok = key_ok[:, None, None, :]  # [b, 1|kvh, 1|g, Tk_pad]
    if segment_ids is not None:
        q_seg, kv_seg = (segment_ids if isinstance(segment_ids, (tuple, list))
                         else (segment_ids, segment_ids))
        q_seg, kv_seg = jnp.asarray(q_seg, jnp.int32), jnp.asarray(kv_seg, jnp.int32)
        _check(q_seg.shape == (batch, q_len) and kv_seg.shape == (batch, kv_len),
               f"blockwise_attention.segment_ids shapes {q_seg.shape}, {kv_seg.shape}: must be "
               f"{(batch, q_len)} and {(batch, kv_len)}")
        q_seg, kv_seg = pad(q_seg, nq * bq), pad(kv_seg, nk * bk)
    else:
        q_seg = kv_seg = None

    if static_layout:
        index, valid = key_tile_lists(mask, q_len, kv_len, bq, bk)
    else:
        index = np.broadcast_to(np.arange(nk, dtype=np.int32), (nq, nk))
        valid = np.ones((nq, nk), bool)

    # ---- tiles ------------------------------------------------------------------------------
    qt = pad(q, nq * bq).reshape(batch, nq, bq, kv_heads, groups, head_dim).swapaxes(0, 1)
    qpt = qp.reshape(batch, nq, bq).swapaxes(0, 1)
    qst = None if q_seg is None else q_seg.reshape(batch, nq, bq).swapaxes(0, 1)
    kpad, vpad = pad(k, nk * bk), pad(v, nk * bk)
    h1 = mask.num_heads or 1

    def tile_allowed(q_pos_t, q_seg_t, j):
        """bool broadcastable to [b, kvh, g, bq, bk] for key tile j."""
        start = j * bk
        kp_t = lax.dynamic_slice_in_dim(kp, start, bk, axis=1)
        allowed = mask(q_pos_t, kp_t)  # [b, h1, bq, bk]
        allowed = allowed.reshape(batch, kv_heads if h1 > 1 else 1, groups if h1 > 1 else 1,
                                  bq, bk)
        ok = lax.dynamic_slice_in_dim(key_ok, start, bk, axis=3)  # [b, ., ., bk]
        allowed = allowed & ok[:, :, :, None, :]
        if q_seg_t is not None:
            ks_t = lax.dynamic_slice_in_dim(kv_seg, start, bk, axis=1)
            same = (q_seg_t[:, :, None] == ks_t[:, None, :]) & (q_seg_t[:, :, None] != 0)
            allowed = allowed & same[:, None, None]
        return allowed

    def update(carry, q_t, j, allowed):
        o, m, l = carry
        start = j * bk
        k_t = lax.dynamic_slice_in_dim(kpad, start, bk, axis=1)
        v_t = lax.dynamic_slice_in_dim(vpad, start, bk, axis=1)
        s = jnp.einsum("bqhgd,bkhd->bhgqk", q_t, k_t,
                       preferred_element_type=jnp.float32) * scale
        if logit_soft_cap is not None:
            s = logit_soft_cap * jnp.tanh(s / logit_soft_cap)
        s = jnp.where(allowed, s, -jnp.inf)
        m_new = lax.stop_gradient(jnp.maximum(m, s.max(axis=-1)))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        p = jnp.exp(s - m_safe[..., None])
        alpha = jnp.exp(m - m_safe)
        l = alpha * l + p.sum(axis=-1)
        pv = jnp.einsum("bhgqk,bkhd->bqhgd", p.astype(v.dtype), v_t,
                        preferred_element_type=jnp.float32)
        o = jnp.moveaxis(alpha, -1, 1)[..., None] * o + pv
        return o, m_new, l

    def query_tile(q_t, q_pos_t, q_seg_t, idx_row, valid_row):
        init = (jnp.zeros((batch, bq, kv_heads, groups, v_dim), jnp.float32),
                jnp.full((batch, kv_heads, groups, bq), -jnp.inf, jnp.float32),
                jnp.zeros((batch, kv_heads, groups, bq), jnp.float32))

        def step(carry, xs):
            j, ok = xs
            allowed = tile_allowed(q_pos_t, q_seg_t, j)
            run = ok & allowed.any()
            carry = lax.cond(run, lambda c: update(c, q_t, j, allowed), lambda c: c, carry)
            return carry, None

        (o, m, l), _ = lax.scan(step, init, (idx_row, valid_row))
        out = o / jnp.moveaxis(jnp.where(l == 0, 1.0, l), -1, 1)[..., None]
        lse = jnp.where(l == 0, -jnp.inf, m + jnp.log(jnp.where(l == 0, 1.0, l)))
        return out.reshape(batch, bq, heads, v_dim).astype(q.dtype), lse.reshape(batch, heads, bq)

    body = jax.checkpoint(query_tile, prevent_cse=False)

    def outer(_, xs):
        return None, body(*xs)

    _, (out, lse) = lax.scan(outer, None, (qt, qpt, qst, jnp.asarray(index), jnp.asarray(valid)))
    out = out.swapaxes(0, 1).reshape(batch, nq * bq, heads, v_dim)[:, :q_len]
    if not return_lse:
        return out
    lse = jnp.moveaxis(lse, 0, 2).reshape(batch, heads, nq * bq)[:, :, :q_len]
    return out, lse
