"""Block-sparse flash attention: one entry point over the XLA reference and the Pallas kernels.

    from effx.pallas_kernels.flash_attention import flash_attention
    y = flash_attention(q, k, v, causal=True, window=1024, segment_ids=seg)

Files: ``reference.py`` (pure jnp, the semantics), ``layout.py`` (static tile layouts),
``config.py`` (``BlockSizes`` + per-device defaults), ``tpu.py`` (Mosaic TPU forward + dQ and
dK/dV backward kernels, custom_vjp), ``gpu.py`` (Mosaic GPU forward kernel for Hopper,
custom_vjp) and ``gpu_backward.py`` (its Mosaic GPU dQ and dK/dV backward kernels).

Which implementation runs (``impl``):
* ``"xla"``: the reference.
* ``"auto"``: the Pallas kernel of ``jax.default_backend()`` on TPU and GPU, the reference
  elsewhere (CPU).
* ``"pallas"``: the kernel of the current TPU/GPU; on CPU the kernel named by
  ``backend`` ("tpu", the default, or "gpu") in interpret mode.
Fallbacks to XLA (also under ``"pallas"``, with a warning): on GPU when ``gpu.supported``
gives a reason (f32 inputs, head_dim not a multiple of 64 or > 256, dense masks with partial
tiles at the GPU tiling). ``fallback_reason(...)`` tells in advance. When the GPU forward
runs, its gradient is the Mosaic GPU backward's, except where ``gpu.backward_reason(...)``
gives a reason (head_dim > 128, backward tiles other than 64/128, a dense mask not aligned to
the backward tilings): that call's gradient is the XLA reference's, O(q_len * kv_len) memory.
"""

from __future__ import annotations

import warnings

import jax
import numpy as np

from effx.pallas_kernels._backend import resolve_target
from effx.pallas_kernels.flash_attention import gpu as gpu_lib
from effx.pallas_kernels.flash_attention import tpu as tpu_lib
from effx.pallas_kernels.flash_attention.config import BlockSizes
from effx.pallas_kernels.flash_attention.reference import SegmentIds
from effx.pallas_kernels.flash_attention.reference import as_segment_ids
from effx.pallas_kernels.flash_attention.reference import attention_reference
from effx.pallas_kernels.flash_attention.reference import check_inputs

__all__ = ["BlockSizes", "SegmentIds", "attention_reference", "fallback_reason",
           "flash_attention", "resolve"]


def resolve(impl: str = "auto", backend: str | None = None) -> tuple[str, bool]:
  """Returns ``(target, interpret)``: target in {"xla", "tpu", "gpu"}."""
  return resolve_target(impl, backend)


def _default_blocks(target: str, interpret: bool, head_dim: int) -> BlockSizes:
  if interpret:
    return BlockSizes()
  return BlockSizes.for_device(jax.devices()[0].device_kind, head_dim)


def fallback_reason(q, k, *, causal: bool = True, window: int | None = None, dense_mask=None,
                    block_mask=None, block_sizes: BlockSizes | None = None, impl: str = "auto",
                    backend: str | None = None) -> str | None:
  """Why ``flash_attention`` would run the XLA reference instead of the selected kernel."""
  target, interpret = resolve(impl, backend)
  if target != "gpu":
    return None
  bs = block_sizes or _default_blocks(target, interpret, q.shape[-1])
  lay = None
  if gpu_lib.supported(q, k, block_sizes=bs) is None:
    lay = gpu_lib.gpu_layout(q.shape[1], k.shape[1], bs, causal=causal, window=window,
                             dense_mask=dense_mask, block_mask=block_mask)
  return gpu_lib.supported(q, k, block_sizes=bs, layout=lay)


def flash_attention(q, k, v, *, segment_ids=None, causal: bool = True, window: int | None = None,
                    block_mask=None, dense_mask=None, logit_soft_cap: float | None = None,
                    sm_scale: float | None = None, block_sizes: BlockSizes | None = None,
                    impl: str = "auto", backend: str | None = None) -> jax.Array:
  """Softmax attention with block-sparse skipping (semantics: ``reference.py``).

  Args:
    q: ``[batch, q_len, heads, head_dim]``.
    k, v: ``[batch, kv_len, kv_heads, head_dim]``; ``heads % kv_heads == 0`` (GQA/MQA).
    segment_ids: None, ``SegmentIds(q=[batch, q_len], kv=[batch, kv_len])`` (int32), a
      (q, kv) pair, or one ``[batch, len]`` array when q_len == kv_len.
    causal: key j visible to query i iff j <= i (top-left aligned positions).
    window: if set, key j visible to query i iff i - j < window.
    block_mask: int8 ``[heads_or_1, nq, nk]`` tile layout (0 empty, 1 partial, 2 full) of
      ``dense_mask``; optional, checked against dense_mask when its grid matches the kernel's.
    dense_mask: static bool ``[heads_or_1, q_len, kv_len]`` (arbitrary block-sparse patterns).
    logit_soft_cap: scores -> ``cap * tanh(scores / cap)``.
    sm_scale: default ``1 / sqrt(head_dim)``.
    block_sizes: kernel tiles; default ``BlockSizes.for_device`` (128 x 128 in interpret mode).
    impl: "auto" | "xla" | "pallas" (module docstring).
    backend: on CPU with impl="pallas", which kernel to interpret: "tpu" (default) or "gpu".

  Returns:
    ``[batch, q_len, heads, head_dim]`` in q's dtype; rows with no visible key are 0.
    Differentiable in q, k, v.
  """
  check_inputs(q, k, v)
  if window is not None and window < 1:
    raise ValueError(f"window={window} must be >= 1 or None")
  if logit_soft_cap is not None and logit_soft_cap <= 0:
    raise ValueError(f"logit_soft_cap={logit_soft_cap} must be > 0 or None")
  if dense_mask is not None:
    dense_mask = np.asarray(dense_mask, bool)
  seg = as_segment_ids(segment_ids, q.shape[1], k.shape[1])
  kw = dict(segment_ids=seg, causal=causal, window=window, block_mask=block_mask,
            dense_mask=dense_mask, logit_soft_cap=logit_soft_cap, sm_scale=sm_scale)
  target, interpret = resolve(impl, backend)
  if target == "xla":
    return attention_reference(q, k, v, **kw)
  bs = block_sizes or _default_blocks(target, interpret, q.shape[-1])
  if target == "tpu":
    from jax.experimental.pallas import tpu as pltpu
    return tpu_lib.flash_attention_tpu(
        q, k, v, block_sizes=bs, interpret=pltpu.InterpretParams() if interpret else None, **kw)
  reason = fallback_reason(q, k, causal=causal, window=window, dense_mask=dense_mask,
                           block_mask=block_mask, block_sizes=bs, impl=impl, backend=backend)
  if reason is not None:
    if impl == "pallas":
      warnings.warn(f"flash_attention: Mosaic GPU kernel does not apply ({reason}); using XLA",
                    stacklevel=2)
    return attention_reference(q, k, v, **kw)
  from jax.experimental.pallas import mosaic_gpu as plgpu
  return gpu_lib.flash_attention_gpu(
      q, k, v, block_sizes=bs, interpret=plgpu.InterpretGPUParams() if interpret else None, **kw)
