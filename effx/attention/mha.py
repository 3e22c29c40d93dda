"""Multi-head softmax attention (MHA / GQA / MQA) behind the one attention interface."""

from __future__ import annotations

from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from effx.attention import masks as masks_lib
from effx.attention.dot_product import CONTRACTIONS, dot_product_attention
from effx.attention.kv_cache import KVCache
from effx.layers.initializers import fan_in_normal, partitioned
from effx.layers.rotary import RotaryConfig, apply_rotary

IMPLS = ("xla", "cudnn", "blockwise", "pallas")


def cache_attention_mask(start: jax.Array, max_len: int, new_token_mask: jax.Array,
                         static_mask: masks_lib.Mask | None, q_pos: jax.Array) -> jax.Array:
  """Which cache slots each new token may read, after the T new tokens were appended.

  Args:
    start: int32 [batch] cache length before the new tokens were written.
    max_len: number of cache slots.
    new_token_mask: bool [batch, T, T] which new tokens see which (causal or a tree).
    static_mask: the layer's static pattern (e.g. a sliding window), applied to old slots and
      new tokens alike (a new token's key position is its entry in `q_pos`).
    q_pos: int32 [batch, T] positions of the new tokens.

  Returns:
    bool [batch, 1 or heads, T, max_len].
  """
  t = new_token_mask.shape[-1]
  slots = jnp.arange(max_len, dtype=jnp.int32)
  old = slots[None, None, :] < start[:, None, None]  # [b, 1, L]
  offset = slots[None, :] - start[:, None]  # [b, L]
  in_new = (offset >= 0) & (offset < t)
  new = jnp.take_along_axis(new_token_mask, jnp.clip(offset, 0, t - 1)[:, None, :].repeat(t, 1),
                            axis=2) & in_new[:, None, :]
  allowed = (old & jnp.ones_like(new)) | new  # [b, T, L]
  allowed = allowed[:, None]
  if static_mask is not None:  # old slot j holds position j; new slots hold their q_pos
    new_pos = jnp.take_along_axis(q_pos, jnp.clip(offset, 0, t - 1), axis=1)
    kv_pos = jnp.where(in_new, new_pos, slots[None, :])
    allowed = allowed & static_mask(q_pos, kv_pos)
  return allowed


def _and_terms(mask: masks_lib.Mask) -> list[masks_lib.Mask]:
  """The conjuncts of a mask built with `&` (a single mask is its own only term)."""
  if isinstance(mask, masks_lib.AndMask):
    return _and_terms(mask.left) + _and_terms(mask.right)
  return [mask]


class MultiHeadAttention(nn.Module):
  """Softmax attention with grouped KV heads: MHA (kv_heads = heads), GQA, MQA (kv_heads = 1).

  Call: `y, cache = attn(x, positions, segment_ids=None, cache=None, new_token_mask=None)`.
    x: [batch, T, embed] in `dtype`; positions: int32 [batch, T].
    Without a cache: causal attention (plus `mask`) within the sequence; packed documents are
    kept apart by `segment_ids` int32 [batch, T]. Returns (y [batch, T, embed], None).
    With a `KVCache`: the T new tokens are appended at `cache.length`; each sees every old slot
    allowed by `mask` and the new tokens allowed by `new_token_mask` bool [batch, T, T]
    (default causal; a draft tree passes its tree mask and depth-based positions).
    Returns (y, cache with length += T).

  Attributes:
    num_heads: query heads.
    num_kv_heads: key/value heads (None = num_heads); must divide num_heads.
    head_dim: per-head width (None = embed // num_heads, which must divide).
    mask: static attention pattern over positions (default causal); e.g.
      `CausalMask() & SlidingWindowMask(256)`.
    rotary: positional encoding of q and k.
    impl: "xla" (dense masked softmax, the reference), "cudnn" (jax.nn.dot_product_attention
      fused path; causal/sliding-window only), "blockwise" (memory-efficient online softmax
      over key blocks that skips empty blocks), "pallas" (effx flash-attention kernel; cached
      calls with a plain causal mask and T <= 64 use the split-K decode-attention kernel).
    use_qkv_bias: biases on the q/k/v projections (Qwen2).
    logit_soft_cap: cap * tanh(logits / cap) if set.
    block_size: block size of the "blockwise" path.
    cache_contraction: how the XLA path of cached calls contracts q.k and p.v
      (`dot_product_attention`'s `contraction`: "auto", "einsum" or "broadcast").
    dtype / param_dtype: compute and parameter dtypes.
  """

  num_heads: int
  num_kv_heads: int | None = None
  head_dim: int | None = None
  mask: masks_lib.Mask = masks_lib.CausalMask()
  rotary: RotaryConfig = RotaryConfig()
  impl: str = "xla"
  use_qkv_bias: bool = False
  logit_soft_cap: float | None = None
  block_size: int = 512
  cache_contraction: str = "auto"
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  _impls: ClassVar[tuple[str, ...]] = IMPLS  # subclasses with more paths extend this

  def __post_init__(self):
    if self.num_heads <= 0:
      raise ValueError(f"attention.num_heads: got {self.num_heads}; must be > 0")
    kv = self.kv_heads
    if kv <= 0 or self.num_heads % kv:
      raise ValueError(f"attention.num_kv_heads: got {kv}; must be > 0 and divide "
                       f"num_heads={self.num_heads}")
    if self.impl not in self._impls:
      raise ValueError(f"attention.impl: got {self.impl!r}; allowed: {list(self._impls)}")
    if self.cache_contraction not in CONTRACTIONS:
      raise ValueError(f"attention.cache_contraction: got {self.cache_contraction!r}; allowed: "
                       f"{list(CONTRACTIONS)}")
    if self.head_dim is not None and self.head_dim <= 0:
      raise ValueError(f"attention.head_dim: got {self.head_dim}; must be > 0")
    super().__post_init__()

  @property
  def kv_heads(self) -> int:
    return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

  def resolved_head_dim(self, embed_dim: int) -> int:
    """Per-head width for an input of width `embed_dim`."""
    if self.head_dim is not None:
      return self.head_dim
    if embed_dim % self.num_heads:
      raise ValueError(f"attention.num_heads: {self.num_heads} does not divide the width "
                       f"{embed_dim}; set head_dim or change num_heads")
    return embed_dim // self.num_heads

  def init_cache(self, batch: int, max_len: int, embed_dim: int,
                 dtype: jnp.dtype | None = None) -> KVCache:
    """An empty KV cache for this layer: k/v [batch, max_len, kv_heads, head_dim]."""
    return KVCache.create(batch, max_len, self.kv_heads, self.resolved_head_dim(embed_dim),
                          dtype or self.dtype)

  def _projection_params(self, embed_dim: int, heads: int, head_axis: str, name: str
                         ) -> tuple[jax.Array, jax.Array | None]:
    """`{name}_kernel` [embed, heads, head_dim] and `{name}_bias` [heads, head_dim] or None."""
    head_dim = self.resolved_head_dim(embed_dim)
    kernel = self.param(f"{name}_kernel",
                        partitioned(fan_in_normal(), ("embed", head_axis, "head_dim")),
                        (embed_dim, heads, head_dim), self.param_dtype)
    bias = None
    if self.use_qkv_bias:
      bias = self.param(f"{name}_bias", partitioned(nn.initializers.zeros, (head_axis, "head_dim")),
                        (heads, head_dim), self.param_dtype)
    return kernel, bias

  def _project(self, x: jax.Array, heads: int, head_axis: str, name: str) -> jax.Array:
    """x [batch, T, embed] -> [batch, T, heads, head_dim] with kernel [embed, heads, head_dim]."""
    kernel, bias = self._projection_params(x.shape[-1], heads, head_axis, name)
    y = jnp.einsum("bte,ehd->bthd", x.astype(self.dtype), kernel.astype(self.dtype))
    if bias is not None:
      y = y + bias.astype(self.dtype)
    return y

  def _out_kernel(self, head_dim: int, embed_dim: int) -> jax.Array:
    """The output projection `out_kernel` [heads, head_dim, embed]."""
    return self.param("out_kernel", partitioned(fan_in_normal(), ("heads", "head_dim", "embed")),
                      (self.num_heads, head_dim, embed_dim), self.param_dtype)

  def _check_inputs(self, x: jax.Array, positions: jax.Array,
                    segment_ids: jax.Array | None = None) -> None:
    """One-line errors for the wrong ranks or dtypes, before any compute."""
    if x.ndim != 3:
      raise ValueError(f"attention: x must be [batch, seq, embed], got shape {x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise TypeError(f"attention: x must be a floating array, got dtype {x.dtype}")
    if positions.shape != x.shape[:2]:
      raise ValueError(f"attention: positions must be [batch, seq]={x.shape[:2]}, "
                       f"got {positions.shape}")
    if not jnp.issubdtype(positions.dtype, jnp.integer):
      raise TypeError(f"attention: positions must be integer (int32), got dtype "
                      f"{positions.dtype}")
    if segment_ids is not None and (segment_ids.shape != x.shape[:2]
                                    or not jnp.issubdtype(segment_ids.dtype, jnp.integer)):
      raise ValueError(f"attention: segment_ids must be int [batch, seq]={x.shape[:2]}, got "
                       f"{segment_ids.dtype} {segment_ids.shape}")

  @nn.compact
  def __call__(self, x: jax.Array, positions: jax.Array, *, segment_ids: jax.Array | None = None,
               cache: KVCache | None = None, new_token_mask: jax.Array | None = None
               ) -> tuple[jax.Array, KVCache | None]:
    self._check_inputs(x, positions, segment_ids)
    q = apply_rotary(self._project(x, self.num_heads, "heads", "query"), positions, self.rotary)
    k = apply_rotary(self._project(x, self.kv_heads, "kv_heads", "key"), positions, self.rotary)
    v = self._project(x, self.kv_heads, "kv_heads", "value")
    if cache is None:
      out = self._attend_sequence(q, k, v, positions, segment_ids)
      new_cache = None
    else:
      out, new_cache = self._attend_cache(q, k, v, positions, cache, new_token_mask)
    out_kernel = self._out_kernel(out.shape[-1], x.shape[-1])
    y = jnp.einsum("bthd,hde->bte", out.astype(self.dtype), out_kernel.astype(self.dtype))
    return y, new_cache

  def _attend_sequence(self, q, k, v, positions, segment_ids):
    if self.impl == "blockwise":
      from effx.attention.blockwise import blockwise_attention
      seg = None if segment_ids is None else (segment_ids, segment_ids)
      return blockwise_attention(q, k, v, mask=self.mask, q_pos=positions, kv_pos=positions,
                                 segment_ids=seg, block_q=self.block_size,
                                 block_k=self.block_size, logit_soft_cap=self.logit_soft_cap)
    if self.impl == "pallas":
      from effx.pallas_kernels.flash_attention import flash_attention
      return flash_attention(q, k, v, **self._kernel_mask_args(q.shape[1]),
                             segment_ids=None if segment_ids is None else (segment_ids,
                                                                           segment_ids),
                             logit_soft_cap=self.logit_soft_cap, impl="pallas")
    if self.impl == "cudnn" and segment_ids is None and self.logit_soft_cap is None:
      causal, window = self._causal_window()
      local = None if window is None else (window - 1, 0)
      return jax.nn.dot_product_attention(q, k, v, is_causal=causal, local_window_size=local)
    return dot_product_attention(q, k, v, self._sequence_mask(positions, segment_ids),
                                 logit_soft_cap=self.logit_soft_cap)

  def _sequence_mask(self, positions, segment_ids):
    allowed = self.mask(positions, positions)
    if segment_ids is not None:
      allowed = allowed & masks_lib.segment_mask(segment_ids, segment_ids)
    return allowed

  def _causal_window(self) -> tuple[bool, int | None]:
    """(causal, window) when `mask` is causal or causal & sliding window, else ValueError."""
    parts = _and_terms(self.mask)
    causal = any(isinstance(p, masks_lib.CausalMask) for p in parts)
    windows = [p.window for p in parts if isinstance(p, masks_lib.SlidingWindowMask)]
    if not causal or len(parts) != 1 + len(windows) or len(windows) > 1:
      raise ValueError(f"attention.impl: {self.impl!r} supports only causal or causal & sliding "
                       f"window masks, got {self.mask}")
    return causal, windows[0] if windows else None

  def _kernel_mask_args(self, seq_len: int) -> dict:
    try:
      causal, window = self._causal_window()
      return dict(causal=causal, window=window)
    except ValueError:
      return dict(causal=False, dense_mask=self.mask.dense(seq_len, seq_len))

  def _append_to_cache(self, k, v, positions, cache: KVCache, new_token_mask
                       ) -> tuple[KVCache, jax.Array]:
    """Appends the new k/v; returns (cache, allowed bool [batch, 1 or heads, T, max_len])."""
    batch, t = k.shape[:2]
    if new_token_mask is None:
      new_token_mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (batch, t, t))
    start = cache.length
    cache = cache.append(k, v)
    allowed = cache_attention_mask(start, cache.max_len, new_token_mask, self.mask, positions)
    return cache, allowed

  def _attend_cache(self, q, k, v, positions, cache: KVCache, new_token_mask):
    if self.impl == "pallas" and type(self.mask) is masks_lib.CausalMask and q.shape[1] <= 64:
      return self._attend_cache_kernel(q, k, v, positions, cache, new_token_mask)
    cache, allowed = self._append_to_cache(k, v, positions, cache, new_token_mask)
    out = dot_product_attention(q, cache.k.astype(q.dtype), cache.v.astype(q.dtype), allowed,
                                logit_soft_cap=self.logit_soft_cap,
                                contraction=self.cache_contraction)
    return out, cache

  def _attend_cache_kernel(self, q, k, v, positions, cache: KVCache, new_token_mask):
    """impl="pallas", plain causal mask, T <= 64: effx's split-K decode-attention kernel.

    Causality by position is folded into the new-token mask; every old slot is visible when each
    query position is >= length - 1 (the decode / tree convention, positions = length + depth),
    otherwise the XLA path runs (lax.cond), so the result is cache_attention_mask's either way.
    """
    from effx.pallas_kernels.decode_attention import decode_attention
    batch, t = q.shape[:2]
    if new_token_mask is None:
      new_token_mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (batch, t, t))
    start = cache.length
    cache = cache.append(k, v)
    ck, cv = cache.k.astype(q.dtype), cache.v.astype(q.dtype)
    by_position = positions[:, None, :] <= positions[:, :, None]

    def kernel():
      return decode_attention(q, ck, cv, start, new_token_mask & by_position,
                              logit_soft_cap=self.logit_soft_cap, impl="pallas")

    def xla():
      allowed = cache_attention_mask(start, cache.max_len, new_token_mask, self.mask, positions)
      return dot_product_attention(q, ck, cv, allowed, logit_soft_cap=self.logit_soft_cap,
                                   contraction=self.cache_contraction)

    return jax.lax.cond(jnp.all(positions >= start[:, None] - 1), kernel, xla), cache
