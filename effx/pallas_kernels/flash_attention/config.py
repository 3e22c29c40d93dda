"""Block sizes of the flash-attention kernels, with per-device defaults."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes of the kernels.

  Attributes:
    block_q: query rows per forward tile. TPU: a multiple of 8 (128+ recommended; 32 when a
      dense mask has partial tiles, int8 tiling). GPU (Mosaic GPU): 64 or 128, i.e. one or two
      compute warpgroups of 64 rows each.
    block_k: keys per forward tile. TPU: a multiple of 128 on hardware (any multiple of 8 in
      interpret mode). GPU: a multiple of 64.
    block_q_bwd, block_k_bwd: the backward tiling; None = the forward values. TPU: the dQ
      and dK/dV kernels share it. GPU: query rows per dQ CTA and keys per dK/dV CTA, 64 or
      128 each (one or two warpgroups).
    num_stages: GPU only, K/V tiles in flight (shared-memory ring buffer depth, >= 2).
  """
  block_q: int = 128
  block_k: int = 128
  block_q_bwd: int | None = None
  block_k_bwd: int | None = None
  num_stages: int = 2

  def __post_init__(self):
    for name in ("block_q", "block_k", "block_q_bwd", "block_k_bwd"):
      val = getattr(self, name)
      if val is not None and (val <= 0 or val % 8):
        raise ValueError(f"BlockSizes.{name}={val} must be a positive multiple of 8")
    if self.num_stages < 2:
      raise ValueError(f"BlockSizes.num_stages={self.num_stages} must be >= 2")

  @property
  def bwd(self) -> tuple[int, int]:
    """(block_q, block_k) of the backward kernels."""
    return (self.block_q_bwd or self.block_q, self.block_k_bwd or self.block_k)

  @classmethod
  def for_device(cls, device_kind: str, head_dim: int) -> "BlockSizes":
    """Defaults for a ``jax.Device.device_kind`` (e.g. "TPU v5 lite", "NVIDIA H100 80GB HBM3").

    TPU values follow the usual splash/flash choices (large tiles amortise the per-step
    overhead of the grid); GPU values fit two 64-row compute warpgroups plus a
    ``num_stages``-deep K/V ring in Hopper's 227 KiB of shared memory. Unknown devices
    (CPU included) get 128 x 128.
    """
    kind = device_kind.lower()
    if "tpu" in kind:
      big = head_dim <= 128
      if "v4" in kind or "v5p" in kind or "v5" == kind.strip().split()[-1]:
        return cls(block_q=512 if big else 256, block_k=512 if big else 256,
                   block_q_bwd=256, block_k_bwd=256)
      # v5e ("v5 lite"), v6e ("v6 lite"/"trillium") and later.
      return cls(block_q=512 if big else 256, block_k=1024 if big else 512,
                 block_q_bwd=256, block_k_bwd=512 if big else 256)
    if any(g in kind for g in ("h100", "h200", "h800", "gh200", "h20")):
      if head_dim <= 64:
        return cls(block_q=128, block_k=128, num_stages=3)
      if head_dim <= 128:
        return cls(block_q=128, block_k=128, num_stages=2)
      return cls(block_q=128, block_k=64, num_stages=2)
    return cls()
