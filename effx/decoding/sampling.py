"""Turning logits into a distribution: temperature, top-k and top-p, applied one way everywhere.

Plain decoding and every speculative verifier use `warp_logits`, so the distribution a
speculative method must preserve is exactly the one plain sampling draws from.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How the next token is chosen.

  Attributes:
    temperature: 0 = greedy (argmax); otherwise logits are divided by it.
    top_k: keep the k most likely tokens (0 = all).
    top_p: keep the smallest set of most likely tokens whose mass reaches top_p (1 = all).
  """

  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"sampling.temperature: got {self.temperature}; must be >= 0")
    if self.top_k < 0:
      raise ValueError(f"sampling.top_k: got {self.top_k}; must be >= 0 (0 = no top-k)")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"sampling.top_p: got {self.top_p}; must be in (0, 1]")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0


def warp_logits(logits: jax.Array, cfg: SamplingConfig) -> jax.Array:
  """Log-probabilities after temperature, top-k and top-p (removed tokens get -inf).

  Args:
    logits: [..., vocab] (any float dtype; computed in float32).
  Returns:
    float32 [..., vocab] normalised log-probabilities. For greedy configs, a one-hot
    distribution on the argmax (log 1 = 0, others -inf).
  """
  logits = logits.astype(jnp.float32)
  if cfg.greedy:
    top = jnp.argmax(logits, axis=-1)
    return jnp.where(jax.nn.one_hot(top, logits.shape[-1], dtype=bool), 0.0, -jnp.inf)
  logits = logits / cfg.temperature
  if cfg.top_k and cfg.top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, cfg.top_k)[0][..., -1:]
    logits = jnp.where(logits >= kth, logits, -jnp.inf)
  if cfg.top_p < 1:
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = mass_before < cfg.top_p  # always keeps the most likely token
    threshold = jnp.min(jnp.where(keep_sorted, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits >= threshold, logits, -jnp.inf)
  return jax.nn.log_softmax(logits, axis=-1)


def sample(key: jax.Array, logits: jax.Array, cfg: SamplingConfig) -> jax.Array:
  """Draws tokens from `logits` [batch, vocab] with one key per row (`key` [batch]).

  Returns int32 [batch]. Greedy configs return the argmax and ignore `key`.
  """
  if cfg.greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logp = warp_logits(logits, cfg)
  return jax.vmap(jax.random.categorical)(key, logp).astype(jnp.int32)
