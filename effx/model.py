"""DecoderLM: embed -> blocks -> final norm -> logits, returning the final hidden states too."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from effx.layers.embedding import Embed
from effx.layers.initializers import fan_in_normal, partitioned
from effx.layers.norms import make_norm

ModuleFactory = Callable[..., nn.Module]

REMAT_POLICIES: dict[str, Any] = {
    "none": None,  # no rematerialisation
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

# Variable collections that layers may write during apply; scanned layers stack them.
SOWN_COLLECTIONS = ("aux_loss", "metrics", "intermediates")
STATE_COLLECTIONS = ("moe_state", "constants")


@flax.struct.dataclass
class LMOutput:
  """What `DecoderLM.__call__` returns.

  Attributes:
    logits: [batch, seq, vocab] in float32.
    hidden: [batch, seq, embed] final hidden states (after the final norm, before the LM head),
      in the compute dtype; draft heads read these.
    cache: the updated decoding cache (None without one).
  """

  logits: jax.Array
  hidden: jax.Array
  cache: Any = None


class DecoderBlock(nn.Module):
  """Pre-norm residual block: x + attn(norm(x)); x + ffn(norm(x)).

  Attributes:
    attention: factory of an attention module following effx's attention interface
      (e.g. `functools.partial(MultiHeadAttention, num_heads=8)`); called with `dtype`,
      `param_dtype` and `name`.
    ffn: factory of a feed-forward module `y = ffn(x)` (dense `GatedMLP`, `MoEFeedForward`, ...).
    norm: "rmsnorm" or "layernorm".
    norm_epsilon: epsilon of both norms.
    dtype / param_dtype: compute and parameter dtypes handed to the children.
  """

  attention: ModuleFactory
  ffn: ModuleFactory
  norm: str = "rmsnorm"
  norm_epsilon: float = 1e-6
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def make_attention(self, **kwargs) -> nn.Module:
    return self.attention(dtype=self.dtype, param_dtype=self.param_dtype, **kwargs)

  def init_cache(self, batch: int, max_len: int, embed_dim: int) -> Any:
    """An empty cache of this block's attention (see the attention kind's `init_cache`)."""
    return self.make_attention(parent=None).init_cache(batch, max_len, embed_dim=embed_dim)

  @nn.compact
  def __call__(self, x, positions, segment_ids=None, cache=None, new_token_mask=None,
               deterministic: bool = True):
    """x: [batch, seq, embed] -> ([batch, seq, embed], new cache or None).

    `deterministic=False` (training) is handed to the FFN (MoE capacity factor, router jitter).
    """
    norm = functools.partial(make_norm, self.norm, epsilon=self.norm_epsilon, dtype=self.dtype,
                             param_dtype=self.param_dtype)
    h, cache = self.make_attention(name="attention")(
        norm(name="attention_norm")(x), positions, segment_ids=segment_ids, cache=cache,
        new_token_mask=new_token_mask)
    x = x + h
    ffn = self.ffn(dtype=self.dtype, param_dtype=self.param_dtype, name="ffn")
    x = x + ffn(norm(name="ffn_norm")(x), deterministic=deterministic)
    x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
    return x, cache


class BlockGroup(nn.Module):
  """One repeat of the layer pattern: the blocks of `pattern` applied in order."""

  pattern: Sequence[ModuleFactory]
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  deterministic: bool = True

  @nn.compact
  def __call__(self, x, caches, positions, segment_ids, new_token_mask):
    new_caches = []
    for i, factory in enumerate(self.pattern):
      cache = None if caches is None else caches[i]
      x, cache = factory(dtype=self.dtype, param_dtype=self.param_dtype, name=f"block_{i}")(
          x, positions, segment_ids, cache, new_token_mask, self.deterministic)
      new_caches.append(cache)
    return x, (None if caches is None else tuple(new_caches))


class DecoderLM(nn.Module):
  """A decoder-only language model.

  `layer_pattern` is the repeating unit of blocks (factories of `DecoderBlock`); the model has
  `num_layers` blocks, i.e. `num_layers // len(layer_pattern)` repeats of the unit. A uniform
  stack is a pattern of one block; "every 4th layer global attention" is a pattern of four.
  With `scan_layers` the repeats run under `nn.scan` (one compiled body; parameters stacked on
  a leading "layers" axis), each repeat rematerialised by `remat_policy`.

  Call: `model(tokens, positions=None, segment_ids=None, cache=None, new_token_mask=None)`
    tokens: int32 [batch, seq]; positions: int32 [batch, seq] (default 0..seq-1, or the cache
    length onwards when a cache is given); segment_ids: int32 [batch, seq] for packed documents;
    cache: from `init_cache`; new_token_mask: bool [batch, seq, seq] (a draft tree's mask);
    deterministic: False in training (MoE train capacity factor and router jitter).
    Returns `LMOutput(logits [batch, seq, vocab] f32, hidden [batch, seq, embed], cache)`.

  Attributes:
    vocab_size: output classes (and embedding rows).
    embed_dim: residual width.
    num_layers: number of blocks; a multiple of len(layer_pattern).
    layer_pattern: the repeating unit of block factories.
    tie_embeddings: reuse the embedding table as the output projection.
    final_norm: "rmsnorm" or "layernorm".
    norm_epsilon: epsilon of the final norm.
    scan_layers: scan the repeats (fast compiles, stacked params) or unroll them.
    remat_policy: one of REMAT_POLICIES ("none", "full", "dots", "dots_no_batch").
    dtype: compute dtype (e.g. bfloat16); param_dtype: parameter dtype (e.g. float32).
  """

  vocab_size: int
  embed_dim: int
  num_layers: int
  layer_pattern: Sequence[ModuleFactory]
  tie_embeddings: bool = False
  final_norm: str = "rmsnorm"
  norm_epsilon: float = 1e-6
  scan_layers: bool = True
  remat_policy: str = "none"
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def __post_init__(self):
    object.__setattr__(self, "layer_pattern", tuple(self.layer_pattern))  # hashable for jit
    if self.vocab_size <= 0:
      raise ValueError(f"model.vocab_size: got {self.vocab_size}; must be > 0")
    if self.embed_dim <= 0:
      raise ValueError(f"model.embed_dim: got {self.embed_dim}; must be > 0")
    if not self.layer_pattern:
      raise ValueError("model.layer_pattern: empty; give at least one block")
    if self.num_layers <= 0 or self.num_layers % len(self.layer_pattern):
      raise ValueError(f"model.num_layers: got {self.num_layers}; must be a positive multiple of "
                       f"len(layer_pattern)={len(self.layer_pattern)}")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"model.remat_policy: got {self.remat_policy!r}; allowed: "
                       f"{sorted(REMAT_POLICIES)}")
    for name in ("dtype", "param_dtype"):
      try:
        jnp.dtype(getattr(self, name))
      except TypeError:
        raise ValueError(f"model.{name}: got {getattr(self, name)!r}; must be a dtype such as "
                         "jnp.float32 or jnp.bfloat16") from None
    for factory in self.layer_pattern:  # widths the attention kinds cannot split
      block = factory(parent=None)
      attention = block.make_attention(parent=None)
      check = getattr(attention, "resolved_head_dim", None)
      if check is not None:
        check(self.embed_dim)
      block.ffn(parent=None)  # the FFN's own field checks (e.g. MoE top_k), before any compute
    super().__post_init__()

  @property
  def num_repeats(self) -> int:
    return self.num_layers // len(self.layer_pattern)

  def init_cache(self, batch: int, max_len: int) -> tuple:
    """Empty decoding caches: a tuple over pattern positions, each stacked over repeats."""
    caches = []
    for factory in self.layer_pattern:
      block = factory(dtype=self.dtype, param_dtype=self.param_dtype, parent=None)
      one = block.init_cache(batch, max_len, self.embed_dim)
      caches.append(jax.tree.map(lambda a: jnp.broadcast_to(a, (self.num_repeats,) + a.shape),
                                 one))
    return tuple(caches)

  def _group(self) -> type[nn.Module]:
    group = BlockGroup
    policy = self.remat_policy
    if policy != "none":
      group = nn.remat(group, policy=REMAT_POLICIES[policy], prevent_cse=not self.scan_layers)
    return group

  @nn.compact
  def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None, cache: tuple | None = None,
               new_token_mask: jax.Array | None = None, deterministic: bool = True) -> LMOutput:
    if tokens.ndim != 2:
      raise ValueError(f"DecoderLM: tokens must be [batch, seq], got shape {tokens.shape}")
    if positions is None:
      start = jnp.zeros((tokens.shape[0],), jnp.int32) if cache is None else cache_length(cache)
      positions = start[:, None] + jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
    embed = Embed(self.vocab_size, self.embed_dim, dtype=self.dtype,
                  param_dtype=self.param_dtype, name="embed")
    x = embed(tokens)
    x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
    group = self._group()
    if self.scan_layers:
      scanned = nn.scan(
          group,
          variable_axes={c: 0 for c in ("params",) + SOWN_COLLECTIONS + STATE_COLLECTIONS},
          split_rngs={"params": True, "dropout": True, "router": True},
          in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
          length=self.num_repeats,
          metadata_params={nn.PARTITION_NAME: "layers"})
      x, cache = scanned(tuple(self.layer_pattern), self.dtype, self.param_dtype, deterministic,
                         name="layers")(
          x, cache, positions, segment_ids, new_token_mask)
    else:
      new_caches = []
      for r in range(self.num_repeats):
        caches_r = None if cache is None else jax.tree.map(lambda a: a[r], cache)
        x, caches_r = group(tuple(self.layer_pattern), self.dtype, self.param_dtype,
                            deterministic, name=f"repeat_{r}")(x, caches_r, positions, segment_ids,
                                                new_token_mask)
        new_caches.append(caches_r)
      if cache is not None:
        cache = jax.tree.map(lambda *a: jnp.stack(a), *new_caches)
    hidden = make_norm(self.final_norm, epsilon=self.norm_epsilon, dtype=self.dtype,
                       param_dtype=self.param_dtype, name="final_norm")(x)
    if self.tie_embeddings:
      logits = embed.attend(hidden)
    else:
      logits = nn.Dense(self.vocab_size, use_bias=False, dtype=self.dtype,
                        param_dtype=self.param_dtype,
                        kernel_init=partitioned(fan_in_normal(), ("embed", "vocab")),
                        name="lm_head")(hidden)
    return LMOutput(logits=logits.astype(jnp.float32), hidden=hidden, cache=cache)


def cache_length(cache: tuple) -> jax.Array:
  """int32 [batch]: the number of tokens in a model cache (read from its first layer)."""
  return cache[0].length[0]


def set_cache_length(cache: tuple, length: jax.Array) -> tuple:
  """Returns the model cache with every layer's length set to `length` (int32 [batch])."""
  return tuple(c.replace(length=jnp.broadcast_to(length, c.length.shape)) for c in cache)


def commit_cache(cache: tuple, start: jax.Array, accepted: jax.Array,
                 num_accepted: jax.Array) -> tuple:
  """Applies each layer cache's `commit` (see docs/contracts.md) over the stacked repeats."""
  return tuple(jax.vmap(lambda c: c.commit(start, accepted, num_accepted))(c) for c in cache)


def count_params(params: Any) -> int:
  """Total number of parameter scalars in a (possibly boxed) parameter tree."""
  return sum(x.size for x in jax.tree.leaves(nn.unbox(params)))


def block(attention: ModuleFactory, ffn: ModuleFactory, **kwargs) -> ModuleFactory:
  """A `DecoderBlock` factory: `block(partial(MultiHeadAttention, ...), partial(GatedMLP, ...))`."""
  return functools.partial(DecoderBlock, attention=attention, ffn=ffn, **kwargs)


__all__ = ["DecoderLM", "DecoderBlock", "LMOutput", "block", "cache_length", "set_cache_length",
           "commit_cache", "count_params", "REMAT_POLICIES"]
