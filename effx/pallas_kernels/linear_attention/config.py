"""Block sizes of the chunked linear-attention kernels, with per-device defaults."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiles of the chunked kernels.

  Attributes:
    chunk_size: C, tokens per chunk (one grid step). The intra-chunk part is a masked
      ``[C, C]`` quadratic, the inter-chunk part goes through the ``[d_k, d_v]`` state. TPU
      hardware: a multiple of 128 (C is the lane dim of the score tiles); any positive value in
      TPU interpret mode. GPU kernel (hardware and interpret mode): 64, one WGMMA tile of a
      warpgroup (other values run XLA on GPU).
    sub_chunk: GLA only: the chunk is split into sub-chunks of this many tokens; pairs in
      different sub-chunks factor through a sub-chunk boundary (MXU matmuls, every exponent
      ``<= 0``), pairs inside one use a ``[sub, sub, d_k]`` elementwise tensor. Must divide
      ``chunk_size`` (a multiple of 8 on TPU hardware).
  """
  chunk_size: int = 64
  sub_chunk: int = 16

  def __post_init__(self):
    for name in ("chunk_size", "sub_chunk"):
      val = getattr(self, name)
      if not isinstance(val, int) or val <= 0:
        raise ValueError(f"BlockSizes.{name}={val!r} must be a positive int")

  def sub_for(self, chunk: int | None = None) -> int:
    """The GLA sub-chunk actually used: ``sub_chunk`` capped at the chunk; must divide it."""
    c = chunk or self.chunk_size
    s = min(self.sub_chunk, c)
    if c % s:
      raise ValueError(f"BlockSizes.sub_chunk={self.sub_chunk} must divide "
                       f"chunk_size={c}")
    return s

  @classmethod
  def for_device(cls, device_kind: str, head_dim: int) -> "BlockSizes":
    """Defaults for a ``jax.Device.device_kind``.

    TPU: C = 128 (lane-dense ``[C, C]`` score tiles; the state matmuls are ``[C, d]`` x
    ``[d, d]``), sub-chunks of 16 (the ``[16, 16, d_k]`` gate tensor stays small; 32 for
    ``d_k <= 64``). Elsewhere (CPU interpret mode, and GPU, whose Mosaic GPU kernel is built
    around C = 64): fla's usual C = 64.
    """
    if "tpu" in device_kind.lower():
      return cls(chunk_size=128, sub_chunk=32 if head_dim <= 64 else 16)
    return cls()
