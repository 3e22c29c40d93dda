"""Small pieces shared by the TPU (Mosaic) attention kernels."""

from __future__ import annotations

import jax
import jax.numpy as jnp

NUM_LANES = 128  # width of a TPU vector register's lane dimension


def lanes(x: jax.Array, n: int) -> jax.Array:
  """``[rows, 128]`` lane-replicated -> ``[rows, n]``."""
  if n == NUM_LANES:
    return x
  if n % NUM_LANES == 0:
    return jnp.tile(x, (1, n // NUM_LANES))
  if n < NUM_LANES:
    return x[:, :n]
  raise NotImplementedError(f"width {n} must be < 128 or a multiple of 128")


def scaled_scores(q: jax.Array, k: jax.Array, st) -> tuple[jax.Array, jax.Array | None]:
  """Scaled (and soft-capped) float32 scores ``[bq, bk]`` of q ``[bq, d]`` and k ``[bk, d]``;
  also returns tanh for the cap's gradient. ``st`` has ``scale`` and ``cap`` (None: no cap)."""
  s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                          preferred_element_type=jnp.float32) * st.scale
  th = None
  if st.cap is not None:
    th = jnp.tanh(s / st.cap)
    s = st.cap * th
  return s, th
