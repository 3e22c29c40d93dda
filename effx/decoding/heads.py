"""Draft heads over a base model's last hidden state: Medusa, Hydra and Hydra++.

All heads read `hidden` [batch, embed] (the base model's final hidden state at the last
accepted position t, after its final norm) and score tokens further ahead:

- `MedusaHeads`: head k (0-based) predicts x_{t+k+2} from h_t alone (the base LM head predicts
  x_{t+1}). Each head is `num_blocks` residual blocks x + SiLU(W x + b) (W zero-initialised, so
  a new head starts as the identity) followed by its own LM head (or one shared by all heads).
- `HydraHeads`: head k predicts x_{t+k+2} from [h_t, e(x_{t+1}), ..., e(x_{t+k+1})], the
  embeddings (the base model's frozen input embedding table) of the tokens already speculated
  on its path, so tree nodes depend on their parents. Its first block is widened to
  (k+2)·embed inputs with a linear residual projection; each head has an LM head with bias.
- Hydra++ (`HydraHeads(prefix_layer=True, num_blocks=4)`): a prefix-attention decoder layer (+
  final norm) runs over the sequence of base hidden states with its own KV cache; heads read
  its output at position t instead of h_t.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from effx.attention.kv_cache import KVCache
from effx.attention.mha import MultiHeadAttention
from effx.layers.initializers import fan_in_normal, partitioned
from effx.layers.mlp import GatedMLP
from effx.layers.norms import RMSNorm
from effx.model import DecoderBlock


class ResidualBlock(nn.Module):
  """x + SiLU(W x + b) with W zero-initialised (the block starts as the identity).

  With `in_features` > width of the output (Hydra's widened first block) the residual goes
  through a linear projection: P x + SiLU(W x + b).

  Attributes:
    features: output width (the model width).
    dtype / param_dtype: compute and parameter dtypes.
  """

  features: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [..., in_features] -> [..., features]."""
    h = nn.Dense(self.features, dtype=self.dtype, param_dtype=self.param_dtype,
                 kernel_init=partitioned(nn.initializers.zeros, ("embed", None)),
                 bias_init=partitioned(nn.initializers.zeros, (None,)), name="linear")(x)
    if x.shape[-1] != self.features:
      x = nn.Dense(self.features, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                   kernel_init=partitioned(fan_in_normal(), ("embed", None)),
                   name="residual_proj")(x)
    return x + nn.silu(h)


class MedusaHeads(nn.Module):
  """K Medusa heads. `heads(hidden [..., embed]) -> logits [..., K, vocab]` (float32).

  Attributes:
    num_heads: K, the number of tokens drafted beyond the base model's own next token.
    vocab_size: output classes.
    num_blocks: residual blocks per head (independent weights).
    shared_lm_head: one LM head for all K heads instead of one each.
    dtype / param_dtype: compute and parameter dtypes.
  """

  num_heads: int
  vocab_size: int
  num_blocks: int = 1
  shared_lm_head: bool = False
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def __post_init__(self):
    if self.num_heads < 1:
      raise ValueError(f"MedusaHeads.num_heads: got {self.num_heads}; must be >= 1")
    if self.num_blocks < 0:
      raise ValueError(f"MedusaHeads.num_blocks: got {self.num_blocks}; must be >= 0")
    super().__post_init__()

  @nn.compact
  def __call__(self, hidden: jax.Array) -> jax.Array:
    width = hidden.shape[-1]
    lm = lambda name: nn.Dense(self.vocab_size, use_bias=False, dtype=self.dtype,
                               param_dtype=self.param_dtype,
                               kernel_init=partitioned(fan_in_normal(), ("embed", "vocab")),
                               name=name)
    shared = lm("lm_head") if self.shared_lm_head else None
    outs = []
    for k in range(self.num_heads):
      x = hidden.astype(self.dtype)
      for b in range(self.num_blocks):
        x = ResidualBlock(width, self.dtype, self.param_dtype, name=f"head_{k}_block_{b}")(x)
      outs.append((shared or lm(f"head_{k}_lm_head"))(x))
    return jnp.stack(outs, axis=-2).astype(jnp.float32)


class PrefixAttention(nn.Module):
  """Hydra++'s prefix layer: one decoder block + final norm over base hidden states.

  `layer(hidden [batch, T, embed], positions [batch, T], cache) -> (out [batch, T, embed], cache)`
  with causal attention over everything in `cache` plus the T new states.

  Attributes:
    num_heads: attention heads; mlp_dim: width of its SwiGLU MLP.
  """

  num_heads: int
  mlp_dim: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def block(self, **kwargs) -> DecoderBlock:
    return DecoderBlock(attention=functools.partial(MultiHeadAttention, num_heads=self.num_heads),
                        ffn=functools.partial(GatedMLP, hidden_dim=self.mlp_dim),
                        dtype=self.dtype, param_dtype=self.param_dtype, **kwargs)

  def init_cache(self, batch: int, max_len: int, embed_dim: int) -> KVCache:
    return self.block(parent=None).init_cache(batch, max_len, embed_dim)

  @nn.compact
  def __call__(self, hidden, positions, cache=None, segment_ids=None):
    x, cache = self.block(name="block")(hidden.astype(self.dtype), positions, segment_ids, cache)
    return RMSNorm(dtype=self.dtype, param_dtype=self.param_dtype, name="norm")(x), cache


class HydraHeads(nn.Module):
  """K sequentially dependent Hydra heads (Hydra++ with `prefix_layer=True`).

  `heads.head(k, hidden [N, embed], path_embeddings [N, k+1, embed]) -> logits [N, vocab]`
  scores x_{t+k+2} given h_t (or the prefix layer's output at t) and the embeddings of
  x_{t+1} .. x_{t+k+1}. `heads(hidden, path_embeddings [..., K, embed])` runs all heads with
  teacher forcing (training): logits [..., K, vocab] f32.

  Attributes:
    num_heads: K.
    vocab_size: output classes.
    embed_dim: the base model's width.
    num_blocks: residual blocks per head (the first widened to (k+2)·embed inputs).
    prefix_layer: Hydra++: heads read the output of `prefix_module()` instead of h_t.
    prefix_heads / prefix_mlp_dim: its size (mlp default 4·embed when 0).
    dropout: dropout rate on the block inputs during training (Hydra++: 0.2).
    dtype / param_dtype: compute and parameter dtypes.
  """

  num_heads: int
  vocab_size: int
  embed_dim: int
  num_blocks: int = 1
  prefix_layer: bool = False
  prefix_heads: int = 4
  prefix_mlp_dim: int = 0
  dropout: float = 0.0
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def __post_init__(self):
    if self.num_heads < 1:
      raise ValueError(f"HydraHeads.num_heads: got {self.num_heads}; must be >= 1")
    if self.num_blocks < 1:
      raise ValueError(f"HydraHeads.num_blocks: got {self.num_blocks}; must be >= 1")
    if not 0 <= self.dropout < 1:
      raise ValueError(f"HydraHeads.dropout: got {self.dropout}; must be in [0, 1)")
    super().__post_init__()

  def prefix_module(self, **kwargs) -> PrefixAttention:
    """The Hydra++ prefix layer (a separate module with its own parameters and KV cache)."""
    return PrefixAttention(self.prefix_heads, self.prefix_mlp_dim or 4 * self.embed_dim,
                           dtype=self.dtype, param_dtype=self.param_dtype, **kwargs)

  def setup(self):
    self.blocks = [[ResidualBlock(self.embed_dim, self.dtype, self.param_dtype, name=f"head_{k}_block_{b}")
                    for b in range(self.num_blocks)] for k in range(self.num_heads)]
    self.lm_heads = [nn.Dense(self.vocab_size, dtype=self.dtype, param_dtype=self.param_dtype,
                              kernel_init=partitioned(fan_in_normal(), ("embed", "vocab")),
                              bias_init=partitioned(nn.initializers.zeros, ("vocab",)),
                              name=f"head_{k}_lm_head") for k in range(self.num_heads)]
    self.drop = nn.Dropout(self.dropout)

  def head(self, k: int, hidden: jax.Array, path_embeddings: jax.Array,
           deterministic: bool = True) -> jax.Array:
    """Head k: hidden [..., E] and path_embeddings [..., k+1, E] -> logits [..., V] f32."""
    x = jnp.concatenate([hidden[..., None, :], path_embeddings], axis=-2).astype(self.dtype)
    x = x.reshape(x.shape[:-2] + (-1,))
    for block in self.blocks[k]:
      x = block(self.drop(x, deterministic=deterministic))
    return self.lm_heads[k](x).astype(jnp.float32)

  def __call__(self, hidden: jax.Array, path_embeddings: jax.Array,
               deterministic: bool = True) -> jax.Array:
    """Teacher-forced training: hidden [..., E], path_embeddings [..., K, E] -> [..., K, V]."""
    return jnp.stack([self.head(k, hidden, path_embeddings[..., :k + 1, :], deterministic)
                      for k in range(self.num_heads)], axis=-2)


def zero_prefix_branches(prefix_params: Any) -> Any:
  """Zeroes the prefix layer's attention-output and MLP-output kernels (unboxed params).

  The new layer then maps h to its final norm of h (nothing lost, the heads start where Hydra's
  do) and learns what attending over the prefix adds; a random block would first scramble h.
  """
  def zero(path, leaf):
    name = getattr(path[-1], "key", "")
    return jnp.zeros_like(leaf) if name in ("out_kernel", "wo") else leaf
  return jax.tree_util.tree_map_with_path(zero, nn.unbox(prefix_params))


def embedding_table(base_params: Any) -> jax.Array:
  """The base `DecoderLM`'s input embedding table [vocab, embed] (for Hydra's path inputs)."""
  return nn.unbox(base_params["embed"]["embedding"])


def lm_head_kernel(base_params: Any) -> jax.Array:
  """The base model's output projection as [embed, vocab] (tied or untied)."""
  if "lm_head" in base_params:
    return nn.unbox(base_params["lm_head"]["kernel"])
  return embedding_table(base_params).T


def init_lm_heads_from_base(head_params: Any, base_params: Any) -> Any:
  """Copies the base LM head into every draft head's LM head (Medusa's initialisation).

  Returns the (unboxed) head parameters with every `*lm_head/kernel` replaced.
  """
  kernel = lm_head_kernel(base_params)
  head_params = nn.unbox(head_params)

  def copy(path, leaf):
    names = [getattr(p, "key", "") for p in path]
    if any(n.endswith("lm_head") for n in names) and names[-1] == "kernel":
      return jnp.array(kernel, leaf.dtype, copy=True).reshape(leaf.shape)  # own buffer
    return leaf
  return jax.tree_util.tree_map_with_path(copy, head_params)
