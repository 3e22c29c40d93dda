"""Pure-jnp (XLA) grouped matmul: ``jax.lax.ragged_dot`` plus shape checks.

``out[r] = lhs[r] @ rhs[g]`` for the rows r of group g, groups being consecutive row ranges in
order (group g = the next ``group_sizes[g]`` rows). Rows past ``sum(group_sizes)`` are 0.
Shapes: lhs ``[M, K]``, rhs ``[G, K, N]``, group_sizes int32 ``[G]`` (``sum <= M``), out
``[M, N]``; accumulation in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def check_inputs(lhs, rhs, group_sizes) -> None:
  """Validates shapes and dtypes (one-line ValueErrors)."""
  if lhs.ndim != 2:
    raise ValueError(f"lhs must be 2-D [M, K], got shape {lhs.shape}")
  if rhs.ndim != 3:
    raise ValueError(f"rhs must be 3-D [G, K, N], got shape {rhs.shape}")
  if lhs.shape[1] != rhs.shape[1]:
    raise ValueError(f"lhs {lhs.shape} and rhs {rhs.shape} must agree on K")
  if group_sizes.shape != (rhs.shape[0],):
    raise ValueError(f"group_sizes.shape {group_sizes.shape} must be (G,)=({rhs.shape[0]},)")
  if not jnp.issubdtype(group_sizes.dtype, jnp.integer):
    raise ValueError(f"group_sizes.dtype {group_sizes.dtype} must be an integer dtype")


def grouped_matmul_reference(lhs, rhs, group_sizes, *, preferred_element_type=None):
  """``jax.lax.ragged_dot`` (float32 accumulation), output in ``preferred_element_type`` or
  the promoted input dtype. Differentiable in lhs and rhs."""
  check_inputs(lhs, rhs, group_sizes)
  out_dtype = preferred_element_type or jnp.promote_types(lhs.dtype, rhs.dtype)
  out = jax.lax.ragged_dot(lhs, rhs, group_sizes.astype(jnp.int32),
                           preferred_element_type=jnp.float32)
  return out.astype(out_dtype)


def transposed_grouped_matmul_reference(lhs, dout, group_sizes, num_groups: int):
  """``out[g] = lhs[rows of g]^T @ dout[rows of g]`` -> float32 ``[G, K, N]`` (0 for empty
  groups): the weight gradient of the grouped matmul, by segment sums."""
  m = lhs.shape[0]
  ends = jnp.cumsum(group_sizes.astype(jnp.int32))
  gid = jnp.searchsorted(ends, jnp.arange(m, dtype=jnp.int32), side="right")  # G past the end
  onehot = (gid[:, None] == jnp.arange(num_groups)[None, :]).astype(jnp.float32)
  return jnp.einsum("mg,mk,mn->gkn", onehot, lhs.astype(jnp.float32), dout.astype(jnp.float32),
                    precision=jax.lax.Precision.HIGHEST)
