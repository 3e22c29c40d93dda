"""The experiment: everything a run needs, as one dataclass that fiddle configs build."""

from __future__ import annotations

import dataclasses
import os

from effx.data import DataConfig
from effx.decoding.head_training import HeadTrainConfig
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
    prompt_bytes = len(self.prompt.encode("utf-8"))
    needed = 1 + prompt_bytes + self.max_new_tokens  # BOS + prompt + new tokens
    if needed > self.max_len:
      raise ValueError(f"generate.max_len: got {self.max_len}; the prompt ({prompt_bytes} bytes "
                       f"+ BOS) plus max_new_tokens={self.max_new_tokens} needs >= {needed}")


@dataclasses.dataclass(frozen=True)
class SpeculativeBenchConfig:
  """How `--mode speculative` (and the end of `--mode main`) measures draft heads.

  Attributes:
    num_prompts: held-out prompts (cut from eval-split files); every batch size runs all of
      them in consecutive batches (a remainder smaller than the batch is left out).
    prompt_bytes: prompt length in bytes.
    max_new_tokens: tokens generated per prompt.
    batch_sizes: batch sizes measured (each a separate side-by-side comparison).
    candidate_tree_nodes: tree sizes T (root included) whose verify latency is measured; the
      tree is the best of these for the measured acceptance (tokens/s).
    repeats: timed repeats (best of) per measurement; the machine may be shared.
  """

  num_prompts: int = 8
  prompt_bytes: int = 96
  max_new_tokens: int = 96
  batch_sizes: tuple[int, ...] = (1, 8)
  candidate_tree_nodes: tuple[int, ...] = (2, 3, 4, 5, 6, 8, 12, 16)
  repeats: int = 5

  def __post_init__(self):
    object.__setattr__(self, "batch_sizes", tuple(self.batch_sizes))
    object.__setattr__(self, "candidate_tree_nodes", tuple(self.candidate_tree_nodes))
    if any(b < 1 for b in self.batch_sizes) or not self.batch_sizes:
      raise ValueError(f"speculative.batch_sizes: got {self.batch_sizes}; need sizes >= 1")
    if any(t < 2 for t in self.candidate_tree_nodes) or not self.candidate_tree_nodes:
      raise ValueError(f"speculative.candidate_tree_nodes: got {self.candidate_tree_nodes}; "
                       f"need sizes >= 2 (root + at least one draft)")
    if self.num_prompts < max(self.batch_sizes):
      raise ValueError(f"speculative.num_prompts: got {self.num_prompts}; must be >= the "
                       f"largest batch size {max(self.batch_sizes)}")


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
    heads: draft heads trained by `--mode train_heads` / `main` (none: skip).
    speculative: how draft heads are measured against plain decoding.
    init_from_hf: a Hugging Face checkpoint directory (effx/hf_import.py) whose weights
      eval / generate / train_heads / speculative use instead of the workdir's
      checkpoint (None: the workdir's).
  """

  name: str
  model: DecoderLM
  data: DataConfig
  train: TrainConfig
  mesh: MeshConfig = MeshConfig()
  generate: GenerateConfig = GenerateConfig()
  heads: tuple[HeadTrainConfig, ...] = ()
  speculative: SpeculativeBenchConfig = SpeculativeBenchConfig()
  init_from_hf: str | None = None

  def __post_init__(self):
    object.__setattr__(self, "heads", tuple(self.heads))
    kinds = [h.kind for h in self.heads]
    if len(set(kinds)) != len(kinds):
      raise ValueError(f"heads: kinds must be distinct, got {kinds}")
    if self.init_from_hf is not None and not os.path.isfile(
        os.path.join(self.init_from_hf, "config.json")):
      raise ValueError(f"init_from_hf: got {self.init_from_hf!r}; no config.json there")
    from effx.data import ByteTokenizer
    if self.model.vocab_size < ByteTokenizer.vocab_size:
      raise ValueError(f"model.vocab_size: got {self.model.vocab_size}; the byte tokenizer needs "
                       f">= {ByteTokenizer.vocab_size}")
    if self.data.batch_size % self.train.grad_accum_steps:
      raise ValueError(f"train.grad_accum_steps: got {self.train.grad_accum_steps}; must divide "
                       f"data.batch_size={self.data.batch_size}")
    self._check_windows()

  def _check_windows(self) -> None:
    """A sliding window longer than every sequence the run sees never binds: an error.

    The longest sequence is max(data.seq_len, generate.max_len) (training rows, the
    completion's cache). A window equal to it is allowed (harmless); a longer one is a typo
    or a config meant for another length, so it is refused before any compute.
    """
    from effx.attention import masks
    if self.init_from_hf:  # an imported checkpoint's window is part of the model: keep it
      return
    longest = max(self.data.seq_len, self.generate.max_len)
    for i, factory in enumerate(self.model.layer_pattern):
      attention = factory(parent=None).make_attention(parent=None)
      windows = [getattr(attention, "window", None)]
      todo = [getattr(attention, "mask", None)]
      while todo:  # the windows inside a (combined) mask object
        m = todo.pop()
        if isinstance(m, (masks.SlidingWindowMask, masks.LocalGlobalMask)):
          windows.append(m.window)
        if isinstance(m, masks.Mask) and dataclasses.is_dataclass(m):
          todo += [getattr(m, f.name, None) for f in dataclasses.fields(m)]
      for w in windows:
        if isinstance(w, int) and w > longest:
          raise ValueError(f"model.layer_pattern[{i}].attention: window {w} is longer than the "
                           f"longest sequence {longest} (max of data.seq_len="
                           f"{self.data.seq_len}, generate.max_len={self.generate.max_len}); "
                           f"use a window <= {longest}")
