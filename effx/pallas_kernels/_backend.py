"""Which implementation a kernel entry point runs: the one rule every op shares."""

from __future__ import annotations

from collections.abc import Sequence

import jax

IMPLS = ("auto", "xla", "pallas")
BACKENDS = ("tpu", "gpu")


def resolve_target(impl: str, backend: str | None, *, kernels: Sequence[str] = BACKENDS,
                   gpu_auto: bool = True) -> tuple[str, bool]:
  """Returns `(target, interpret)` with target in {"xla", "tpu", "gpu"}.

  impl "xla" -> XLA. On a TPU/GPU the platform's kernel runs (XLA where the op has no kernel
  for it in `kernels`, or for "auto" on GPU when `gpu_auto` is False); `backend` must then
  match the platform. On CPU "auto" is XLA and "pallas" interprets the kernel of `backend`
  (default "tpu"); `backend` must name one of the op's `kernels`.
  """
  if impl not in IMPLS:
    raise ValueError(f"impl={impl!r}; allowed: {IMPLS}")
  if backend is not None and backend not in kernels:
    raise ValueError(f"backend={backend!r}; allowed: None, {tuple(kernels)}")
  if impl == "xla":
    return "xla", False
  platform = jax.default_backend()
  if platform in BACKENDS:
    if backend is not None and backend != platform:
      raise ValueError(f"backend={backend!r} but jax.default_backend() is {platform!r}")
    if platform not in kernels or (impl == "auto" and platform == "gpu" and not gpu_auto):
      return "xla", False
    return platform, False
  if impl == "auto":
    return "xla", False
  return backend or "tpu", True
