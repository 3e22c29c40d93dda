"""Dense decoder-LM experiments at three sizes, and fiddlers that change one aspect each."""

from __future__ import annotations

import fiddle as fdl
import jax.numpy as jnp

from effx.attention.mha import MultiHeadAttention
from effx.data import DataConfig
from effx.decoding.head_training import HeadTrainConfig
from effx.decoding.sampling import SamplingConfig
from effx.layers.mlp import GatedMLP
from effx.layers.rotary import RotaryConfig
from effx.model import DecoderBlock, DecoderLM
from effx.sharding import MeshConfig
from effx.train import TrainConfig
from experiments.experiment import Experiment, GenerateConfig, SpeculativeBenchConfig

VOCAB_SIZE = 260  # 259 byte-level ids, rounded up to a multiple of 4


def dense_block(num_heads: int, num_kv_heads: int | None, mlp_dim: int,
                rope_base: float = 10_000.0) -> fdl.Partial[DecoderBlock]:
  """A pre-norm block with softmax attention and a SwiGLU MLP."""
  attention = fdl.Partial(MultiHeadAttention, num_heads=num_heads, num_kv_heads=num_kv_heads,
                          rotary=fdl.Config(RotaryConfig, base=rope_base))
  return fdl.Partial(DecoderBlock, attention=attention,
                     ffn=fdl.Partial(GatedMLP, hidden_dim=mlp_dim))


def _experiment(name: str, *, embed_dim: int, num_layers: int, num_heads: int,
                num_kv_heads: int | None, mlp_dim: int, seq_len: int, batch_size: int,
                steps: int, learning_rate: float, warmup_steps: int) -> fdl.Config[Experiment]:
  model = fdl.Config(DecoderLM, vocab_size=VOCAB_SIZE, embed_dim=embed_dim, num_layers=num_layers,
                     layer_pattern=[dense_block(num_heads, num_kv_heads, mlp_dim)])
  return fdl.Config(
      Experiment, name=name, model=model,
      data=fdl.Config(DataConfig, seq_len=seq_len, batch_size=batch_size),
      train=fdl.Config(TrainConfig, steps=steps, learning_rate=learning_rate,
                       warmup_steps=warmup_steps),
      mesh=fdl.Config(MeshConfig),
      generate=fdl.Config(GenerateConfig, sampling=fdl.Config(SamplingConfig)),
      speculative=fdl.Config(SpeculativeBenchConfig))


def lm_tiny() -> fdl.Config[Experiment]:
  """~3M parameters; trains to < 2 nats/byte on the stdlib corpus in minutes on 2 CPU cores."""
  cfg = _experiment("lm_tiny", embed_dim=256, num_layers=4, num_heads=4, num_kv_heads=None,
                    mlp_dim=640, seq_len=256, batch_size=16, steps=2000, learning_rate=4e-3,
                    warmup_steps=100)
  cfg.train.time_budget_s = 270.0
  cfg.train.checkpoint_every = 100
  return with_draft_heads(cfg)


def lm_small() -> fdl.Config[Experiment]:
  """~40M parameters, GQA; a single-accelerator research size."""
  cfg = _experiment("lm_small", embed_dim=512, num_layers=8, num_heads=8, num_kv_heads=2,
                    mlp_dim=1408, seq_len=1024, batch_size=32, steps=20_000,
                    learning_rate=1.5e-3, warmup_steps=1000)
  return with_bf16(cfg)


def lm_1b() -> fdl.Config[Experiment]:
  """~1B parameters, GQA, bf16 compute, rematerialised scanned layers: accelerator-sized."""
  cfg = _experiment("lm_1b", embed_dim=2048, num_layers=16, num_heads=16, num_kv_heads=4,
                    mlp_dim=8192, seq_len=2048, batch_size=256, steps=100_000,
                    learning_rate=3e-4, warmup_steps=2000)
  cfg.model.layer_pattern[0].attention.rotary.base = 500_000.0
  cfg.model.vocab_size = VOCAB_SIZE
  cfg.train.checkpoint_every = 1000
  return with_remat(with_bf16(cfg), policy="dots_no_batch")


def with_draft_heads(cfg: fdl.Config[Experiment], num_heads: int = 4, steps: int = 100,
                     time_budget_s: float = 300.0) -> fdl.Config[Experiment]:
  """Medusa, Hydra and Hydra++ heads trained on the frozen backbone after the LM.

  Medusa and Hydra learn the base model's own greedy choices (self-distillation); Hydra++ has
  the prefix-attention layer, deeper heads and the teacher (soft-label) loss. Every kind trains
  the same number of steps on the same batches (Hydra++'s steps cost about twice Hydra's: a
  time budget would train it half as long); `time_budget_s` only guards against a stalled
  run. Both Hydra kinds agree better with the base model at learning rate 2e-3 than 1e-3.
  """
  common = dict(num_heads=num_heads, steps=steps, time_budget_s=time_budget_s)
  cfg.heads = [
      fdl.Config(HeadTrainConfig, kind="medusa", target="self", **common),
      fdl.Config(HeadTrainConfig, kind="hydra", target="self", learning_rate=2e-3, **common),
      fdl.Config(HeadTrainConfig, kind="hydra++", target="teacher", num_blocks=4,
                 learning_rate=2e-3, **common),
  ]
  return cfg


def with_bf16(cfg: fdl.Config[Experiment]) -> fdl.Config[Experiment]:
  """bfloat16 compute with float32 parameters."""
  cfg.model.dtype = jnp.bfloat16
  cfg.model.param_dtype = jnp.float32
  return cfg


def with_remat(cfg: fdl.Config[Experiment], policy: str = "full") -> fdl.Config[Experiment]:
  """Rematerialise each scanned layer group with `policy` (see effx.model.REMAT_POLICIES)."""
  cfg.model.remat_policy = policy
  return cfg


def with_mesh(cfg: fdl.Config[Experiment], data: int = -1, fsdp: int = 1, tensor: int = 1,
              expert: int = 1) -> fdl.Config[Experiment]:
  """Sets the mesh axis sizes (one may be -1 for "the rest")."""
  cfg.mesh = fdl.Config(MeshConfig, data=data, fsdp=fsdp, tensor=tensor, expert=expert)
  return cfg
