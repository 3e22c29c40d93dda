"""Initialisers wrapped with logical axis names."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
from jax.nn.initializers import Initializer


def partitioned(init: Initializer, names: Sequence[str | None]) -> Initializer:
  """Wraps `init` so the parameter carries logical axis `names` (one per dimension)."""
  return nn.with_logical_partitioning(init, tuple(names))


def fan_in_normal(scale: float = 1.0) -> Initializer:
  """Truncated-normal init with variance `scale / fan_in` (fan-in = all but the last axis)."""
  return nn.initializers.variance_scaling(scale, "fan_in", "truncated_normal")
