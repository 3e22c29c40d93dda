r"""One decoding step of lm_tiny against its KV cache: T new tokens (1 = plain decoding, >1 =
verifying a draft tree), per cache contraction of the attention (`cache_contraction`).

Usage:  python -m benchmarks.decode_step [--no-write]

Random weights (the cost does not depend on them); the cache holds 96 prompt tokens of a
209-slot cache, the main job's speculative benchmark shape. Each step runs inside a jitted
`fori_loop` of 50 steps, as in the decoding loops. Appends a table to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import time

import fiddle as fdl
import jax
import jax.numpy as jnp

from benchmarks._report import append_section
from benchmarks._timing import table_row
from effx.decoding.generate import prefill
from effx.model import cache_length, set_cache_length
from experiments.configs.lm import lm_tiny

PROMPT, MAX_LEN, STEPS = 96, 209, 50


def seconds_per_step(contraction: str, batch: int, new_tokens: int, repeats: int = 7) -> float:
  """Fastest of `repeats` runs of a `STEPS`-step loop, divided by `STEPS`."""
  cfg = lm_tiny()
  cfg.model.layer_pattern[0].attention.cache_contraction = contraction
  model = fdl.build(cfg.model)
  prompts = jax.random.randint(jax.random.key(0), (batch, PROMPT), 3, model.vocab_size)
  variables = model.init(jax.random.key(1), prompts[:, :8])
  cache, _, _ = jax.jit(prefill, static_argnums=(0, 4))(
      model, variables, prompts, jnp.full((batch,), PROMPT, jnp.int32), MAX_LEN)
  mask = jnp.broadcast_to(jnp.tril(jnp.ones((new_tokens, new_tokens), bool)),
                          (batch, new_tokens, new_tokens))
  tokens = jnp.zeros((batch, new_tokens), jnp.int32)

  def step(_, c):
    start = cache_length(c)
    positions = start[:, None] + jnp.arange(new_tokens)[None]
    out = model.apply(variables, tokens, positions, cache=c, new_token_mask=mask)
    return set_cache_length(out.cache, start)  # the same context every step

  run = jax.jit(lambda c: jax.lax.fori_loop(0, STEPS, step, c))
  jax.block_until_ready(run(cache))
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(run(cache))
    best = min(best, time.perf_counter() - t0)
  return best / STEPS


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--no-write", action="store_true")
  args = parser.parse_args()
  contractions = ("einsum", "broadcast", "auto")
  lines = [table_row(["batch", "new tokens T"] + [f"{c} (ms)" for c in contractions]
                     + ["auto vs einsum", "auto: T tokens / 1 token"]),
           table_row(["---"] * (len(contractions) + 4))]
  for batch in (1, 2, 8):
    one = None
    for new_tokens in (1, 2, 5, 8):
      ms = {c: 1e3 * seconds_per_step(c, batch, new_tokens) for c in contractions}
      one = ms["auto"] if new_tokens == 1 else one
      lines.append(table_row([batch, new_tokens] + [f"{ms[c]:.3f}" for c in contractions]
                             + [f"{ms['einsum'] / ms['auto']:.2f}x",
                                f"{ms['auto'] / one:.2f}x"]))
      print(lines[-1], flush=True)
  body = ("lm_tiny (random weights), cache of 209 slots holding 96 tokens; one step of T new "
          "tokens inside a jitted 50-step loop, fastest of 7. `auto` = broadcast at batch 1 with "
          "T = 1 on the CPU, einsum otherwise.\n\n" + "\n".join(lines))
  if not args.no_write:
    append_section("Decode-step attention on CPU", body)


if __name__ == "__main__":
  main()
