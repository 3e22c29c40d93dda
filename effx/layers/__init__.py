"""Primitives: norms, embeddings, dense MLPs, rotary embeddings. No other effx import."""

from effx.layers.embedding import Embed
from effx.layers.mlp import MLP, GatedMLP, activation
from effx.layers.norms import LayerNorm, RMSNorm, make_norm
from effx.layers.rotary import RotaryConfig, apply_rotary

__all__ = ["Embed", "MLP", "GatedMLP", "activation", "LayerNorm", "RMSNorm", "make_norm",
           "RotaryConfig", "apply_rotary"]
