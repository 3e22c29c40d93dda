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

from effx.decoding.generate import generate, pad_prompts
from effx.decoding.proposers import HydraState
from effx.decoding.sampling import SamplingConfig
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


def _interleaved_best(functions: Sequence, repeats: int) -> list[tuple[Any, float]]:
  """(output, fastest seconds) of each function, timed in turn `repeats` times after a warm-up
  call each: interleaving makes a slow spell of a shared machine hit every function."""
  outputs = [jax.block_until_ready(fn()) for fn in functions]
  best = [float("inf")] * len(functions)
  for _ in range(repeats):
    for i, fn in enumerate(functions):
      t0 = time.perf_counter()
      jax.block_until_ready(fn())
      best[i] = min(best[i], time.perf_counter() - t0)
  return list(zip(outputs, best))


def _seconds_per_step(step, carry, steps: int, repeats: int) -> float:
  """Seconds per iteration of `carry = step(carry)` run `steps` times in one jitted fori_loop,
  as the decoding loops run it (no per-call dispatch; state updated in place, not copied out of
  the call): the fastest of `repeats` runs, divided by `steps`."""
  run = jax.jit(lambda c: jax.lax.fori_loop(0, steps, lambda _, c: step(c), c))
  [(_, seconds)] = _interleaved_best([lambda: run(carry)], repeats)
  return seconds / steps


def measure_verify_latency(model: DecoderLM, variables: Any, batch: int, tree_sizes: Sequence[int],
                           context: int, max_len: int, repeats: int = 5, steps: int = 20
                           ) -> dict[int, float]:
  """Seconds of one forward of T tree tokens against a cache holding `context` tokens, inside
  a jitted loop of `steps` such forwards (fastest of `repeats`: the machine may be shared).

  Returns {T: seconds} for every T in `tree_sizes` (a chain mask; the mask's shape, not its
  pattern, sets the cost).
  """
  start = jnp.full((batch,), context, jnp.int32)
  cache = set_cache_length(model.init_cache(batch, max_len), start)
  out = {}
  for size in tree_sizes:
    tokens = jnp.ones((batch, size), jnp.int32)
    positions = context + jnp.broadcast_to(jnp.arange(size, dtype=jnp.int32), (batch, size))
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((size, size), bool)), (batch, size, size))

    def step(carry, tokens=tokens, positions=positions, mask=mask):
      cache, total = carry
      res = model.apply(variables, tokens, positions, cache=cache, new_token_mask=mask)
      # the same context every step; the logits feed the carry so none of them is dead code
      return set_cache_length(res.cache, start), total + jnp.sum(res.logits)

    out[int(size)] = _seconds_per_step(step, (cache, jnp.zeros((), jnp.float32)), steps,
                                       repeats)
  return out


def measure_proposal_latency(proposer_for_depth, params: Any, batch: int, depths: Sequence[int],
                             embed_dim: int, context: int, max_len: int, repeats: int = 5,
                             steps: int = 20) -> dict[int, float]:
  """Seconds of one propose + commit of a proposer drafting a tree of depth d, inside a jitted
  loop of `steps` of them (fastest of `repeats`).

  Args:
    proposer_for_depth: d -> the proposer drafting a chain of d tokens (its per-step cost
      grows with the depth: Hydra runs one head per level, Hydra++ also feeds d+1 accepted
      states to its prefix layer).
    params: the proposer's variables; embed_dim: the base model's width.
    context: tokens already in the proposer's own cache (Hydra++).

  Returns {d: seconds} for every d in `depths`; add it to the verify latency of a tree of
  that depth for the cost of one step (`choose_node_budget(proposal_latency_per_depth=...)`).
  """
  out = {}
  length = jnp.full((batch,), context, jnp.int32)
  for depth in depths:
    proposer = proposer_for_depth(depth)
    state = proposer.init_state(batch, max_len)
    if isinstance(state, HydraState):  # a prefix-layer cache: pretend it holds `context` states
      state = state.replace(cache=state.cache.replace(length=length))

    def step(carry, proposer=proposer, depth=depth):
      state, hidden, root = carry
      tokens, _, state = proposer.propose(params, state, hidden, root, jax.random.key(0),
                                          SamplingConfig())
      accepted = jnp.broadcast_to(hidden[:, None], (batch, depth + 1, embed_dim))
      state = proposer.commit(params, state, tokens[:, :depth + 1], accepted,
                              jnp.full((batch,), depth + 1, jnp.int32))
      if isinstance(state, HydraState):  # the same context every step
        state = state.replace(cache=state.cache.replace(length=length))
      # the drafts feed the next step's inputs, so no drafting is hoisted out or compiled away
      last = tokens[:, -1]
      return state, hidden + 1e-6 * last[:, None].astype(hidden.dtype), last

    carry = (state, jnp.ones((batch, embed_dim), jnp.float32), jnp.ones((batch,), jnp.int32))
    out[int(depth)] = _seconds_per_step(step, carry, steps, repeats)
  return out


def generated_batches(model: DecoderLM, variables: Any, prompts: Sequence[np.ndarray],
                      max_new_tokens: int, batch_size: int = 8) -> list[dict]:
  """Batches of prompts + the model's own greedy continuations (what decoding drafts against).

  Each batch has the keys of a training batch (inputs, targets, positions, segment_ids,
  weights: int32 / float32 [rows, len]); weights are 1 where the target is a generated token,
  so `HeadTrainer.evaluate` on these measures head agreement on text the model writes.
  """
  batches = []
  for i in range(0, len(prompts), batch_size):
    tokens, lengths = pad_prompts(list(prompts[i:i + batch_size]))
    out = generate(model, variables, tokens, lengths, max_new_tokens=max_new_tokens,
                   max_len=tokens.shape[1] + max_new_tokens)
    new = np.asarray(out.tokens)
    rows = [np.concatenate([tokens[b, :n], new[b]]) for b, n in enumerate(lengths)]
    width = max(len(r) for r in rows) + 1
    inputs = np.zeros((len(rows), width), np.int32)
    segment_ids = np.zeros((len(rows), width), np.int32)
    weights = np.zeros((len(rows), width), np.float32)
    for b, row in enumerate(rows):
      inputs[b, :len(row)] = row
      segment_ids[b, :len(row)] = 1
      weights[b, lengths[b] - 1:len(row) - 1] = 1.0
    positions = np.broadcast_to(np.arange(width, dtype=np.int32), inputs.shape).copy()
    batches.append(dict(inputs=inputs, targets=np.roll(inputs, -1, axis=1), positions=positions,
                        segment_ids=segment_ids, weights=weights))
  return batches


def auto_tree(acceptance: np.ndarray, latency: dict[int, float],
              proposal_latency: dict[int, float] | None = None) -> TreeBudget:
  """The tree maximising expected tokens per second from measured acceptance and latency
  (verify latency per tree size, plus the proposer's per-depth cost when given)."""
  return choose_node_budget(acceptance, latency, proposal_latency)


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


def compare_with_plain(model: DecoderLM, variables: Any, method: str, proposer, proposer_params,
                       prompt_batches: Sequence[tuple[np.ndarray, np.ndarray]],
                       cfg: SpeculativeConfig, repeats: int = 2, key: jax.Array | None = None
                       ) -> SpeedupResult:
  """Times plain `generate` and `speculative_generate` side by side on the same prompts.

  Args:
    prompt_batches: (prompts int32 [batch, len], lengths int32 [batch]) pairs of one batch size;
      several batches average over more prompts (at batch 1, one prompt says little).
    repeats: per batch, plain and speculative decoding are timed alternately `repeats` times
      after a warm-up; the fastest of each counts.

  Returns the result: tokens/s = all tokens / all seconds; statistics over every step of every
  batch; whether greedy outputs are identical in every batch.
  """
  key = jax.random.key(0) if key is None else key
  plain_runs, spec_runs = [], []
  for prompts, lengths in prompt_batches:
    plain, spec = _interleaved_best([
        lambda: generate(model, variables, prompts, lengths, max_new_tokens=cfg.max_new_tokens,
                         max_len=cfg.max_len, sampling=cfg.sampling, key=key, eos_id=cfg.eos_id,
                         pad_id=cfg.pad_id),
        lambda: speculative_generate(model, variables, proposer, proposer_params, prompts,
                                     lengths, cfg, key)], repeats)
    plain_runs.append(plain)
    spec_runs.append(spec)
  tree = proposer.tree
  n_plain = sum(int(np.sum(np.asarray(out.lengths))) for out, _ in plain_runs)
  n_spec = sum(int(np.sum(np.asarray(out.lengths))) for out, _ in spec_runs)
  match = (all(np.array_equal(np.asarray(plain.tokens), np.asarray(spec.tokens))
               for (plain, _), (spec, _) in zip(plain_runs, spec_runs))
           if cfg.sampling.greedy and cfg.acceptance == "lossless" else None)
  accepted = np.concatenate([np.asarray(out.accepted) for out, _ in spec_runs], axis=1)
  attempted = np.concatenate([np.asarray(out.attempted) for out, _ in spec_runs], axis=1)
  return SpeedupResult(method=method, batch=prompt_batches[0][0].shape[0],
                       tree_nodes=tree.num_nodes,
                       stats=speculative_stats(accepted, tree.num_nodes, tree.max_depth,
                                               attempted),
                       tokens_per_second=n_spec / sum(s for _, s in spec_runs),
                       baseline_tokens_per_second=n_plain / sum(s for _, s in plain_runs),
                       outputs_match=match)


__all__ = ["held_out_prompts", "measure_verify_latency", "measure_proposal_latency",
           "generated_batches", "auto_tree", "compare_with_plain", "SpeedupResult"]
