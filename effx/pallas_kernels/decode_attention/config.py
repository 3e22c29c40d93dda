"""Block sizes of the decode-attention kernels, with per-device defaults."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiling of the KV cache.

  Attributes:
    block_k: cache slots per step (one K and one V tile of ``[block_k, head_dim]``). TPU: a
      multiple of 128 on hardware (any multiple of 8 in interpret mode). GPU: a multiple of 64.
    num_splits: KV splits computed in parallel (flash-decoding), each producing (m, l, o)
      partials that a combine step merges; None = ``default_splits`` for the device. Clipped
      to the number of key blocks.
    num_stages: GPU only, K/V tiles in flight (shared-memory ring depth, >= 2).
  """
  block_k: int = 128
  num_splits: int | None = None
  num_stages: int = 2

  def __post_init__(self):
    if self.block_k <= 0 or self.block_k % 8:
      raise ValueError(f"BlockSizes.block_k={self.block_k} must be a positive multiple of 8")
    if self.num_splits is not None and self.num_splits < 1:
      raise ValueError(f"BlockSizes.num_splits={self.num_splits} must be >= 1 or None")
    if self.num_stages < 2:
      raise ValueError(f"BlockSizes.num_stages={self.num_stages} must be >= 2")

  @classmethod
  def for_device(cls, device_kind: str, head_dim: int) -> "BlockSizes":
    """Defaults for a ``jax.Device.device_kind``.

    TPU: 512-slot tiles (a decode step is HBM-bound: big tiles amortise the ~0.35 us per grid
    step). GPU (Hopper): 128-slot tiles (64 for head_dim > 128) with a 3-deep ring. Unknown
    devices (CPU included) get 128.
    """
    kind = device_kind.lower()
    if "tpu" in kind:
      return cls(block_k=512 if head_dim <= 128 else 256)
    if any(g in kind for g in ("h100", "h200", "h800", "gh200", "h20")):
      return cls(block_k=128 if head_dim <= 128 else 64, num_stages=3 if head_dim <= 128 else 2)
    return cls()


def default_splits(device_kind: str, parallel_units: int, num_blocks: int) -> int:
  """KV splits when ``BlockSizes.num_splits`` is None.

  ``parallel_units`` = batch * kv_heads (the other parallel grid axes). GPU: enough CTAs for
  two per SM of an H100/H200 (132 SMs). TPU: 2 on megacore chips (v4, v5p: two TensorCores
  share the parallel grid axes), 1 elsewhere (one core runs the grid sequentially, a split
  only adds a combine). Interpret mode / CPU: 4, so that tests cover the combine.
  """
  kind = device_kind.lower()
  if "tpu" in kind:
    megacore = "v4" in kind or "v5p" in kind or kind.strip().split()[-1] == "v5"
    want = 2 if megacore and parallel_units == 1 else 1
  elif "nvidia" in kind or any(g in kind for g in ("h100", "h200", "a100")):
    want = -(-2 * 132 // max(1, parallel_units))
  else:
    want = 4
  return max(1, min(want, num_blocks))
