"""Experiment configs (plain functions returning `fdl.Config[Experiment]`) and fiddlers."""

from experiments.configs.attention import (with_based, with_blockwise, with_global_every,
                                           with_linear_attention, with_moh, with_sliding_window)
from experiments.configs.hf import hf_model
from experiments.configs.lm import (lm_1b, lm_small, lm_tiny, with_bf16, with_draft_heads,
                                    with_mesh, with_remat)
from experiments.configs.moe import with_moe

__all__ = ["lm_tiny", "lm_small", "lm_1b", "hf_model", "with_remat", "with_bf16", "with_mesh",
           "with_draft_heads", "with_sliding_window", "with_global_every", "with_blockwise",
           "with_linear_attention", "with_based", "with_moh", "with_moe"]
