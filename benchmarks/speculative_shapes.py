r"""What one speculative step costs, in plain decoding steps, for backbones of the same size
but different shape: Hydra / Hydra++ drafting grows with the width, a backbone step with depth.

Usage:  python -m benchmarks.speculative_shapes [--no-write] [--shapes 256x4x640 192x6x512]

Random weights and freshly initialised heads (the cost per step does not depend on them; the
heads accept almost nothing, so every step verifies a full chain of 4 and emits ~1 token).
Batch 8, 97-token prompts, 96 new tokens, a 209-slot cache: the main job's batch-8 shape. Plain
and speculative decoding are timed side by side, best of 5. Appends a table to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks._report import append_section
from benchmarks._timing import table_row
from effx.decoding.generate import generate
from effx.decoding.head_training import HeadTrainer, make_proposer, proposer_params
from effx.decoding.speculative import SpeculativeConfig, speculative_generate
from effx.decoding.tree import chain
from effx.model import count_params
from experiments.configs.lm import lm_tiny
from experiments.main import build_experiment

BATCH, PROMPT, NEW_TOKENS, REPEATS = 8, 97, 96, 5


def step_costs(embed_dim: int, num_layers: int, mlp_dim: int) -> dict:
  """ms per plain step and per speculative step (Hydra, Hydra++) for one backbone shape."""
  cfg = lm_tiny()
  cfg.model.embed_dim = embed_dim
  cfg.model.num_layers = num_layers
  cfg.model.layer_pattern[0].ffn.hidden_dim = mlp_dim
  exp = build_experiment(cfg)
  model = exp.model
  prompts = np.asarray(jax.random.randint(jax.random.key(0), (BATCH, PROMPT), 3,
                                          model.vocab_size))
  lengths = np.full((BATCH,), PROMPT, np.int32)
  variables = model.init(jax.random.key(1), jnp.asarray(prompts[:, :8]))
  max_len = PROMPT + NEW_TOKENS + 16
  spec_cfg = SpeculativeConfig(max_new_tokens=NEW_TOKENS, max_len=max_len)
  runs = {"plain": lambda: generate(model, variables, prompts, lengths,
                                    max_new_tokens=NEW_TOKENS, max_len=max_len)}
  for head_cfg in exp.heads:
    if head_cfg.kind == "medusa":
      continue
    trainer = HeadTrainer(head_cfg, model, variables)
    params = proposer_params(trainer.heads, trainer.init()[0], variables["params"])
    proposer = make_proposer(trainer.heads, chain(4))
    runs[head_cfg.kind] = (lambda proposer=proposer, params=params: speculative_generate(
        model, variables, proposer, params, prompts, lengths, spec_cfg))
  outputs = {name: jax.block_until_ready(run()) for name, run in runs.items()}
  best = {name: float("inf") for name in runs}
  for _ in range(REPEATS):  # interleaved, so a slow spell of the machine hits every method
    for name, run in runs.items():
      t0 = time.perf_counter()
      jax.block_until_ready(run())
      best[name] = min(best[name], time.perf_counter() - t0)
  ms = {name: 1e3 * best[name] / int(outputs[name].steps) for name in runs}
  return dict(params=count_params(variables["params"]), **ms)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--shapes", nargs="+", default=["256x4x640", "192x6x512"],
                      help="embed x layers x mlp")
  parser.add_argument("--no-write", action="store_true")
  args = parser.parse_args()
  lines = [table_row(["backbone (embed x layers x mlp)", "parameters", "plain step (ms)",
                      "Hydra step", "Hydra++ step", "Hydra++ step / plain step"]),
           table_row(["---"] * 6)]
  for shape in args.shapes:
    embed_dim, num_layers, mlp_dim = (int(x) for x in shape.split("x"))
    c = step_costs(embed_dim, num_layers, mlp_dim)
    lines.append(table_row([shape, f"{c['params'] / 1e6:.2f}M", f"{c['plain']:.2f}",
                            f"{c['hydra']:.2f} ms ({c['hydra'] / c['plain']:.2f}x)",
                            f"{c['hydra++']:.2f} ms", f"{c['hydra++'] / c['plain']:.2f}x"]))
    print(lines[-1], flush=True)
  body = (f"Batch {BATCH}, chain of 4 (5 tokens verified per step), {PROMPT}-token prompts, "
          f"{NEW_TOKENS} new tokens; random weights and heads; plain and speculative timed side "
          f"by side, best of {REPEATS}. A step's cost in plain steps bounds the speedup: "
          "speedup = τ / (step cost).\n\n" + "\n".join(lines))
  if not args.no_write:
    append_section("Backbone shape and speculative step cost", body)


if __name__ == "__main__":
  main()
