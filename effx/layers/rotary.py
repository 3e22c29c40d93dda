"""Rotary position embeddings (RoPE) with optional frequency scaling."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class RotaryConfig:
  """How positions enter q and k.

  Attributes:
    kind: "rope" (rotate pairs of channels) or "none" (no positional signal: NoPE).
    base: RoPE wavelength base theta.
    fraction: fraction of head_dim that is rotated (1.0 = all; partial rotary otherwise).
    scaling: None, "linear" (positions / factor) or "llama3" (frequency-dependent scaling).
    factor: scaling factor for "linear"/"llama3".
    low_freq_factor, high_freq_factor, original_max_position: llama3 scaling parameters.
  """

  kind: str = "rope"
  base: float = 10_000.0
  fraction: float = 1.0
  scaling: str | None = None
  factor: float = 1.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position: int = 8192

  def __post_init__(self):
    if self.kind not in ("rope", "none"):
      raise ValueError(f"rotary.kind: got {self.kind!r}; allowed: 'rope', 'none'")
    if self.base <= 1:
      raise ValueError(f"rotary.base: got {self.base}; must be > 1")
    if not 0 < self.fraction <= 1:
      raise ValueError(f"rotary.fraction: got {self.fraction}; must be in (0, 1]")
    if self.scaling not in (None, "linear", "llama3"):
      raise ValueError(f"rotary.scaling: got {self.scaling!r}; allowed: None, 'linear', 'llama3'")

  def inverse_frequencies(self, rotary_dim: int) -> jax.Array:
    """float32 [rotary_dim // 2] angular frequencies after scaling."""
    inv = 1.0 / (self.base ** (jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim))
    if self.scaling == "linear":
      inv = inv / self.factor
    elif self.scaling == "llama3":
      low_wavelen = self.original_max_position / self.low_freq_factor
      high_wavelen = self.original_max_position / self.high_freq_factor
      wavelen = 2 * math.pi / inv
      smooth = (self.original_max_position / wavelen - self.low_freq_factor) / (
          self.high_freq_factor - self.low_freq_factor)
      scaled = jnp.where(wavelen > low_wavelen, inv / self.factor, inv)
      mid = (1 - smooth) * inv / self.factor + smooth * inv
      is_mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
      inv = jnp.where(is_mid, mid, scaled)
    return inv


def apply_rotary(x: jax.Array, positions: jax.Array, config: RotaryConfig) -> jax.Array:
  """Rotates channel pairs of `x` by position-dependent angles (half-split layout).

  Args:
    x: [batch, seq, heads, head_dim].
    positions: int32 [batch, seq] absolute positions.
    config: the rotary settings; kind "none" returns `x` unchanged.

  Returns:
    [batch, seq, heads, head_dim] in the dtype of `x` (angles computed in float32).
  """
  if config.kind == "none":
    return x
  head_dim = x.shape[-1]
  rotary_dim = int(head_dim * config.fraction) // 2 * 2
  inv = config.inverse_frequencies(rotary_dim)
  angles = positions.astype(jnp.float32)[..., None] * inv  # [b, s, r/2]
  sin = jnp.sin(angles)[:, :, None, :]
  cos = jnp.cos(angles)[:, :, None, :]
  rot, rest = x[..., :rotary_dim].astype(jnp.float32), x[..., rotary_dim:]
  x1, x2 = jnp.split(rot, 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return jnp.concatenate([rotated.astype(x.dtype), rest], axis=-1)
