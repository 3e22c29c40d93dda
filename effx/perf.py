"""Throughput accounting: peak FLOP/s of the device and FLOPs of a compiled step."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

# Dense bf16 peak FLOP/s per chip from vendor datasheets (no sparsity).
DATASHEET_PEAK_BF16 = {
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
}


def datasheet_peak(device: jax.Device | None = None) -> float | None:
  """Vendor bf16 peak FLOP/s for `device` (default: the first device), None if unknown."""
  kind = (device or jax.devices()[0]).device_kind
  for name, peak in DATASHEET_PEAK_BF16.items():
    if kind.startswith(name):
      return peak
  return None


def measure_matmul_peak(dtype: jnp.dtype = jnp.float32, size: int = 1024,
                        min_seconds: float = 0.3) -> float:
  """Measured FLOP/s of a large square `jnp.dot` on the default device (best of several runs)."""
  a = jnp.ones((size, size), dtype)
  dot = jax.jit(lambda x, y: x @ y)
  dot(a, a).block_until_ready()
  best = float("inf")
  deadline = time.perf_counter() + min_seconds
  reps = 0
  while reps < 3 or time.perf_counter() < deadline:
    start = time.perf_counter()
    dot(a, a).block_until_ready()
    best = min(best, time.perf_counter() - start)
    reps += 1
  return 2 * size ** 3 / best


def peak_flops(dtype: jnp.dtype = jnp.float32) -> tuple[float, str]:
  """(peak FLOP/s per device, where it came from): datasheet on accelerators, measured on CPU."""
  peak = datasheet_peak()
  if peak is not None and jax.default_backend() != "cpu":
    return peak, "datasheet bf16"
  return measure_matmul_peak(dtype), f"measured {jnp.dtype(dtype).name} matmul"


def compiled_flops(compiled) -> float | None:
  """FLOPs of one call of a compiled jitted function (XLA cost analysis), None if unavailable."""
  try:
    analysis = compiled.cost_analysis()
  except Exception:  # some backends do not implement cost analysis
    return None
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  if not analysis:
    return None
  flops = analysis.get("flops")
  return float(flops) if flops and flops > 0 else None


def transformer_flops_per_token(num_params: int, num_layers: int, seq_len: int,
                                embed_dim: int) -> float:
  """Training FLOPs per token: 6·N (weights, fwd+bwd) + 12·L·T·E (attention scores)."""
  return 6.0 * num_params + 12.0 * num_layers * seq_len * embed_dim
