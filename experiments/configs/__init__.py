"""Experiment configs (plain functions returning `fdl.Config[Experiment]`) and fiddlers."""

from experiments.configs.lm import (lm_1b, lm_small, lm_tiny, with_bf16, with_draft_heads,
                                    with_mesh, with_remat)

__all__ = ["lm_tiny", "lm_small", "lm_1b", "with_remat", "with_bf16", "with_mesh",
           "with_draft_heads"]
