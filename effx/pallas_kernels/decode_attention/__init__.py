"""Decode attention: T = 1..64 new queries against a long KV cache, split-K (flash-decoding).

    from effx.pallas_kernels.decode_attention import decode_attention
    o = decode_attention(q, cache_k, cache_v, lengths, new_token_mask)   # [b, T, heads, d]

Semantics (``reference.py``): the cache already holds the T new keys/values at slots
``lengths[b] .. lengths[b] + T - 1``; query i sees every old slot ``j < lengths[b]`` and new
token j iff ``new_token_mask[b, i, j]`` (causal by default; a draft tree passes its tree mask),
exactly ``effx.attention.mha.cache_attention_mask`` without a static mask. GQA/MQA: the query
heads of a KV head are processed together. Forward only (decoding needs no gradient).

Files: ``reference.py`` (pure jnp), ``config.py`` (``BlockSizes``: block_k, num_splits, with
per-device defaults), ``tpu.py`` (Mosaic TPU kernel: lengths scalar-prefetched, blocks and
splits past a row's length skipped), ``gpu.py`` (Mosaic GPU kernel for Hopper: one CTA per
(batch, kv head, split), TMA ring of K/V tiles, WGMMA). Both kernels write (o, m, l) partials
per split; ``reference.combine_splits`` (XLA) merges them.

Which implementation runs (``impl``):
* ``"xla"``: the reference.
* ``"auto"``: the Pallas kernel of ``jax.default_backend()`` on TPU and GPU, the reference
  elsewhere (CPU).
* ``"pallas"``: the kernel of the current TPU/GPU; on CPU the kernel named by ``backend``
  ("tpu", the default, or "gpu") in interpret mode.
Fallbacks to XLA (also under ``"pallas"``, with a warning): T > 64 (the kernels encode a
query's new-token mask in two int32 words); on GPU when ``gpu.supported`` gives a reason
(f32 inputs, head_dim not a multiple of 64 or > 256, block_k not a multiple of 64).
``fallback_reason(...)`` tells in advance.
"""

from __future__ import annotations

import warnings

import jax

from effx.pallas_kernels._backend import resolve_target
from effx.pallas_kernels.decode_attention import reference as ref_lib
from effx.pallas_kernels.decode_attention import tpu as tpu_lib
from effx.pallas_kernels.decode_attention.config import BlockSizes
from effx.pallas_kernels.decode_attention.reference import decode_attention_reference
from effx.pallas_kernels.decode_attention.reference import visible_mask

__all__ = ["BlockSizes", "decode_attention", "decode_attention_reference", "fallback_reason",
           "resolve", "visible_mask"]


def resolve(impl: str = "auto", backend: str | None = None) -> tuple[str, bool]:
  """Returns ``(target, interpret)``: target in {"xla", "tpu", "gpu"}."""
  return resolve_target(impl, backend)


def _default_blocks(interpret: bool, head_dim: int) -> BlockSizes:
  if interpret:
    return BlockSizes()
  return BlockSizes.for_device(jax.devices()[0].device_kind, head_dim)


def fallback_reason(q, k, *, impl: str = "auto", backend: str | None = None,
                    block_sizes: BlockSizes | None = None) -> str | None:
  """Why ``decode_attention`` would run the XLA reference instead of the selected kernel."""
  target, interpret = resolve(impl, backend)
  if target == "xla":
    return None
  if q.shape[1] > ref_lib.MAX_NEW_TOKENS:
    return f"T={q.shape[1]} new tokens (the kernels take at most {ref_lib.MAX_NEW_TOKENS})"
  if target == "gpu":
    from effx.pallas_kernels.decode_attention import gpu as gpu_lib
    bs = block_sizes or _default_blocks(interpret, q.shape[-1])
    return gpu_lib.supported(q, k, block_sizes=bs)
  return None


def decode_attention(q, k, v, lengths, new_token_mask=None, *, sm_scale: float | None = None,
                     logit_soft_cap: float | None = None, block_sizes: BlockSizes | None = None,
                     impl: str = "auto", backend: str | None = None) -> jax.Array:
  """Attention of T new tokens over a KV cache (semantics: ``reference.py``), forward only.

  Args:
    q: ``[batch, T, heads, head_dim]``.
    k, v: ``[batch, max_len, kv_heads, head_dim]``, the cache after the T new keys/values were
      written at ``lengths[b] + arange(T)``; ``heads % kv_heads == 0``.
    lengths: int32 ``[batch]`` cache length before the new tokens (``lengths + T <= max_len``).
    new_token_mask: bool ``[batch, T, T]`` (which new tokens each new token sees) or None
      (causal).
    sm_scale: default ``1 / sqrt(head_dim)``.
    logit_soft_cap: scores -> ``cap * tanh(scores / cap)``.
    block_sizes: kernel tiling (default ``BlockSizes.for_device``; 128 in interpret mode).
    impl: "auto" | "xla" | "pallas" (module docstring).
    backend: on CPU with impl="pallas", which kernel to interpret: "tpu" (default) or "gpu".

  Returns:
    ``[batch, T, heads, head_dim]`` in q's dtype; queries that see nothing are 0.
  """
  ref_lib.check_inputs(q, k, v, lengths, new_token_mask)
  if logit_soft_cap is not None and logit_soft_cap <= 0:
    raise ValueError(f"logit_soft_cap={logit_soft_cap} must be > 0 or None")
  kw = dict(sm_scale=sm_scale, logit_soft_cap=logit_soft_cap)
  target, interpret = resolve(impl, backend)
  if target == "xla":
    return decode_attention_reference(q, k, v, lengths, new_token_mask, **kw)
  bs = block_sizes or _default_blocks(interpret, q.shape[-1])
  reason = fallback_reason(q, k, impl=impl, backend=backend, block_sizes=bs)
  if reason is not None:
    if impl == "pallas":
      warnings.warn(f"decode_attention: the {target} kernel does not apply ({reason}); "
                    "using XLA", stacklevel=2)
    return decode_attention_reference(q, k, v, lengths, new_token_mask, **kw)
  if target == "tpu":
    from jax.experimental.pallas import tpu as pltpu
    return tpu_lib.decode_attention_tpu(
        q, k, v, lengths, new_token_mask, block_sizes=bs,
        interpret=pltpu.InterpretParams() if interpret else None, **kw)
  from jax.experimental.pallas import mosaic_gpu as plgpu
  from effx.pallas_kernels.decode_attention import gpu as gpu_lib
  return gpu_lib.decode_attention_gpu(
      q, k, v, lengths, new_token_mask, block_sizes=bs,
      interpret=plgpu.InterpretGPUParams() if interpret else None, **kw)
