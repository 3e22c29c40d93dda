"""Block sizes of the head-sparse (MoH) attention kernels, with per-device defaults."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiles of the kernels.

  Attributes:
    block_q: query rows per tile; also the granularity of the activity map
      (``[batch, ceil(T / block_q), heads]``: one flag per (query block, head)). A multiple of
      8. Smaller blocks skip more (a block is computed if any of its tokens routed to the
      head) but amortise less per-step overhead.
    block_k: keys per tile; a multiple of 128 on TPU hardware (any multiple of 8 in
      interpret mode).
  """
  block_q: int = 128
  block_k: int = 128

  def __post_init__(self):
    for name in ("block_q", "block_k"):
      val = getattr(self, name)
      if not isinstance(val, int) or val <= 0 or val % 8:
        raise ValueError(f"BlockSizes.{name}={val!r} must be a positive multiple of 8")

  @classmethod
  def for_device(cls, device_kind: str, head_dim: int) -> "BlockSizes":
    """Defaults for a ``jax.Device.device_kind``.

    TPU: 256-row query tiles (half the dense flash kernel's 512: a routed head is skipped only
    where no token of the block selected it, so the activity granularity matters) and 512-key
    tiles (256 for head_dim > 128). Elsewhere (CPU interpret mode; GPU runs XLA): 128 x 128.
    """
    if "tpu" in device_kind.lower():
      return cls(block_q=256, block_k=512 if head_dim <= 128 else 256)
    return cls()
