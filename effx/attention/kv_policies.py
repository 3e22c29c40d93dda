"""Decode-time KV-cache sparsity under a fixed budget: StreamingLLM, H2O, Double Sparsity,
DuoAttention. Pure functions over a cache's keys, values and scores.

Two forms:

* **Keep-masks over a fixed-size cache** (``KVCache`` layout: slot ``j`` holds position ``j``,
  ``length`` valid slots). A policy returns ``keep: bool [batch, 1 | kv_heads | heads,
  max_len]`` and ``kept_attention`` (or ``blockwise_attention(kv_mask=keep)``) attends only to
  kept slots. Exact for studying a policy's quality, but saves no memory: every slot stays
  allocated.
* **Compacting caches** (``CompactKVCache``) for StreamingLLM and H2O: exactly ``budget`` slots
  per KV head with static shapes, each holding its token's position (``pos``, -1 = empty) and
  H2O's accumulated attention (``score``). A decode step is
  ``out, mass_cache, mass_new = compact_attention(q, k_new, v_new, cache)`` (the new tokens
  attend to the kept tokens and, causally, to each other) followed by
  ``streaming_update(...)`` or ``h2o_update(...)`` which evicts down to the budget. This is the
  real memory saving: cache memory is ``budget`` instead of ``max_len``.

Keys are cached with rotary already applied at their original positions (no StreamingLLM
position re-indexing). Attention "mass" is the softmax probability a key receives, summed over
the queries of the step and the query heads sharing its KV head (H2O's accumulated score).
GQA convention: query head ``h`` reads KV head ``h // (heads // kv_heads)``.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
from jax import lax

from effx.attention.masks import CausalMask, GlobalTokensMask, Mask, PerHeadMask, \
    SlidingWindowMask

__all__ = [
    "CompactKVCache", "compact_attention", "streaming_update", "h2o_update", "kept_attention",
    "streaming_keep_mask", "h2o_keep_mask", "double_sparsity_channels",
    "double_sparsity_scores", "double_sparsity_keep_mask", "duo_keep_mask",
    "duo_attention_mask", "accumulate_mass",
]


def _check_int(owner: str, name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{owner}.{name}={value!r}: must be an int >= {minimum}")


def _masked_softmax_attention(q, k, v, allowed, sm_scale):
    """q [b, T, h, d]; k, v [b, L, kvh, d]; allowed bool broadcastable to [b, kvh, g, T, L].

    Returns out [b, T, h, dv] (empty rows 0) and probs float32 [b, kvh, g, T, L]."""
    b, t, h, d = q.shape
    kvh = k.shape[2]
    g = h // kvh
    scale = d ** -0.5 if sm_scale is None else sm_scale
    s = jnp.einsum("bqkgd,bskd->bkgqs", q.reshape(b, t, kvh, g, d), k,
                   preferred_element_type=jnp.float32) * scale
    allowed = jnp.broadcast_to(allowed, s.shape)
    s = jnp.where(allowed, s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0)))
    denom = p.sum(axis=-1, keepdims=True)
    p = p / jnp.where(denom == 0, 1.0, denom)
    out = jnp.einsum("bkgqs,bskd->bqkgd", p.astype(v.dtype), v,
                     preferred_element_type=jnp.float32)
    return out.reshape(b, t, h, v.shape[-1]).astype(q.dtype), p


def _expand_heads(mask: jax.Array, kvh: int, h: int) -> jax.Array:
    """[b, 1 | kvh | h, ...] -> broadcastable [b, kvh|1, g|1, ...]."""
    n = mask.shape[1]
    if n == 1:
        return mask[:, :, None]
    if n == kvh:
        return mask[:, :, None]
    if n == h:
        return mask.reshape(mask.shape[0], kvh, h // kvh, *mask.shape[2:])
    raise ValueError(f"keep-mask head axis {n}: must be 1, kv_heads={kvh} or heads={h}")


# ---- fixed-size cache + keep-mask ----------------------------------------------------------------

def kept_attention(q: jax.Array, k: jax.Array, v: jax.Array, keep: jax.Array, *,
                   sm_scale: float | None = None) -> tuple[jax.Array, jax.Array]:
    """Dense attention of a few new queries to the kept slots of a fixed-size cache.

    Args:
      q: [batch, T, heads, head_dim] (decode: T = 1).
      k, v: [batch, max_len, kv_heads, head_dim] cache after the new tokens were written.
      keep: bool [batch, 1 | kv_heads | heads, max_len], or with a query axis
        [batch, 1 | kv_heads | heads, T, max_len] (e.g. causal among T > 1 new tokens).

    Returns:
      out [batch, T, heads, head_dim] (rows with nothing kept are 0) and the attention mass
      per slot float32 [batch, kv_heads, max_len] (summed over queries and group heads).
    """
    kvh, h = k.shape[2], q.shape[2]
    keep = _expand_heads(jnp.asarray(keep, bool), kvh, h)
    if keep.ndim == 4:
        keep = keep[:, :, :, None, :]
    out, p = _masked_softmax_attention(q, k, v, keep, sm_scale)
    return out, p.sum(axis=(2, 3))


def accumulate_mass(scores: jax.Array, mass: jax.Array) -> jax.Array:
    """H2O bookkeeping: scores [batch, kv_heads, max_len] += mass of this step."""
    return scores + mass


def streaming_keep_mask(length: jax.Array, max_len: int, *, num_sinks: int,
                        window: int) -> jax.Array:
    """StreamingLLM: the first ``num_sinks`` tokens plus the ``window`` most recent ones.

    length: int32 [batch] valid slots (after writing the new token). Returns bool
    [batch, 1, max_len]: ``j < length and (j < num_sinks or j >= length - window)``; exactly
    ``min(length, num_sinks + window)`` slots per row."""
    _check_int("streaming_keep_mask", "num_sinks", num_sinks, 0)
    _check_int("streaming_keep_mask", "window", window, 1)
    j = jnp.arange(max_len)[None, :]
    length = jnp.asarray(length)[:, None]
    keep = (j < length) & ((j < num_sinks) | (j >= length - window))
    return keep[:, None, :]


def _top_priority(priority: jax.Array, count: int) -> jax.Array:
    """bool, same shape: the ``count`` largest finite-or-+inf entries along the last axis
    (ties -> lower index), never -inf entries."""
    count = min(count, priority.shape[-1])
    if count == 0:
        return jnp.zeros(priority.shape, bool)
    vals, idx = lax.top_k(priority, count)
    chosen = jnp.zeros(priority.shape, bool)
    chosen = jnp.put_along_axis(chosen, idx, vals > -jnp.inf, axis=-1, inplace=False)
    return chosen


def h2o_keep_mask(scores: jax.Array, candidates: jax.Array, length: jax.Array, *,
                  num_heavy: int, num_recent: int) -> jax.Array:
    """H2O (heavy hitters + recent) as a keep-mask over a fixed-size cache.

    Args:
      scores: float [batch, kv_heads, max_len] accumulated attention mass per slot.
      candidates: bool [batch, kv_heads, max_len] slots still eligible: the previous keep-mask
        OR the slots written since (greedy eviction: an evicted slot never returns).
      length: int32 [batch] valid slots.

    Returns:
      bool [batch, kv_heads, max_len]: the ``num_recent`` slots ``length-num_recent ..
      length-1`` plus the ``num_heavy`` highest-scoring other candidates; exactly
      ``min(#candidates, num_heavy + num_recent)`` per row and head.
    """
    _check_int("h2o_keep_mask", "num_heavy", num_heavy, 0)
    _check_int("h2o_keep_mask", "num_recent", num_recent, 0)
    j = jnp.arange(scores.shape[-1])
    length = jnp.asarray(length)[:, None, None]
    cand = candidates & (j < length)
    recent = cand & (j >= length - num_recent)
    priority = jnp.where(recent, jnp.inf, jnp.where(cand, scores.astype(jnp.float32), -jnp.inf))
    return _top_priority(priority, num_heavy + num_recent)


def double_sparsity_channels(q_calib: jax.Array, k_calib: jax.Array,
                             num_channels: int) -> jax.Array:
    """Offline channel choice: per query head, the ``num_channels`` channels with the largest
    mean ``|q_c * k_c|`` over all calibration (query, key) pairs, i.e.
    ``mean|q_c| * mean|k_c|``.

    q_calib: [N, heads, head_dim]; k_calib: [M, kv_heads, head_dim]. Returns int32
    [heads, num_channels], ascending channel order."""
    h, d = q_calib.shape[-2:]
    kvh = k_calib.shape[-2]
    _check_int("double_sparsity_channels", "num_channels", num_channels, 1)
    if num_channels > d or h % kvh:
        raise ValueError(f"double_sparsity_channels: num_channels={num_channels} must be <= "
                         f"head_dim={d} and heads={h} a multiple of kv_heads={kvh}")
    qa = jnp.abs(q_calib.reshape(-1, h, d)).mean(axis=0)
    ka = jnp.repeat(jnp.abs(k_calib.reshape(-1, kvh, d)).mean(axis=0), h // kvh, axis=0)
    _, idx = lax.top_k(qa * ka, num_channels)
    return jnp.sort(idx, axis=-1).astype(jnp.int32)


def double_sparsity_scores(q: jax.Array, k: jax.Array, channels: jax.Array) -> jax.Array:
    """Approximate logits from a channel subset: q [batch, heads, head_dim] (one decode query),
    k [batch, max_len, kv_heads, head_dim], channels int32 [heads, r] -> float32
    [batch, heads, max_len] = sum over c in channels[h] of q[h, c] * k[kv(h), c]."""
    b, h, d = q.shape
    kvh = k.shape[2]
    qs = jnp.take_along_axis(q, jnp.broadcast_to(channels, (b,) + channels.shape), axis=-1)
    kh = jnp.repeat(k, h // kvh, axis=2)  # [b, L, h, d]
    ks = jnp.take_along_axis(kh, jnp.broadcast_to(channels[None, None], kh.shape[:3] +
                                                  channels.shape[-1:]), axis=-1)
    return jnp.einsum("bhr,blhr->bhl", qs, ks, preferred_element_type=jnp.float32)


def double_sparsity_keep_mask(q: jax.Array, k: jax.Array, length: jax.Array,
                              channels: jax.Array, *, top_k: int) -> jax.Array:
    """Double Sparsity: per query head, the ``top_k`` valid slots with the largest
    approximate logits (``double_sparsity_scores``). q: [batch, heads, head_dim]; returns
    bool [batch, heads, max_len] with exactly ``min(length, top_k)`` slots per row and head.

    The memory-access saving of the method comes from a small "label cache" of the chosen
    key channels; here the channels are gathered from the full cache (same selection)."""
    _check_int("double_sparsity_keep_mask", "top_k", top_k, 1)
    scores = double_sparsity_scores(q, k, channels)
    valid = jnp.arange(k.shape[1]) < jnp.asarray(length)[:, None, None]
    return _top_priority(jnp.where(valid, scores, -jnp.inf), top_k)


def duo_keep_mask(length: jax.Array, max_len: int, retrieval_heads: jax.Array, *,
                  num_sinks: int, window: int) -> jax.Array:
    """DuoAttention: retrieval heads keep the whole cache, streaming heads sinks + window.

    retrieval_heads: bool [kv_heads] (found offline). Returns bool [batch, kv_heads, max_len]."""
    stream = streaming_keep_mask(length, max_len, num_sinks=num_sinks, window=window)
    full = (jnp.arange(max_len) < jnp.asarray(length)[:, None])[:, None, :]
    return jnp.where(jnp.asarray(retrieval_heads, bool)[None, :, None], full, stream)


def duo_attention_mask(retrieval_heads: tuple[bool, ...], num_sinks: int, window: int,
                       group_size: int = 1) -> Mask:
    """The same DuoAttention split as a static per-head Mask for training/prefill: query heads
    of a retrieval KV head get ``CausalMask()``, the others ``CausalMask() & (window | sinks)``;
    each KV-head entry is repeated ``group_size`` times (query heads per KV head)."""
    _check_int("duo_attention_mask", "window", window, 1)
    _check_int("duo_attention_mask", "num_sinks", num_sinks, 0)
    _check_int("duo_attention_mask", "group_size", group_size, 1)
    local: Mask = SlidingWindowMask(window)
    if num_sinks:
        local = local | GlobalTokensMask(num_sinks)
    streaming = CausalMask() & local
    return PerHeadMask(tuple(CausalMask() if r else streaming
                             for r in retrieval_heads for _ in range(group_size)))


# ---- compacting caches -------------------------------------------------------------------------

@flax.struct.dataclass
class CompactKVCache:
    """A KV cache holding exactly ``budget`` tokens per KV head.

    Attributes:
      k, v: [batch, budget, kv_heads, head_dim].
      pos: int32 [batch, kv_heads, budget] position of the token in each slot, -1 = empty.
      score: float32 [batch, kv_heads, budget] accumulated attention mass (H2O; unused by
        StreamingLLM).
      length: int32 [batch] tokens seen so far (the next token's position).
    """

    k: jax.Array
    v: jax.Array
    pos: jax.Array
    score: jax.Array
    length: jax.Array

    @classmethod
    def create(cls, batch: int, budget: int, kv_heads: int, head_dim: int,
               dtype: jnp.dtype = jnp.float32) -> "CompactKVCache":
        _check_int("CompactKVCache", "budget", budget, 1)
        shape = (batch, budget, kv_heads, head_dim)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   pos=jnp.full((batch, kv_heads, budget), -1, jnp.int32),
                   score=jnp.zeros((batch, kv_heads, budget), jnp.float32),
                   length=jnp.zeros((batch,), jnp.int32))

    @property
    def budget(self) -> int:
        return self.k.shape[1]


def _new_positions(cache: CompactKVCache, t: int) -> jax.Array:
    return cache.length[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]  # [b, T]


def compact_attention(q: jax.Array, k_new: jax.Array, v_new: jax.Array, cache: CompactKVCache,
                      *, mask: Mask | None = None, sm_scale: float | None = None
                      ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Attention of T new tokens (positions ``length .. length+T-1``) to the kept tokens and,
    causally, to each other; call before the policy's update.

    Args:
      q: [batch, T, heads, head_dim]; k_new, v_new: [batch, T, kv_heads, head_dim].
      mask: optional head-shared static Mask evaluated on positions (e.g. the streaming rule
        ``SlidingWindowMask(w) | GlobalTokensMask(s)`` for exact StreamingLLM with T > 1).

    Returns:
      out [batch, T, heads, head_dim], mass on cache slots float32 [batch, kv_heads, budget],
      mass on the new tokens float32 [batch, kv_heads, T].
    """
    b, t = q.shape[:2]
    kvh = k_new.shape[2]
    new_pos = _new_positions(cache, t)
    kpos = jnp.concatenate([cache.pos, jnp.broadcast_to(new_pos[:, None], (b, kvh, t))], -1)
    allowed = (kpos[:, :, None, :] >= 0) & (kpos[:, :, None, :] <= new_pos[:, None, :, None])
    if mask is not None:
        if mask.num_heads is not None:
            raise ValueError(f"compact_attention.mask: must be head-shared, got num_heads="
                             f"{mask.num_heads}")
        pattern = jax.vmap(lambda kp: mask(new_pos, kp)[:, 0], in_axes=1, out_axes=1)(kpos)
        allowed = allowed & pattern
    k_all = jnp.concatenate([cache.k, k_new.astype(cache.k.dtype)], axis=1)
    v_all = jnp.concatenate([cache.v, v_new.astype(cache.v.dtype)], axis=1)
    out, p = _masked_softmax_attention(q, k_all.astype(q.dtype), v_all.astype(q.dtype),
                                       allowed[:, :, None], sm_scale)
    mass = p.sum(axis=(2, 3))
    return out, mass[..., :cache.budget], mass[..., cache.budget:]


def streaming_update(cache: CompactKVCache, k_new: jax.Array, v_new: jax.Array, *,
                     num_sinks: int, window: int) -> CompactKVCache:
    """StreamingLLM eviction: slots ``0..num_sinks-1`` hold the sinks, the rest is a ring of
    the ``window`` most recent tokens (position p >= num_sinks lives in slot
    ``num_sinks + (p - num_sinks) % window``). budget must be ``num_sinks + window``.

    k_new, v_new: [batch, T, kv_heads, head_dim] at positions ``length .. length+T-1``."""
    _check_int("streaming_update", "num_sinks", num_sinks, 0)
    _check_int("streaming_update", "window", window, 1)
    if cache.budget != num_sinks + window:
        raise ValueError(f"streaming_update: cache budget {cache.budget} must equal "
                         f"num_sinks + window = {num_sinks + window}")
    b, t, kvh, _ = k_new.shape
    p = _new_positions(cache, t)
    end = cache.length[:, None] + t
    keep = (p < num_sinks) | (p >= end - window)  # the survivors among the new tokens
    slot = jnp.where(p < num_sinks, p, num_sinks + (p - num_sinks) % window)
    slot = jnp.where(keep, slot, cache.budget)  # out of range -> dropped
    rows = jnp.arange(b)[:, None]
    k = cache.k.at[rows, slot].set(k_new.astype(cache.k.dtype), mode="drop")
    v = cache.v.at[rows, slot].set(v_new.astype(cache.v.dtype), mode="drop")
    pos = cache.pos.at[rows[:, :, None], jnp.arange(kvh)[None, None, :], slot[:, :, None]].set(
        jnp.broadcast_to(p[:, :, None], (b, t, kvh)), mode="drop")
    score = cache.score.at[rows[:, :, None], jnp.arange(kvh)[None, None, :],
                           slot[:, :, None]].set(0.0, mode="drop")
    return CompactKVCache(k=k, v=v, pos=pos, score=score, length=cache.length + t)


def h2o_update(cache: CompactKVCache, k_new: jax.Array, v_new: jax.Array, mass_cache: jax.Array,
               mass_new: jax.Array, *, num_heavy: int, num_recent: int) -> CompactKVCache:
    """H2O eviction: add this step's attention mass to the scores, then keep per KV head the
    ``num_recent`` most recent tokens and the ``num_heavy`` highest-scoring others among
    (kept tokens + new tokens). budget must be ``num_heavy + num_recent``.

    mass_cache [batch, kv_heads, budget], mass_new [batch, kv_heads, T] from
    ``compact_attention``."""
    _check_int("h2o_update", "num_heavy", num_heavy, 0)
    _check_int("h2o_update", "num_recent", num_recent, 0)
    budget = cache.budget
    if budget != num_heavy + num_recent:
        raise ValueError(f"h2o_update: cache budget {budget} must equal num_heavy + "
                         f"num_recent = {num_heavy + num_recent}")
    b, t, kvh, _ = k_new.shape
    new_pos = jnp.broadcast_to(_new_positions(cache, t)[:, None], (b, kvh, t))
    pos = jnp.concatenate([cache.pos, new_pos], axis=-1)  # [b, kvh, budget+T]
    score = jnp.concatenate([cache.score + mass_cache, mass_new], axis=-1)
    end = (cache.length + t)[:, None, None]
    valid = pos >= 0
    recent = valid & (pos >= end - num_recent)
    priority = jnp.where(recent, jnp.inf, jnp.where(valid, score, -jnp.inf))
    top, idx = lax.top_k(priority, budget)  # [b, kvh, budget]
    k_all = jnp.concatenate([cache.k, k_new.astype(cache.k.dtype)], axis=1)
    v_all = jnp.concatenate([cache.v, v_new.astype(cache.v.dtype)], axis=1)
    gather = lambda x: jnp.take_along_axis(x, idx.transpose(0, 2, 1)[..., None], axis=1)
    kept = top > -jnp.inf
    return CompactKVCache(
        k=gather(k_all), v=gather(v_all),
        pos=jnp.where(kept, jnp.take_along_axis(pos, idx, axis=-1), -1),
        score=jnp.where(kept, jnp.take_along_axis(score, idx, axis=-1), 0.0),
        length=cache.length + t)
