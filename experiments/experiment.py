"""The experiment: everything a run needs, as one dataclass that fiddle configs build."""

from __future__ import annotations

import dataclasses

from effx.data import DataConfig
from effx.decoding.sampling import SamplingConfig
from effx.model import DecoderLM
from effx.sharding import MeshConfig
from effx.train import TrainConfig


@dataclasses.dataclass(frozen=True)
class GenerateConfig:
  """Settings of `--mode generate` and of the completion shown by `--mode main`.

  Attributes:
    prompt: the text to complete.
    max_new_tokens: tokens generated per prompt.
    max_len: KV-cache length (prompt + new tokens must fit).
    sampling: greedy / temperature / top-k / top-p.
    seed: sampling seed.
  """

  prompt: str = "def fibonacci(n):\n    "
  max_new_tokens: int = 128
  max_len: int = 512
  sampling: SamplingConfig = SamplingConfig()
  seed: int = 0

  def __post_init__(self):
    if not self.prompt:
      raise ValueError("generate.prompt: empty; give at least one character to complete")
    if self.max_new_tokens < 1:
      raise ValueError(f"generate.max_new_tokens: got {self.max_new_tokens}; must be >= 1")
    if self.max_len < 2:
      raise ValueError(f"generate.max_len: got {self.max_len}; must be >= 2")


@dataclasses.dataclass(frozen=True)
class Experiment:
  """A complete run description.

  Attributes:
    name: a label for logs.
    model: the `DecoderLM`.
    data: corpus and batching.
    train: optimisation, eval, checkpointing.
    mesh: device mesh and logical-axis rules.
    generate: text completion settings.
  """

  name: str
  model: DecoderLM
  data: DataConfig
  train: TrainConfig
  mesh: MeshConfig = MeshConfig()
  generate: GenerateConfig = GenerateConfig()

  def __post_init__(self):
    from effx.data import ByteTokenizer
    if self.model.vocab_size < ByteTokenizer.vocab_size:
      raise ValueError(f"model.vocab_size: got {self.model.vocab_size}; the byte tokenizer needs "
                       f">= {ByteTokenizer.vocab_size}")
