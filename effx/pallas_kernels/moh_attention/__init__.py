"""Head-sparse mixture-of-head attention: one entry point over the XLA reference and the kernels.

    from effx.pallas_kernels.moh_attention import moh_attention, activity_map
    y = moh_attention(q, k, v, gates, segment_ids=seg)   # gates [batch, T, heads], 0 = unused

Causal softmax attention in which a (query block, head) pair is computed only if some token of
the block routed to the head (the activity map, by default derived from the gates), and whose
output is multiplied by the per-token head gates. Semantics: ``reference.py``.

Files: ``reference.py`` (pure jnp: dense attention, then gates, 0 on inactive pairs),
``config.py`` (``BlockSizes`` + per-device defaults), ``tpu.py`` (Mosaic TPU forward, dQ and
dK/dV kernels that skip inactive pairs via scalar-prefetched activity tables; custom_vjp),
``gpu.py`` (Mosaic GPU forward, dQ and dK/dV kernels for Hopper that read the activity map at
run time and skip inactive pairs; custom_vjp).

Which implementation runs (``impl``):
* ``"xla"``: the reference (computes every head; no savings).
* ``"auto"``: the kernel of ``jax.default_backend()`` on TPU and GPU, the reference elsewhere
  (CPU).
* ``"pallas"``: the kernel of the current TPU/GPU; on CPU the kernel named by ``backend``
  ("tpu", the default, or "gpu") in interpret mode.
Fallbacks to XLA on GPU (under ``"pallas"`` with a warning; ``fallback_reason`` says why in
advance): inputs the Mosaic GPU kernel does not take (f32, head_dim not a multiple of 64 or
> 256, block_q not 64/128, block_k not a multiple of 64). For head_dim > 128 the GPU forward
runs but its gradient is the XLA reference's (``gpu.backward_supported``).
"""

from __future__ import annotations

import warnings

import jax

from effx.pallas_kernels._backend import resolve_target
from effx.pallas_kernels.moh_attention import gpu as gpu_lib
from effx.pallas_kernels.moh_attention import tpu as tpu_lib
from effx.pallas_kernels.moh_attention.config import BlockSizes
from effx.pallas_kernels.moh_attention.reference import activity_map
from effx.pallas_kernels.moh_attention.reference import check_inputs
from effx.pallas_kernels.moh_attention.reference import moh_attention_reference

__all__ = ["BlockSizes", "activity_map", "default_block_sizes", "fallback_reason",
           "moh_attention", "moh_attention_reference", "resolve"]


def resolve(impl: str = "auto", backend: str | None = None) -> tuple[str, bool]:
  """Returns ``(target, interpret)``: target in {"xla", "tpu", "gpu"}."""
  return resolve_target(impl, backend, kernels=("tpu", "gpu"))


def default_block_sizes(impl: str = "auto", backend: str | None = None,
                        head_dim: int = 128) -> BlockSizes:
  """The blocks ``moh_attention`` uses when none are given (their block_q is the activity
  map's block): per-device defaults on TPU/GPU, 128 x 128 in interpret mode and on XLA."""
  target, interpret = resolve(impl, backend)
  if target in ("tpu", "gpu") and not interpret:
    return BlockSizes.for_device(jax.devices()[0].device_kind, head_dim)
  return BlockSizes()


def fallback_reason(impl: str = "auto", backend: str | None = None, *, q=None, k=None,
                    block_sizes: BlockSizes | None = None) -> str | None:
  """Why ``moh_attention`` would run the XLA reference instead of the selected kernel (None:
  it won't). ``q``, ``k``: the inputs (None: only the platform is checked)."""
  target, _ = resolve(impl, backend)
  if target != "gpu" or q is None:
    return None
  bs = block_sizes or default_block_sizes(impl, backend, q.shape[-1])
  return gpu_lib.supported(q, q if k is None else k, block_sizes=bs)


def moh_attention(q, k, v, gates, *, active=None, segment_ids=None,
                  logit_soft_cap: float | None = None, sm_scale: float | None = None,
                  block_sizes: BlockSizes | None = None, impl: str = "auto",
                  backend: str | None = None):
  """Head-sparse causal attention times per-token head gates (semantics: ``reference.py``).

  Args:
    q: ``[batch, T, heads, head_dim]``; k, v: ``[batch, T, kv_heads, head_dim]`` (GQA/MQA).
    gates: ``[batch, T, heads]`` per-token head gates (0 where the token did not pick the head).
    active: bool ``[batch, ceil(T / block_q), heads]`` or None (= ``activity_map(gates,
      block_q)``): pairs to compute; the others output 0.
    segment_ids: int32 ``[batch, T]`` or None (packed documents).
    logit_soft_cap: scores -> ``cap * tanh(scores / cap)``. sm_scale: default 1/sqrt(head_dim).
    block_sizes: kernel tiles (default ``default_block_sizes``); the XLA path uses block_q for
      the activity map too.
    impl: "auto" | "xla" | "pallas" (module docstring).
    backend: on CPU with impl="pallas", which kernel to interpret: "tpu" (default) or "gpu".

  Returns:
    ``[batch, T, heads, head_dim]`` in q's dtype, differentiable in q, k, v and gates.
  """
  target, interpret = resolve(impl, backend)
  bs = block_sizes or default_block_sizes(impl, backend, q.shape[-1])
  check_inputs(q, k, v, gates, active, bs.block_q)
  kw = dict(active=active, segment_ids=segment_ids, logit_soft_cap=logit_soft_cap,
            sm_scale=sm_scale)
  if target == "gpu":
    reason = gpu_lib.supported(q, k, block_sizes=bs)
    if reason is not None:
      if impl == "pallas":
        warnings.warn(f"moh_attention: Mosaic GPU kernel does not apply ({reason}); using XLA",
                      stacklevel=2)
      target = "xla"
  if target == "xla":
    return moh_attention_reference(q, k, v, gates, block_q=bs.block_q, **kw)
  if target == "tpu":
    from jax.experimental.pallas import tpu as pltpu
    return tpu_lib.moh_attention_tpu(
        q, k, v, gates, block_sizes=bs,
        interpret=pltpu.InterpretParams() if interpret else None, **kw)
  from jax.experimental.pallas import mosaic_gpu as plgpu
  return gpu_lib.moh_attention_gpu(
      q, k, v, gates, block_sizes=bs,
      interpret=plgpu.InterpretGPUParams() if interpret else None, **kw)
