"""Fiddlers that put mixture-of-experts FFNs into a config."""

from __future__ import annotations

import copy

import fiddle as fdl

from effx.moe.layer import MoEFeedForward
from experiments.experiment import Experiment


def with_moe(cfg: fdl.Config[Experiment], num_experts: int = 8, top_k: int = 2,
             expert_dim: int | None = None, every: int = 1, num_shared_experts: int = 0,
             dispatch: str = "dropless", capacity_factor: float = 1.25,
             eval_capacity_factor: float = 2.0) -> fdl.Config[Experiment]:
  """Replaces the dense FFN by an MoE in every `every`-th layer (the last of each group).

  `expert_dim` defaults to the dense FFN width divided by `top_k`, so the active parameters
  per token match the dense layer. With capacity dispatch, tokens beyond an expert's capacity
  are dropped, so decoding one token at a time can differ from a full forward; an
  `eval_capacity_factor` >= num_experts / top_k never drops (dropless dispatch never does).
  """
  if cfg.model.num_layers % every:
    raise ValueError(f"with_moe.every: {every} does not divide model.num_layers="
                     f"{cfg.model.num_layers}")
  base = cfg.model.layer_pattern[0]
  dense_dim = base.ffn.hidden_dim
  moe_block = copy.deepcopy(base)
  moe_block.ffn = fdl.Partial(MoEFeedForward, num_experts=num_experts, top_k=top_k,
                              expert_dim=expert_dim or max(1, dense_dim // top_k),
                              num_shared_experts=num_shared_experts, dispatch=dispatch,
                              capacity_factor=capacity_factor,
                              eval_capacity_factor=eval_capacity_factor)
  cfg.model.layer_pattern = [copy.deepcopy(base) for _ in range(every - 1)] + [moe_block]
  return cfg
