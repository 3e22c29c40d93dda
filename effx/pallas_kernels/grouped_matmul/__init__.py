"""Grouped (ragged) matmul: one entry point over ``jax.lax.ragged_dot`` and the Pallas kernels.

    from effx.pallas_kernels.grouped_matmul import grouped_matmul
    out = grouped_matmul(lhs, rhs, group_sizes)      # [M, K] x [G, K, N] -> [M, N]

Rows of lhs are sorted by group (group g = the next ``group_sizes[g]`` rows); rows past
``sum(group_sizes)`` come out 0. Group sizes need not be multiples of any tile (zeros too).
Differentiable in lhs and rhs (``custom_vjp``: ``d_lhs`` is a grouped matmul with the weights
transposed, ``d_rhs[g] = lhs_g^T @ dout_g`` a "transposed grouped matmul" kernel).

Files: ``reference.py`` (``jax.lax.ragged_dot``), ``config.py`` (``BlockSizes``), ``tpu.py``
(Mosaic TPU kernels ``gmm`` / ``tgmm``, megablox-style tile -> group work lists), ``gpu.py``
(Mosaic GPU kernels for Hopper ``gmm`` / ``tgmm``: TMA + WGMMA pipelines over a row tile ->
group schedule).

Which implementation runs (``impl``):
* ``"xla"``: ``jax.lax.ragged_dot`` (the reference).
* ``"auto"``: the Pallas kernel of the TPU/GPU (on GPU where ``gpu.supported`` allows, else
  ``ragged_dot`` silently). On an H200 the Mosaic GPU kernel is 3.7-16x faster than XLA's
  ``ragged_dot`` forward and 10-39x forward + backward at MoE shapes (BENCHMARKS.md, "Grouped
  matmul kernels"). On CPU ``ragged_dot`` (XLA:CPU lowers it densely, G x the flops: for CPU
  training effx.moe's "blocked" dropless path is the fast one; it lives a floor up, in
  effx/moe/dispatch.py).
* ``"pallas"``: the kernel of the current TPU/GPU; on CPU the kernel named by ``backend``
  ("tpu", the default, or "gpu") in interpret mode.
Fallback to ``ragged_dot`` (also under ``"pallas"``, with a warning): on GPU when
``gpu.supported`` gives a reason (float32 inputs, K or N not a multiple of 64, GPU-incompatible
block sizes); ``fallback_reason(...)`` tells in advance.
"""

from __future__ import annotations

import warnings

import jax

from effx.pallas_kernels._backend import resolve_target
from effx.pallas_kernels.grouped_matmul import gpu as gpu_lib
from effx.pallas_kernels.grouped_matmul import tpu as tpu_lib
from effx.pallas_kernels.grouped_matmul.config import BlockSizes
from effx.pallas_kernels.grouped_matmul.reference import check_inputs
from effx.pallas_kernels.grouped_matmul.reference import grouped_matmul_reference
from effx.pallas_kernels.grouped_matmul.reference import transposed_grouped_matmul_reference

__all__ = ["BlockSizes", "fallback_reason", "grouped_matmul",
           "grouped_matmul_reference", "resolve", "transposed_grouped_matmul_reference"]


def resolve(impl: str = "auto", backend: str | None = None) -> tuple[str, bool]:
  """Returns ``(target, interpret)``: target in {"xla", "tpu", "gpu"}."""
  return resolve_target(impl, backend)


def _default_blocks(target: str, interpret: bool, lhs, rhs) -> BlockSizes:
  if interpret:   # small tiles keep the interpreters fast
    return BlockSizes(64, 64, 64, num_stages=2) if target == "gpu" else BlockSizes()
  return BlockSizes.for_device(jax.devices()[0].device_kind, *lhs.shape, rhs.shape[2])


def fallback_reason(impl: str = "pallas", backend: str | None = None, *, lhs=None, rhs=None,
                    block_sizes: BlockSizes | None = None) -> str | None:
  """Why ``grouped_matmul`` would run ``ragged_dot`` instead of the selected kernel (None
  when it would not, or when lhs/rhs are not given and only their dtypes/shapes decide)."""
  target, interpret = resolve(impl, backend)
  if target != "gpu" or lhs is None or rhs is None:
    return None
  bs = block_sizes or _default_blocks(target, interpret, lhs, rhs)
  return gpu_lib.supported(lhs, rhs, block_sizes=bs)


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
    backend: on CPU with impl="pallas", which kernel to interpret: "tpu" (default) or "gpu".
    block_sizes: kernel tiles (default ``BlockSizes.for_device``; in interpret mode 128^3 for
      TPU, 64^3 with 2 stages for GPU).

  Returns:
    ``[M, N]``, differentiable in lhs and rhs.
  """
  check_inputs(lhs, rhs, group_sizes)
  target, interpret = resolve(impl, backend)
  if target == "gpu":
    reason = fallback_reason(impl, backend, lhs=lhs, rhs=rhs, block_sizes=block_sizes)
    if reason is not None:
      if impl == "pallas":
        warnings.warn(f"grouped_matmul: Mosaic GPU kernel does not apply ({reason}); using "
                      "ragged_dot", stacklevel=2)
      target = "xla"
  if target == "xla" or lhs.shape[0] == 0:
    return grouped_matmul_reference(lhs, rhs, group_sizes,
                                    preferred_element_type=preferred_element_type)
  bs = block_sizes or _default_blocks(target, interpret, lhs, rhs)
  if target == "gpu":
    from jax.experimental.pallas import mosaic_gpu as plgpu
    return gpu_lib.grouped_matmul_gpu(
        lhs, rhs, group_sizes, block_sizes=bs, out_dtype=preferred_element_type,
        interpret=plgpu.InterpretGPUParams() if interpret else None)
  from jax.experimental.pallas import tpu as pltpu
  return tpu_lib.grouped_matmul_tpu(
      lhs, rhs, group_sizes, block_sizes=bs, out_dtype=preferred_element_type,
      interpret=pltpu.InterpretParams() if interpret else None)
