"""Measuring speculative decoding on the hardware at hand: verify latency, tree sizing, speedup.

Tree size is chosen from measured latency, not copied from GPU papers: on a GPU verifying 64
tokens costs about as much as one, on a small CPU it does not (reference.md 1.7).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from effx.decoding.generate import generate
from effx.decoding.speculative import (SpeculativeConfig, SpeculativeStats, speculative_generate,
                                       speculative_stats)
from effx.decoding.tree import TreeBudget, choose_node_budget
from effx.model import DecoderLM, set_cache_length


def held_out_prompts(files: Sequence[str], count: int, prompt_bytes: int, seed: int = 0,
                     bos_id: int = 1, offset: int = 3) -> list[np.ndarray]:
  """`count` prompts of `prompt_bytes` bytes cut at line starts from held-out source files.

  Returns byte-level token arrays (BOS + bytes shifted by `offset`, the ByteTokenizer layout).
  """
  rng = np.random.default_rng(seed)
  texts = [open(f, "rb").read() for f in files]
  texts = [t for t in texts if len(t) > 4 * prompt_bytes]
  if not texts:
    raise ValueError(f"held-out files: none longer than {4 * prompt_bytes} bytes")
  prompts = []
  while len(prompts) < count:
    text = texts[rng.integers(len(texts))]
    start = int(rng.integers(0, len(text) - 2 * prompt_bytes))
    start = text.rfind(b"\n", 0, start) + 1
    chunk = np.frombuffer(text[start:start + prompt_bytes], np.uint8).astype(np.int32) + offset
    prompts.append(np.concatenate([[bos_id], chunk]).astype(np.int32))
  return prompts


def measure_verify_latency(model: DecoderLM, variables: Any, batch: int, tree_sizes: Sequence[int],
                           context: int, max_len: int, repeats: int = 5) -> dict[int, float]:
  """Median seconds of one forward of T tree tokens against a cache holding `context` tokens.

  Returns {T: seconds} for every T in `tree_sizes` (a chain mask; the mask's shape, not its
  pattern, sets the cost).
  """
  cache = set_cache_length(model.init_cache(batch, max_len), jnp.full((batch,), context,
                                                                        jnp.int32))
  out = {}
  for size in tree_sizes:
    tokens = jnp.ones((batch, size), jnp.int32)
    positions = context + jnp.broadcast_to(jnp.arange(size, dtype=jnp.int32), (batch, size))
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((size, size), bool)), (batch, size, size))
    fn = jax.jit(lambda v, c, t, p, m: model.apply(v, t, p, cache=c, new_token_mask=m).logits)
    jax.block_until_ready(fn(variables, cache, tokens, positions, mask))
    times = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      jax.block_until_ready(fn(variables, cache, tokens, positions, mask))
      times.append(time.perf_counter() - t0)
    out[int(size)] = float(np.median(times))
  return out


def auto_tree(acceptance: np.ndarray, latency: dict[int, float]) -> TreeBudget:
  """The tree maximising expected tokens per second from measured acceptance and latency."""
  return choose_node_budget(acceptance, latency)


@dataclasses.dataclass
class SpeedupResult:
  """Speculative vs plain decoding of the same model and prompts, measured side by side."""

  method: str
  batch: int
  tree_nodes: int
  stats: SpeculativeStats
  tokens_per_second: float
  baseline_tokens_per_second: float
  outputs_match: bool | None  # greedy: speculative tokens == plain tokens

  @property
  def speedup(self) -> float:
    return self.tokens_per_second / self.baseline_tokens_per_second


def _timed(fn, repeats: int):
  fn()  # compile
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = fn()
    jax.block_until_ready(out)
    best = min(best, time.perf_counter() - t0)
  return out, best


def compare_with_plain(model: DecoderLM, variables: Any, method: str, proposer, proposer_params,
                       prompts: np.ndarray, lengths: np.ndarray, cfg: SpeculativeConfig,
                       baseline: tuple[Any, float] | None = None, repeats: int = 2,
                       key: jax.Array | None = None) -> tuple[SpeedupResult, tuple[Any, float]]:
  """Times plain `generate` and `speculative_generate` on the same prompts (best of `repeats`).

  Returns the result and the (plain output, seconds) pair so later methods reuse the baseline.
  """
  key = jax.random.key(0) if key is None else key
  if baseline is None:
    baseline = _timed(lambda: generate(
        model, variables, prompts, lengths, max_new_tokens=cfg.max_new_tokens,
        max_len=cfg.max_len, sampling=cfg.sampling, key=key, eos_id=cfg.eos_id,
        pad_id=cfg.pad_id), repeats)
  plain, plain_s = baseline
  spec, spec_s = _timed(lambda: speculative_generate(model, variables, proposer, proposer_params,
                                                     prompts, lengths, cfg, key), repeats)
  tree = proposer.tree
  n_plain = int(np.sum(np.asarray(plain.lengths)))
  n_spec = int(np.sum(np.asarray(spec.lengths)))
  match = (bool(np.array_equal(np.asarray(plain.tokens), np.asarray(spec.tokens)))
           if cfg.sampling.greedy and cfg.acceptance == "lossless" else None)
  result = SpeedupResult(method=method, batch=prompts.shape[0], tree_nodes=tree.num_nodes,
                         stats=speculative_stats(np.asarray(spec.accepted), tree.num_nodes,
                                                 tree.max_depth),
                         tokens_per_second=n_spec / spec_s,
                         baseline_tokens_per_second=n_plain / plain_s, outputs_match=match)
  return result, baseline


__all__ = ["held_out_prompts", "measure_verify_latency", "auto_tree", "compare_with_plain",
           "SpeedupResult"]
