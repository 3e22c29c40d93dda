"""Decode attention on GPU: no Mosaic GPU kernel yet; the entry point uses the XLA reference."""

from __future__ import annotations

from effx.pallas_kernels.decode_attention.config import BlockSizes


def supported(q, k, *, block_sizes: BlockSizes) -> str | None:
  """None if the Mosaic GPU kernel handles this call, else the reason it does not."""
  del q, k, block_sizes
  return "no Mosaic GPU decode kernel yet"


def decode_attention_gpu(*args, **kwargs):
  raise NotImplementedError("Mosaic GPU decode attention: not implemented yet")
