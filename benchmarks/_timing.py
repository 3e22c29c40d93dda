"""Timing and table helpers shared by the kernel benchmarks."""

from __future__ import annotations

import time

import jax


def seconds_per_call(fn, *args, rounds: int = 3, min_time: float = 0.05,
                     max_calls: int = 50) -> float:
  """Seconds per call of ``fn(*args)``: after a warm-up, ``rounds`` rounds of ``n``
  back-to-back calls (``n`` sized so a round lasts about ``min_time``, at most ``max_calls``),
  synchronised once per round; the minimum over rounds."""
  jax.block_until_ready(fn(*args))
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  one = max(time.perf_counter() - t0, 1e-6)
  n = max(1, min(max_calls, int(min_time / one)))
  best = float("inf")
  for _ in range(rounds):
    t0 = time.perf_counter()
    out = None
    for _ in range(n):
      out = fn(*args)
    jax.block_until_ready(out)
    best = min(best, (time.perf_counter() - t0) / n)
  return best


def table_row(cells) -> str:
  """One markdown table row."""
  return "| " + " | ".join(str(c) for c in cells) + " |"
