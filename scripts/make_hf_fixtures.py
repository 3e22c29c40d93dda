"""Writes tiny Hugging Face checkpoints + reference outputs for effx's import parity tests.

Runs in its OWN environment (PyTorch and transformers are not effx dependencies, and effx
needs Python >= 3.12 where this project has no torch wheel):

    /root/.pyenv/versions/3.11.7/bin/python3 -m venv /tmp/hfenv   # any Python torch supports
    /tmp/hfenv/bin/pip install torch==2.13.0 transformers safetensors numpy
    /tmp/hfenv/bin/python scripts/make_hf_fixtures.py            # -> tests/fixtures/hf/<name>/

For each fixture `<name>` (llama, qwen2, mistral) the directory holds what `save_pretrained`
writes (config.json, safetensors weights; mistral is sharded through
model.safetensors.index.json) plus

    tokens.npy   int32 [batch, seq]        the fixed prompt batch
    logits.npy   float32 [batch, seq, V]   the model's logits on it (fp32, eager attention)
    greedy.npy   int32 [batch, new]        greedy continuation (full re-forward each step)
    fixture.json seeds, versions and the smallest top-1/top-2 logit margin of the rollout

Arrays are written with `np.save(..., allow_pickle=False)`. Everything is seeded, so rerunning
reproduces the files (up to torch's CPU kernels across versions).

`--check DIR --against tests/fixtures/hf/NAME` instead loads DIR (e.g. written by
`effx.hf_import.export_hf`) with transformers and prints the max |logit difference| against the
fixture's logits: the check that effx's exported checkpoints are readable by transformers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch
import transformers
from transformers import (AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM)

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "hf")
BATCH, SEQ, NEW_TOKENS = 2, 12, 8


def fixtures() -> dict:
  """name -> (model class, config, seed, save_pretrained kwargs)."""
  common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0)
  return {
      # GQA (4 query heads, 2 kv heads) and llama3 rope scaling; head_dim 8 with theta 10000 has
      # wavelengths 6.3 / 63 / 628 / 6283: one high-frequency (unchanged), one medium (smoothed)
      # and two low-frequency (divided by factor) channel pairs for original_max 128.
      # vocab 260 >= the byte tokenizer's 259 so `--mode train_heads` runs on it.
      "llama": (LlamaForCausalLM, LlamaConfig(
          vocab_size=260, num_key_value_heads=2, rope_theta=10_000.0,
          rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                            high_freq_factor=4.0, original_max_position_embeddings=128),
          **common), 0, {}),
      # q/k/v biases, tied input/output embeddings, plain rope with a large theta.
      "qwen2": (Qwen2ForCausalLM, Qwen2Config(
          vocab_size=128, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1e6,
          **common), 1, {}),
      # sliding window 5 < sequence 12 + 8, MQA (one kv head), explicit head_dim 16 != 32 / 4,
      # linear rope scaling; saved as several shards (model.safetensors.index.json).
      "mistral": (MistralForCausalLM, MistralConfig(
          vocab_size=128, num_key_value_heads=1, head_dim=16, sliding_window=5,
          rope_theta=10_000.0, rope_scaling=dict(rope_type="linear", factor=2.0), **common),
          2, dict(max_shard_size="40KB")),
  }


def randomize(model: torch.nn.Module, seed: int) -> None:
  """Non-trivial weights: norms around 1, biases non-zero, matrices with unit-variance outputs."""
  gen = torch.Generator().manual_seed(seed + 1000)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if "norm" in name:
        p.copy_(1.0 + 0.2 * noise)
      elif name.endswith("bias"):
        p.copy_(0.5 * noise)
      elif "embed_tokens" in name:
        p.copy_(noise)
      else:  # [out, in]
        p.copy_(noise / p.shape[-1] ** 0.5)


def greedy(model: torch.nn.Module, tokens: torch.Tensor, steps: int) -> tuple[np.ndarray, float]:
  """Greedy rollout by full re-forward (no cache, no EOS): (new tokens, smallest top-2 margin)."""
  ids, margin = tokens, float("inf")
  for _ in range(steps):
    logits = model(ids).logits[:, -1].float()
    top2 = torch.topk(logits, 2, dim=-1).values
    margin = min(margin, float((top2[:, 0] - top2[:, 1]).min()))
    ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
  return ids[:, tokens.shape[1]:].numpy().astype(np.int32), margin


def make(name: str, cls, config, seed: int, save_kwargs: dict) -> None:
  torch.manual_seed(seed)
  config._attn_implementation = "eager"
  model = cls(config).float().eval()
  randomize(model, seed)
  out = os.path.join(ROOT, name)
  os.makedirs(out, exist_ok=True)
  for f in os.listdir(out):  # stale shards of an earlier run
    os.remove(os.path.join(out, f))
  model.save_pretrained(out, safe_serialization=True, **save_kwargs)
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, config.vocab_size, size=(BATCH, SEQ)).astype(np.int32)
  with torch.no_grad():
    logits = model(torch.from_numpy(tokens).long()).logits.float().numpy()
    new, margin = greedy(model, torch.from_numpy(tokens).long(), NEW_TOKENS)
  np.save(os.path.join(out, "tokens.npy"), tokens, allow_pickle=False)
  np.save(os.path.join(out, "logits.npy"), logits.astype(np.float32), allow_pickle=False)
  np.save(os.path.join(out, "greedy.npy"), new, allow_pickle=False)
  meta = dict(seed=seed, batch=BATCH, seq=SEQ, new_tokens=NEW_TOKENS, greedy_min_margin=margin,
              torch=torch.__version__, transformers=transformers.__version__,
              architecture=type(model).__name__)
  with open(os.path.join(out, "fixture.json"), "w") as f:
    json.dump(meta, f, indent=2)
  size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
  print(f"{name}: {size / 1024:.0f} KiB, greedy margin {margin:.4f} -> {out}")
  if margin < 1e-3:
    print(f"WARNING {name}: greedy top-2 margin {margin} is tiny; parity may be fragile")


def check(directory: str, against: str) -> float:
  """Loads `directory` with transformers; max |logits - fixture logits| on the fixture tokens."""
  model = AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager",
                                               dtype=torch.float32).eval()
  tokens = np.load(os.path.join(against, "tokens.npy"))
  expected = np.load(os.path.join(against, "logits.npy"))
  with torch.no_grad():
    logits = model(torch.from_numpy(tokens).long()).logits.float().numpy()
  diff = float(np.abs(logits - expected).max())
  print(f"{directory}: {type(model).__name__}, max |logit diff| vs {against}: {diff:.3g}")
  return diff


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--only", nargs="*", help="fixture names (default: all)")
  parser.add_argument("--check", help="a checkpoint directory to load with transformers")
  parser.add_argument("--against", help="the fixture directory whose logits --check compares")
  args = parser.parse_args()
  torch.set_num_threads(1)
  if args.check:
    sys.exit(0 if check(args.check, args.against) < 1e-4 else 1)
  for name, (cls, config, seed, save_kwargs) in fixtures().items():
    if not args.only or name in args.only:
      make(name, cls, config, seed, save_kwargs)


if __name__ == "__main__":
  main()
