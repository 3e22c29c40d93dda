"""Block sizes of the head-sparse (MoH) attention kernels, with per-device defaults."""

from __future__ import annotations

import dataclasses

_HOPPER = ("h100", "h200", "h800", "gh200", "h20")


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiles of the kernels.

  Attributes:
    block_q: query rows per tile; also the granularity of the activity map
      (``[batch, ceil(T / block_q), heads]``: one flag per (query block, head)). A multiple of
      8 (GPU: 64 or 128, one or two 64-row compute warpgroups). Smaller blocks skip more (a
      block is computed if any of its tokens routed to the head) but amortise less per-step
      overhead.
    block_k: keys per forward tile; a multiple of 128 on TPU hardware (any multiple of 8 in
      TPU interpret mode); a multiple of 64 on GPU.
    num_stages: GPU only: K/V tiles in flight (shared-memory ring depth, >= 2).
  """
  block_q: int = 128
  block_k: int = 128
  num_stages: int = 2

  def __post_init__(self):
    for name in ("block_q", "block_k"):
      val = getattr(self, name)
      if not isinstance(val, int) or val <= 0 or val % 8:
        raise ValueError(f"BlockSizes.{name}={val!r} must be a positive multiple of 8")
    if not isinstance(self.num_stages, int) or self.num_stages < 2:
      raise ValueError(f"BlockSizes.num_stages={self.num_stages!r} must be an int >= 2")

  @classmethod
  def for_device(cls, device_kind: str, head_dim: int) -> "BlockSizes":
    """Defaults for a ``jax.Device.device_kind``.

    TPU: 256-row query tiles (half the dense flash kernel's 512: a routed head is skipped only
    where no token of the block selected it, so the activity granularity matters) and 512-key
    tiles (256 for head_dim > 128). Hopper GPUs: 128 x 128 (64-key tiles for head_dim > 128,
    three stages for head_dim 64), sized so two compute warpgroups plus the K/V ring fit in
    227 KiB of shared memory. Elsewhere (CPU interpret mode): 128 x 128.
    """
    kind = device_kind.lower()
    if "tpu" in kind:
      return cls(block_q=256, block_k=512 if head_dim <= 128 else 256)
    if any(g in kind for g in _HOPPER):
      if head_dim <= 64:
        return cls(block_q=128, block_k=128, num_stages=3)
      return cls(block_q=128, block_k=128 if head_dim <= 128 else 64)
    return cls()
