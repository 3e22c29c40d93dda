"""Normalisation layers: RMSNorm and LayerNorm over the last axis."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from effx.layers.initializers import partitioned


class RMSNorm(nn.Module):
  """Root-mean-square norm: `x / rms(x) * scale`.

  Statistics are computed in float32 whatever the input dtype.

  Attributes:
    epsilon: added to the mean square before the square root.
    dtype: output dtype (None keeps the input dtype).
    param_dtype: dtype of `scale` ([features], logical axis "norm").
    use_scale: learn a per-feature scale (initialised to 1).
  """

  epsilon: float = 1e-6
  dtype: jnp.dtype | None = None
  param_dtype: jnp.dtype = jnp.float32
  use_scale: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [..., features] -> [..., features]."""
    dtype = self.dtype or x.dtype
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.epsilon)
    if self.use_scale:
      scale = self.param("scale", partitioned(nn.initializers.ones, ("norm",)), (x.shape[-1],),
                         self.param_dtype)
      y = y * scale.astype(jnp.float32)
    return y.astype(dtype)


class LayerNorm(nn.Module):
  """LayerNorm: `(x - mean) / std * scale + bias`, statistics in float32.

  Attributes:
    epsilon: added to the variance.
    dtype: output dtype (None keeps the input dtype).
    param_dtype: dtype of `scale` and `bias` ([features], logical axis "norm").
    use_bias: learn an additive bias.
  """

  epsilon: float = 1e-6
  dtype: jnp.dtype | None = None
  param_dtype: jnp.dtype = jnp.float32
  use_bias: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [..., features] -> [..., features]."""
    dtype = self.dtype or x.dtype
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon)
    scale = self.param("scale", partitioned(nn.initializers.ones, ("norm",)), (x.shape[-1],),
                       self.param_dtype)
    y = y * scale.astype(jnp.float32)
    if self.use_bias:
      bias = self.param("bias", partitioned(nn.initializers.zeros, ("norm",)), (x.shape[-1],),
                        self.param_dtype)
      y = y + bias.astype(jnp.float32)
    return y.astype(dtype)


NORMS = {"rmsnorm": RMSNorm, "layernorm": LayerNorm}


def make_norm(kind: str, **kwargs) -> nn.Module:
  """Returns the norm module named `kind` ("rmsnorm" or "layernorm")."""
  if kind not in NORMS:
    raise ValueError(f"norm: unknown kind {kind!r}; allowed: {sorted(NORMS)}")
  return NORMS[kind](**kwargs)
