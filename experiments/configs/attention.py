"""Fiddlers that choose the attention kind per layer (each changes one aspect of a config)."""

from __future__ import annotations

import copy

import fiddle as fdl

from effx.attention import masks
from effx.attention.linear import BasedAttention, LinearAttention
from effx.attention.moh import MixtureOfHeadsAttention
from experiments.experiment import Experiment


def _attention(cfg: fdl.Config[Experiment], i: int = 0) -> fdl.Partial:
  return cfg.model.layer_pattern[i].attention


def _heads_and_dim(cfg: fdl.Config[Experiment]) -> tuple[int, int]:
  heads = _attention(cfg).num_heads
  return heads, cfg.model.embed_dim // heads


def with_sliding_window(cfg: fdl.Config[Experiment], window: int = 64) -> fdl.Config[Experiment]:
  """Every layer attends to the last `window` positions only."""
  for blk in cfg.model.layer_pattern:
    blk.attention.mask = masks.CausalMask() & masks.SlidingWindowMask(window)
  return cfg


def with_global_every(cfg: fdl.Config[Experiment], every: int = 4,
                      window: int = 64) -> fdl.Config[Experiment]:
  """Hybrid pattern: every `every`-th layer full causal softmax, the others a sliding window."""
  if cfg.model.num_layers % every:
    raise ValueError(f"with_global_every.every: {every} does not divide model.num_layers="
                     f"{cfg.model.num_layers}")
  local = copy.deepcopy(cfg.model.layer_pattern[0])
  local.attention.mask = masks.CausalMask() & masks.SlidingWindowMask(window)
  glob = copy.deepcopy(cfg.model.layer_pattern[0])
  cfg.model.layer_pattern = [copy.deepcopy(local) for _ in range(every - 1)] + [glob]
  return cfg


def with_blockwise(cfg: fdl.Config[Experiment], block_size: int = 256) -> fdl.Config[Experiment]:
  """Memory-efficient online-softmax attention over key blocks (skips empty blocks)."""
  for blk in cfg.model.layer_pattern:
    blk.attention.impl = "blockwise"
    blk.attention.block_size = block_size
  return cfg


def with_linear_attention(cfg: fdl.Config[Experiment], feature_map: str = "elu",
                          decay: str = "none", chunk_size: int = 64) -> fdl.Config[Experiment]:
  """Linear attention in every layer (feature map: elu, relu, taylor, performer, identity;
  decay: none, retnet, gla, delta)."""
  heads, head_dim = _heads_and_dim(cfg)
  for blk in cfg.model.layer_pattern:
    blk.attention = fdl.Partial(LinearAttention, num_heads=heads, head_dim=head_dim,
                                feature_map=feature_map, decay=decay, chunk_size=chunk_size)
  return cfg


def with_based(cfg: fdl.Config[Experiment], feature_dim: int = 16,
               window: int = 64) -> fdl.Config[Experiment]:
  """Based: Taylor linear attention + sliding-window softmax in every layer."""
  heads, head_dim = _heads_and_dim(cfg)
  for blk in cfg.model.layer_pattern:
    blk.attention = fdl.Partial(BasedAttention, num_heads=heads, head_dim=head_dim,
                                feature_dim=feature_dim, window=window)
  return cfg


def with_moh(cfg: fdl.Config[Experiment], num_shared_heads: int = 1, top_k: int | None = None,
             impl: str = "head_sparse") -> fdl.Config[Experiment]:
  """Mixture-of-head attention in every layer: shared heads + top-k routed heads per token."""
  for blk in cfg.model.layer_pattern:
    old = blk.attention
    blk.attention = fdl.Partial(MixtureOfHeadsAttention, num_heads=old.num_heads,
                                num_kv_heads=old.num_kv_heads, rotary=old.rotary,
                                num_shared_heads=num_shared_heads, top_k=top_k, impl=impl)
  return cfg


__all__ = ["with_sliding_window", "with_global_every", "with_blockwise", "with_linear_attention",
           "with_based", "with_moh"]
