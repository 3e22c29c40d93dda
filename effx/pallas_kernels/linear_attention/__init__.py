"""Chunked causal linear attention: one entry point over the XLA reference and the Pallas kernel.

    from effx.pallas_kernels.linear_attention import linear_attention
    y, state = linear_attention(phi_q, phi_k, v, log_decay=gates, segment_ids=seg)

Inputs are already feature-mapped (elu+1, ReLU, Based's Taylor map, Performer, identity for
GLA ... are applied by the caller). Decay kinds (``reference.decay_kind``): "none"
(``log_decay=None``), "retnet" (``[heads]`` or ``[batch, T, heads]`` scalar log-decays), "gla"
(``[batch, T, heads, d_k]`` per-channel log-gates). The delta rule is not a kernel here (use
``effx.attention.linear``'s chunked form).

Files: ``reference.py`` (pure jnp: the chunked form, which is the XLA path, and the recurrent
definition), ``config.py`` (``BlockSizes`` + per-device defaults), ``tpu.py`` (Mosaic TPU forward
and reverse-chunk backward kernels, custom_vjp), ``gpu.py`` (Mosaic GPU forward and
reverse-chunk backward kernels for Hopper, custom_vjp).

Which implementation runs (``impl``):
* ``"xla"``: the chunked reference.
* ``"auto"``: the kernel of ``jax.default_backend()`` on TPU and GPU, the reference on CPU.
* ``"pallas"``: the kernel of the current TPU/GPU; on CPU the kernel named by ``backend``
  ("tpu", the default, or "gpu") in interpret mode.
Fallback to XLA (under ``"pallas"`` with a warning): on GPU where ``gpu.supported`` gives a
reason (float32 inputs, d_k > 512, chunk_size != 64). On GPU, GLA's intra-chunk term is XLA
(sub-chunk form) and the kernel runs the inter-chunk recurrence (``gpu.py``). ``fallback_reason(...)`` tells
in advance.
"""

from __future__ import annotations

import warnings

import jax

from effx.pallas_kernels._backend import resolve_target
from effx.pallas_kernels.linear_attention import gpu as gpu_lib
from effx.pallas_kernels.linear_attention import tpu as tpu_lib
from effx.pallas_kernels.linear_attention.config import BlockSizes
from effx.pallas_kernels.linear_attention.reference import DECAY_KINDS
from effx.pallas_kernels.linear_attention.reference import check_inputs
from effx.pallas_kernels.linear_attention.reference import decay_kind
from effx.pallas_kernels.linear_attention.reference import linear_attention_recurrent
from effx.pallas_kernels.linear_attention.reference import linear_attention_reference

__all__ = ["BlockSizes", "DECAY_KINDS", "decay_kind", "fallback_reason", "linear_attention",
           "linear_attention_recurrent", "linear_attention_reference", "resolve"]


def resolve(impl: str = "auto", backend: str | None = None) -> tuple[str, bool]:
  """Returns ``(target, interpret)``: target in {"xla", "tpu", "gpu"}."""
  return resolve_target(impl, backend, kernels=("tpu", "gpu"))


def _default_blocks(target: str, interpret: bool, head_dim: int) -> BlockSizes:
  if target != "tpu" or interpret:
    return BlockSizes()
  return BlockSizes.for_device(jax.devices()[0].device_kind, head_dim)


def fallback_reason(impl: str = "auto", backend: str | None = None, *, q=None, k=None, v=None,
                    log_decay=None, block_sizes: BlockSizes | None = None) -> str | None:
  """Why ``linear_attention`` would run the XLA reference instead of the selected kernel.

  None when the selected target is XLA or the TPU kernel (which takes every input). For the GPU
  kernel pass the call's ``q, k, v, log_decay, block_sizes``; without q/k/v only the
  input-independent answer (None) is given.
  """
  target, interpret = resolve(impl, backend)
  if target != "gpu" or q is None:
    return None
  bs = block_sizes or _default_blocks(target, interpret, q.shape[-1])
  return gpu_lib.supported(q, k, v, log_decay, bs)


def linear_attention(q, k, v, *, log_decay=None, segment_ids=None, initial_state=None,
                     block_sizes: BlockSizes | None = None, impl: str = "auto",
                     backend: str | None = None):
  """Chunked causal linear attention (semantics: ``reference.py``).

  Args:
    q, k: ``[batch, T, heads, d_k]`` features (φ already applied); v: ``[batch, T, heads, d_v]``.
    log_decay: None, ``[heads]`` / ``[batch, T, heads]`` (retnet), ``[batch, T, heads, d_k]``
      (gla); entries ``<= 0``: ``S_t = diag(exp(g_t)) S_{t-1} + k_t v_tᵀ``, ``y_t = S_tᵀ q_t``.
    segment_ids: int ``[batch, T]`` or None: the state resets where the id changes.
    initial_state: ``[batch, heads, d_k, d_v]`` or None.
    block_sizes: chunk / GLA sub-chunk; default ``BlockSizes.for_device`` on TPU, 64 / 16
      elsewhere (the GPU kernel needs chunk_size 64). The XLA path uses the same chunking.
    impl: "auto" | "xla" | "pallas" (module docstring).
    backend: on CPU with impl="pallas", which kernel to interpret: "tpu" (default) or "gpu".

  Returns:
    ``(y [batch, T, heads, d_v] in v's dtype, final state [batch, heads, d_k, d_v] float32)``,
    differentiable in q, k, v, log_decay and initial_state.
  """
  check_inputs(q, k, v, log_decay, segment_ids, initial_state)
  target, interpret = resolve(impl, backend)
  if block_sizes is None:
    block_sizes = _default_blocks(target, interpret, q.shape[-1])
  kw = dict(log_decay=log_decay, segment_ids=segment_ids, initial_state=initial_state)
  if target == "gpu":
    reason = gpu_lib.supported(q, k, v, log_decay, block_sizes)
    if reason is not None:
      if impl == "pallas":
        warnings.warn(f"linear_attention: Mosaic GPU kernel does not apply ({reason}); "
                      "using XLA", stacklevel=2)
      target = "xla"
  if target == "xla":
    return linear_attention_reference(q, k, v, chunk_size=block_sizes.chunk_size,
                                      sub_chunk=block_sizes.sub_for(), **kw)
  if target == "gpu":
    from jax.experimental.pallas import mosaic_gpu as plgpu
    return gpu_lib.linear_attention_gpu(
        q, k, v, block_sizes=block_sizes,
        interpret=plgpu.InterpretGPUParams() if interpret else None, **kw)
  from jax.experimental.pallas import tpu as pltpu
  return tpu_lib.linear_attention_tpu(
      q, k, v, block_sizes=block_sizes, interpret=pltpu.InterpretParams() if interpret else None,
      **kw)
