"""Block sizes of the grouped-matmul kernels, with per-device defaults."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiles of the grouped matmul ``[M, K] x [G, K, N] -> [M, N]``.

  Attributes:
    block_m: rows per tile (a tile spanning several groups is computed once per group, with the
      rows of the other groups masked). TPU: a multiple of 8 (16 for bf16).
    block_k: contraction tile of the forward (the output tile of the lhs gradient). TPU: a
      multiple of 128 on hardware; K itself is used when block_k does not divide it.
    block_n: output tile of the forward (the contraction tile of the lhs gradient). Same rules.
    num_stages: GPU only: depth of the TMA -> shared memory ring.
  TPU: the weight-gradient kernel uses (block_m, block_k, block_n) with block_m as its
  contraction. GPU (``gpu.py``) reads them by role instead: block_m = row tile of the forward
  and lhs-gradient kernels (a multiple of 64, the WGMMA M), block_k = the contraction step of
  every kernel (64: one 128-byte swizzled row of a 16-bit type; for the weight gradient, rows
  per step), block_n = every output tile width (a multiple of 64; 64 where it does not divide
  the dimension; the weight gradient's tile is block_n x block_n).
  """
  block_m: int = 128
  block_k: int = 128
  block_n: int = 128
  num_stages: int = 4

  def __post_init__(self):
    for name in ("block_m", "block_k", "block_n"):
      val = getattr(self, name)
      if val <= 0 or val % 8:
        raise ValueError(f"BlockSizes.{name}={val} must be a positive multiple of 8")
    if self.num_stages < 1:
      raise ValueError(f"BlockSizes.num_stages={self.num_stages} must be >= 1")

  @classmethod
  def for_device(cls, device_kind: str, m: int, k: int, n: int) -> "BlockSizes":
    """Defaults for a ``jax.Device.device_kind`` and problem size.

    TPU: 512-row tiles (fewer, larger MXU passes; megablox's tuned tables sit around 512 x
    1024 x 1024 for large MoE layers), 1024-wide K/N tiles where they divide, else 512 / 256 /
    128. GPU (any NVIDIA kind, or "gpu"): 128 rows, contraction steps of 64, 128-wide output
    tiles, 5 stages (the Mosaic GPU kernel's roles, class docstring; H200 sweep of the forward
    at M 65536, 2048 -> 1408, 8 experts: 5 stages 0.858 ms, 4 stages 0.912, 2 stages 1.002;
    128-row steps 1.390, 64 x 256 tiles 1.547). Unknown devices (CPU included) get 128^3.
    """
    kind = device_kind.lower()
    if kind == "gpu" or "nvidia" in kind or kind.startswith(("h100", "h200", "h800")):
      return cls(block_m=128, block_k=64, block_n=128, num_stages=5)
    if "tpu" not in kind:
      return cls()

    def fit(dim: int) -> int:
      for tile in (1024, 512, 256, 128):
        if dim % tile == 0:
          return tile
      return 128

    return cls(block_m=512 if m >= 512 else 128, block_k=fit(k), block_n=fit(n))
