"""Shared helpers of the Pallas kernel tests (tests/pallas_kernels/test_*.py).

Interpreted kernels run with the race detector on and uninitialised memory poisoned with NaN
(a tile that is never written, or read before it is written, shows up as NaN). Hypothesis runs
derandomised without shrinking: every example runs interpreted kernels, so a shrink would take
minutes.
"""

from __future__ import annotations

import functools

import hypothesis
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax.experimental.pallas import tpu as pltpu

TPU_INTERPRET = pltpu.InterpretParams(detect_races=True, uninitialized_memory="nan")
GPU_INTERPRET = plgpu.InterpretGPUParams(detect_races=True, uninitialized_memory="nan")
SETTINGS = dict(deadline=None, derandomize=True, print_blob=True, database=None,
                phases=(hypothesis.Phase.explicit, hypothesis.Phase.generate),
                suppress_health_check=list(hypothesis.HealthCheck))


def check_close(name: str, got, want, atol: float) -> None:
  """Asserts equal shapes, finite ``got`` and ``max |got - want| <= atol * max(1, max |want|)``
  (both compared in float32)."""
  got = np.asarray(jnp.asarray(got, jnp.float32))
  want = np.asarray(jnp.asarray(want, jnp.float32))
  assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
  assert np.isfinite(got).all(), f"{name}: non-finite values"
  err = np.abs(got - want).max() if got.size else 0.0
  assert err <= atol * max(1.0, np.abs(want).max()), f"{name}: max err {err} > {atol}"


def segments(seed: int, b: int, length: int, num: int = 2) -> jax.Array:
  """Random packed-document ids, int32 ``[b, length]``: sorted draws from ``0 .. num`` (a 0
  padding run at the start allowed)."""
  rng = np.random.default_rng(seed)
  return jnp.asarray(np.sort(rng.integers(0, num + 1, size=(b, length)), axis=1), jnp.int32)


def linear_segments(seed: int, b: int, t: int) -> jax.Array:
  """Packed-document ids for linear attention, int32 ``[b, t]``: ids may repeat non-adjacently
  (e.g. ... 3 3 1 1 0), and any change of id starts a new document."""
  rng = np.random.default_rng(seed)
  ids = np.sort(rng.integers(0, 4, size=(b, t)), axis=1)
  ids[:, t // 2:] = ids[:, t // 2:] % 2
  return jnp.asarray(ids, jnp.int32)


def attention_inputs(seed: int, b: int, lq: int, lk: int, h: int, hkv: int, d: int, dtype):
  """q ``[b, lq, h, d]``, k, v ``[b, lk, hkv, d]`` and an output cotangent like q, all
  ~N(0, 1) in ``dtype``."""
  ks = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(ks[0], (b, lq, h, d), jnp.float32).astype(dtype)
  k = jax.random.normal(ks[1], (b, lk, hkv, d), jnp.float32).astype(dtype)
  v = jax.random.normal(ks[2], (b, lk, hkv, d), jnp.float32).astype(dtype)
  do = jax.random.normal(ks[3], (b, lq, h, d), jnp.float32).astype(dtype)
  return q, k, v, do


def moh_inputs(seed: int, b: int, t: int, h: int, hkv: int, d: int, block_q: int,
               density: float, dtype=jnp.float32):
  """MoH inputs: q ``[b, t, h, d]``, k, v ``[b, t, hkv, d]`` in ``dtype``; float32 gates
  ``[b, t, h]`` (0 outside a random activity map, some zeros inside); the bool activity map
  ``[b, ceil(t / block_q), h]`` (``density`` of the pairs); dy like q."""
  ks = jax.random.split(jax.random.key(seed), 7)
  q = jax.random.normal(ks[0], (b, t, h, d), jnp.float32).astype(dtype)
  k = jax.random.normal(ks[1], (b, t, hkv, d), jnp.float32).astype(dtype)
  v = jax.random.normal(ks[2], (b, t, hkv, d), jnp.float32).astype(dtype)
  nq = -(-t // block_q)
  active = jax.random.bernoulli(ks[3], density, (b, nq, h))
  tok = jnp.repeat(active, block_q, axis=1)[:, :t] & jax.random.bernoulli(ks[4], 0.7, (b, t, h))
  gates = jnp.where(tok, jax.random.uniform(ks[5], (b, t, h), minval=0.2, maxval=2.0), 0.0)
  dy = jax.random.normal(ks[6], (b, t, h, d), jnp.float32).astype(dtype)
  return q, k, v, gates, active, dy


def gmm_inputs(seed: int, m: int, k: int, n: int, g: int, dtype):
  """Grouped-matmul inputs ~N(0, 1) in ``dtype``: lhs ``[m, k]``, rhs ``[g, k, n]``, an output
  cotangent ``[m, n]``."""
  ks = jax.random.split(jax.random.key(seed), 3)
  lhs = jax.random.normal(ks[0], (m, k), jnp.float32).astype(dtype)
  rhs = jax.random.normal(ks[1], (g, k, n), jnp.float32).astype(dtype)
  dout = jax.random.normal(ks[2], (m, n), jnp.float32).astype(dtype)
  return lhs, rhs, dout


@functools.partial(jax.jit, static_argnames=("fn",))
def value_and_vjp(fn, q, k, v, gates, dy):
  """``fn(q, k, v, gates)`` and its gradients in (q, k, v, gates) for the cotangent dy."""
  y, vjp = jax.vjp(fn, q, k, v, gates)
  return y, vjp(dy)
