"""Grouped (ragged) matmul: one entry point over ``jax.lax.ragged_dot`` and the Pallas kernels.

    from effx.pallas_kernels.grouped_matmul import grouped_matmul
    out = grouped_matmul(lhs, rhs, group_sizes)      # [M, K] x [G, K, N] -> [M, N]

Rows of lhs are sorted by group (group g = the next ``group_sizes[g]`` rows); rows past
``sum(group_sizes)`` come out 0. Group sizes need not be multiples of any tile (zeros too).
Differentiable in lhs and rhs (``custom_vjp``: ``d_lhs`` is a grouped matmul with the weights
transposed, ``d_rhs[g] = lhs_g^T @ dout_g`` a "transposed grouped matmul" kernel).

Files: ``reference.py`` (``jax.lax.ragged_dot``), ``config.py`` (``BlockSizes``), ``tpu.py``
(Mosaic TPU kernels ``gmm`` / ``tgmm``, megablox-style tile -> group work lists).

Which implementation runs (``impl``):
* ``"xla"``: ``jax.lax.ragged_dot`` (the reference).
* ``"auto"``: the Pallas kernel on TPU; ``ragged_dot`` on GPU (XLA lowers it to a grouped
  cuBLAS/cuDNN GEMM, which a Pallas kernel has not been measured to beat) and on CPU (XLA:CPU
  lowers it densely, G x the flops: for CPU training effx.moe's "blocked" dropless path is the
  fast one; it lives a floor up, in effx/moe/dispatch.py).
* ``"pallas"``: the TPU kernel on a TPU; on CPU the TPU kernel in interpret mode (``backend``
  "tpu", the default). There is no Mosaic GPU kernel: on a GPU, or with ``backend="gpu"``, the
  call falls back to ``ragged_dot`` with a warning (``fallback_reason`` says so in advance).
"""

from __future__ import annotations

import warnings

import jax

from effx.pallas_kernels._backend import resolve_target
from effx.pallas_kernels.grouped_matmul import tpu as tpu_lib
from effx.pallas_kernels.grouped_matmul.config import BlockSizes
from effx.pallas_kernels.grouped_matmul.reference import check_inputs
from effx.pallas_kernels.grouped_matmul.reference import grouped_matmul_reference
from effx.pallas_kernels.grouped_matmul.reference import transposed_grouped_matmul_reference

__all__ = ["BlockSizes", "fallback_reason", "grouped_matmul", "grouped_matmul_reference",
           "resolve", "transposed_grouped_matmul_reference"]


def resolve(impl: str = "auto", backend: str | None = None) -> tuple[str, bool]:
  """Returns ``(target, interpret)``: target in {"xla", "tpu", "gpu"} ("gpu" = no kernel)."""
  return resolve_target(impl, backend, gpu_auto=False)


def fallback_reason(impl: str = "pallas", backend: str | None = None) -> str | None:
  """Why ``grouped_matmul`` would run ``ragged_dot`` instead of the selected kernel."""
  target, _ = resolve(impl, backend)
  if target == "gpu":
    return "no Mosaic GPU grouped-matmul kernel (XLA's ragged_dot is the GPU path)"
  return None


def grouped_matmul(lhs, rhs, group_sizes, *, preferred_element_type=None, impl: str = "auto",
                   backend: str | None = None, block_sizes: BlockSizes | None = None
                   ) -> jax.Array:
  """``out[r] = lhs[r] @ rhs[g]`` for the rows r of group g (module docstring).

  Args:
    lhs: ``[M, K]``, rows sorted by group.
    rhs: ``[G, K, N]``.
    group_sizes: int32 ``[G]``, ``sum(group_sizes) <= M`` (rows past the sum come out 0).
    preferred_element_type: output dtype (default: the promoted input dtype); accumulation is
      float32 either way.
    impl: "auto" | "xla" | "pallas" (module docstring).
    backend: on CPU with impl="pallas", which kernel to interpret ("tpu", the default; "gpu"
      has no kernel and falls back to XLA).
    block_sizes: kernel tiles (default ``BlockSizes.for_device``; 128^3 in interpret mode).

  Returns:
    ``[M, N]``, differentiable in lhs and rhs.
  """
  check_inputs(lhs, rhs, group_sizes)
  target, interpret = resolve(impl, backend)
  if target == "gpu":
    if impl == "pallas":
      warnings.warn(f"grouped_matmul: {fallback_reason(impl, backend)}; using ragged_dot",
                    stacklevel=2)
    target = "xla"
  if target == "xla" or lhs.shape[0] == 0:
    return grouped_matmul_reference(lhs, rhs, group_sizes,
                                    preferred_element_type=preferred_element_type)
  from jax.experimental.pallas import tpu as pltpu
  bs = block_sizes
  if bs is None:
    bs = BlockSizes() if interpret else BlockSizes.for_device(
        jax.devices()[0].device_kind, *lhs.shape, rhs.shape[2])
  return tpu_lib.grouped_matmul_tpu(
      lhs, rhs, group_sizes, block_sizes=bs, out_dtype=preferred_element_type,
      interpret=pltpu.InterpretParams() if interpret else None)
