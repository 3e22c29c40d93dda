"""Dense feed-forward blocks: plain MLP and gated MLP (SwiGLU / GeGLU)."""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from effx.layers.initializers import fan_in_normal, partitioned

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": nn.gelu,
    "gelu_exact": lambda x: nn.gelu(x, approximate=False),
    "relu": nn.relu,
    "silu": nn.silu,
    "swish": nn.silu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
  """Looks up an activation by name; raises naming the allowed ones."""
  if name not in ACTIVATIONS:
    raise ValueError(f"activation: unknown name {name!r}; allowed: {sorted(ACTIVATIONS)}")
  return ACTIVATIONS[name]


class MLP(nn.Module):
  """`wo(act(wi(x)))`. x: [batch, seq, embed] -> [batch, seq, embed].

  Attributes:
    hidden_dim: width of the hidden layer (logical axis "mlp").
    activation: name in `ACTIVATIONS`.
    use_bias: add biases.
    dtype / param_dtype: compute and parameter dtypes.
  """

  hidden_dim: int
  activation: str = "gelu"
  use_bias: bool = False
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def __post_init__(self):
    if self.hidden_dim <= 0:
      raise ValueError(f"MLP.hidden_dim: got {self.hidden_dim}; must be > 0")
    activation(self.activation)
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    """x: [batch, seq, embed] -> same; `deterministic` is accepted for the FFN slot, unused."""
    dense = lambda feats, names, name: nn.Dense(
        feats, use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=partitioned(fan_in_normal(), names),
        bias_init=partitioned(nn.initializers.zeros, names[1:]), name=name)
    h = activation(self.activation)(dense(self.hidden_dim, ("embed", "mlp"), "wi")(x))
    return dense(x.shape[-1], ("mlp", "embed"), "wo")(h)


class GatedMLP(nn.Module):
  """`wo(act(wi_gate(x)) * wi_up(x))`: SwiGLU with "silu", GeGLU with "gelu".

  x: [batch, seq, embed] -> [batch, seq, embed].

  Attributes:
    hidden_dim: width of the gated hidden layer (logical axis "mlp").
    activation: name in `ACTIVATIONS` applied to the gate.
    dtype / param_dtype: compute and parameter dtypes.
  """

  hidden_dim: int
  activation: str = "silu"
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def __post_init__(self):
    if self.hidden_dim <= 0:
      raise ValueError(f"GatedMLP.hidden_dim: got {self.hidden_dim}; must be > 0")
    activation(self.activation)
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    """x: [batch, seq, embed] -> same; `deterministic` is accepted for the FFN slot, unused."""
    wi = self.param("wi", partitioned(fan_in_normal(), ("embed", None, "mlp")),
                    (x.shape[-1], 2, self.hidden_dim), self.param_dtype)
    wo = self.param("wo", partitioned(fan_in_normal(), ("mlp", "embed")),
                    (self.hidden_dim, x.shape[-1]), self.param_dtype)
    gate_up = jnp.einsum("bsd,dgf->bsgf", x.astype(self.dtype), wi.astype(self.dtype))
    h = activation(self.activation)(gate_up[..., 0, :]) * gate_up[..., 1, :]
    return jnp.einsum("bsf,fd->bsd", h, wo.astype(self.dtype))
