"""Experiments on an imported Hugging Face checkpoint (effx/hf_import.py).

    python -m experiments.main --config "config:hf_model(path='/models/Llama-3.2-1B')" \
        --config fiddler:with_bf16 --workdir runs/llama_medusa --mode train_heads
    python -m experiments.main --config "config:hf_model(path='/models/Llama-3.2-1B')" \
        --config fiddler:with_bf16 --workdir runs/llama_medusa --mode speculative

The model config is written out field by field from the checkpoint's config.json (so `set:`
and fiddlers change it like any other config) and `init_from_hf` makes `--mode eval`,
`generate`, `train_heads` and `speculative` start from the checkpoint's weights instead of a
checkpoint in the workdir. Training the base model itself (`--mode train` / `main`) from them is
not supported.

Data caveat: effx's pipeline is byte-level (token id = byte + 3), not the checkpoint's
tokenizer. With the default self-distillation target the heads learn the base model's own
predictions on those inputs, which exercises the whole path; for heads that help on real text,
train them on text tokenised with the model's tokenizer.
"""

from __future__ import annotations

import os

import fiddle as fdl

from effx import hf_import
from effx.data import DataConfig
from effx.decoding.head_training import HeadTrainConfig
from effx.decoding.sampling import SamplingConfig
from effx.sharding import MeshConfig
from effx.train import TrainConfig
from experiments.experiment import Experiment, GenerateConfig, SpeculativeBenchConfig


def hf_model(path: str, num_heads: int = 4, steps: int = 400, seq_len: int = 256,
             batch_size: int = 8, time_budget_s: float | None = 600.0,
             scan_layers: bool = False) -> fdl.Config[Experiment]:
  """Medusa heads (self-distilled) on the Llama / Mistral / Qwen2 checkpoint in `path`.

  Args:
    path: a Hugging Face checkpoint directory (config.json + safetensors).
    num_heads: Medusa heads.
    steps / time_budget_s: head-training length.
    seq_len / batch_size: rows the heads train on.
    scan_layers: stacked (scanned) layers instead of one parameter subtree per HF layer.
  """
  path = os.path.abspath(os.path.expanduser(path))
  spec = hf_import.read_spec(path)
  model = hf_import.describe_model(spec, partial=fdl.Partial, make=fdl.Config,
                                   scan_layers=scan_layers)
  heads = [fdl.Config(HeadTrainConfig, kind="medusa", target="self", num_heads=num_heads,
                      steps=steps, time_budget_s=time_budget_s)]
  return fdl.Config(
      Experiment, name=f"hf_{spec.architecture}", model=model,
      data=fdl.Config(DataConfig, seq_len=seq_len, batch_size=batch_size),
      train=fdl.Config(TrainConfig), mesh=fdl.Config(MeshConfig),
      generate=fdl.Config(GenerateConfig, sampling=fdl.Config(SamplingConfig)), speculative=fdl.Config(SpeculativeBenchConfig),
      heads=heads, init_from_hf=path)
