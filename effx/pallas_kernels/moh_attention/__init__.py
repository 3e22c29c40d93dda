"""Head-sparse mixture-of-head attention: one entry point over the XLA reference and the kernels.

    from effx.pallas_kernels.moh_attention import moh_attention, activity_map
    y = moh_attention(q, k, v, gates, segment_ids=seg)   # gates [batch, T, heads], 0 = unused

Causal softmax attention in which a (query block, head) pair is computed only if some token of
the block routed to the head (the activity map, by default derived from the gates), and whose
output is multiplied by the per-token head gates. Semantics: ``reference.py``.

Files: ``reference.py`` (pure jnp: dense attention, then gates, 0 on inactive pairs),
``config.py`` (``BlockSizes`` + per-device defaults), ``tpu.py`` (Mosaic TPU forward, dQ and
dK/dV kernels that skip inactive pairs via scalar-prefetched activity tables; custom_vjp).

Which implementation runs (``impl``):
* ``"xla"``: the reference (computes every head; no savings).
* ``"auto"``: the TPU kernel on TPU, the reference elsewhere (CPU, GPU).
* ``"pallas"``: the TPU kernel on TPU; on CPU the TPU kernel in interpret mode (``backend``
  "tpu", the only kernel backend); on GPU the XLA reference with a warning (no Mosaic GPU
  kernel for this op yet; ``fallback_reason`` says so).
"""

from __future__ import annotations

import warnings

import jax

from effx.pallas_kernels._backend import resolve_target
from effx.pallas_kernels.moh_attention import tpu as tpu_lib
from effx.pallas_kernels.moh_attention.config import BlockSizes
from effx.pallas_kernels.moh_attention.reference import activity_map
from effx.pallas_kernels.moh_attention.reference import check_inputs
from effx.pallas_kernels.moh_attention.reference import moh_attention_reference

__all__ = ["BlockSizes", "activity_map", "fallback_reason", "moh_attention",
           "moh_attention_reference", "resolve"]


def resolve(impl: str = "auto", backend: str | None = None) -> tuple[str, bool]:
  """Returns ``(target, interpret)``: target in {"xla", "tpu"}."""
  return resolve_target(impl, backend, kernels=("tpu",))


def fallback_reason(impl: str = "auto", backend: str | None = None) -> str | None:
  """Why ``impl="pallas"`` would run the XLA reference instead of a kernel (None: it won't)."""
  if impl == "pallas" and jax.default_backend() == "gpu":
    return "no Mosaic GPU kernel for head-sparse MoH attention (XLA dense reference)"
  return None


def default_block_sizes(impl: str = "auto", backend: str | None = None,
                        head_dim: int = 128) -> BlockSizes:
  """The blocks ``moh_attention`` uses when none are given (their block_q is the activity
  map's block)."""
  target, interpret = resolve(impl, backend)
  if target == "tpu" and not interpret:
    return BlockSizes.for_device(jax.devices()[0].device_kind, head_dim)
  return BlockSizes()


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
    backend: on CPU with impl="pallas": "tpu" (the default and only one).

  Returns:
    ``[batch, T, heads, head_dim]`` in q's dtype, differentiable in q, k, v and gates.
  """
  target, interpret = resolve(impl, backend)
  bs = block_sizes or default_block_sizes(impl, backend, q.shape[-1])
  check_inputs(q, k, v, gates, active, bs.block_q)
  kw = dict(active=active, segment_ids=segment_ids, logit_soft_cap=logit_soft_cap,
            sm_scale=sm_scale)
  reason = fallback_reason(impl, backend)
  if reason is not None:
    warnings.warn(f"moh_attention: {reason}; using XLA", stacklevel=2)
  if target == "xla":
    return moh_attention_reference(q, k, v, gates, block_q=bs.block_q, **kw)
  from jax.experimental.pallas import tpu as pltpu
  return tpu_lib.moh_attention_tpu(
      q, k, v, gates, block_sizes=bs, interpret=pltpu.InterpretParams() if interpret else None,
      **kw)
