"""Speculative decoding: propose a draft tree, verify it in one forward pass, commit, repeat.

One jitted step with static shapes inside a `lax.while_loop`; every row of the batch has its
own cache length, number of accepted tokens, EOS and budget, and its own PRNG key per step.

Step (reference.md 1.3): the root is the token the base model chose at the last accepted
position; the proposer drafts the tree from the base hidden state there; the base model runs
the T tree tokens against its KV cache under the tree mask with positions length + depth;
a verifier accepts a root-to-node path and draws a bonus token; the accepted nodes' K/V rows
move to contiguous slots (`commit_cache`; a chain's already are); the bonus becomes the next
root. A step emits
accepted + 1 tokens.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from effx.decoding import verify as verify_lib
from effx.decoding.generate import prefill, step_keys, validate_prompts
from effx.decoding.proposers import Proposer
from effx.decoding.sampling import SamplingConfig, sample
from effx.model import DecoderLM, cache_length, commit_cache, set_cache_length

ACCEPTANCE = ("lossless", "typical")


@dataclasses.dataclass(frozen=True)
class SpeculativeConfig:
  """How speculative decoding runs.

  Attributes:
    max_new_tokens: generation budget per row.
    max_len: KV-cache length; needs prompt_len + max_new_tokens + tree size.
    sampling: greedy / temperature / top-k / top-p (the same warping as plain decoding).
    acceptance: "lossless" (greedy or rejection sampling: output distributed exactly as plain
      decoding) or "typical" (Medusa's typical acceptance: LOSSY, explicit opt-in).
    posterior_threshold / posterior_alpha: typical acceptance's ε and δ.
    eos_id: a row stops after emitting it (-1: never); pad_id: filler after a row's end.
  """

  max_new_tokens: int = 128
  max_len: int = 1024
  sampling: SamplingConfig = SamplingConfig()
  acceptance: str = "lossless"
  posterior_threshold: float = 0.09
  posterior_alpha: float = 0.3
  eos_id: int = -1
  pad_id: int = 0

  def __post_init__(self):
    if self.acceptance not in ACCEPTANCE:
      raise ValueError(f"speculative.acceptance: got {self.acceptance!r}; allowed: "
                       f"{list(ACCEPTANCE)}")
    if self.max_new_tokens < 1:
      raise ValueError(f"speculative.max_new_tokens: got {self.max_new_tokens}; must be >= 1")


@flax.struct.dataclass
class SpeculativeOutput:
  """Result of `speculative_generate`.

  Attributes:
    tokens: int32 [batch, max_new_tokens] generated tokens, `pad_id` after each row's end.
    lengths: int32 [batch] generated tokens per row (including EOS).
    steps: int32 scalar, verify steps taken (loop iterations).
    accepted: int32 [max_new_tokens, batch] drafts accepted per step and row, -1 where the row
      was already finished (or the step was not taken).
    attempted: int32 [max_new_tokens, batch] tree depths at which a draft was tried: accepted,
      plus 1 when the last accepted node has children (a leaf ends the step without a miss);
      -1 where inactive.
  """

  tokens: jax.Array
  lengths: jax.Array
  steps: jax.Array
  accepted: jax.Array
  attempted: jax.Array


def _write_rows(buffer: jax.Array, rows: jax.Array, start: jax.Array) -> jax.Array:
  return jax.vmap(lambda b, r, s: jax.lax.dynamic_update_slice(b, r, (s,)))(buffer, rows, start)


def _verify(cfg: SpeculativeConfig, tree, proposer_probs, drafts, logits, key):
  sampling = cfg.sampling
  if cfg.acceptance == "typical":
    return verify_lib.verify_typical(
        tree, drafts, logits, key, temperature=sampling.temperature, top_k=sampling.top_k,
        top_p=sampling.top_p, posterior_threshold=cfg.posterior_threshold,
        posterior_alpha=cfg.posterior_alpha)
  if sampling.greedy:
    return verify_lib.verify_greedy(tree, drafts, logits)
  target = jnp.exp(verify_lib.process_logits(logits, sampling.temperature, sampling.top_k,
                                             sampling.top_p))
  mode = "deterministic" if proposer_probs is None else "iid"
  return verify_lib.verify_tree_sampling(key, tree, drafts, target, proposer_probs, mode=mode)


@functools.partial(jax.jit, static_argnames=("model", "proposer", "cfg"))
def _speculative(model, variables, proposer, proposer_params, prompts, prompt_lengths, key, *,
                 cfg: SpeculativeConfig):
  tree = proposer.tree
  batch, n_new = prompts.shape[0], cfg.max_new_tokens
  width = tree.max_depth + 1
  cache, logits, prompt_hidden = prefill(model, variables, prompts, prompt_lengths, cfg.max_len)
  rows = jnp.arange(batch)
  hidden = prompt_hidden[rows, prompt_lengths - 1]
  root = sample(step_keys(key, 0, batch), logits, cfg.sampling)
  pstate = proposer.init_state(batch, cfg.max_len)
  pstate = proposer.prefill(proposer_params, pstate, prompts, prompt_hidden, prompt_lengths)
  out_tokens = jnp.full((batch, n_new + width), cfg.pad_id, jnp.int32).at[:, 0].set(root)
  out_len = jnp.ones((batch,), jnp.int32)
  done = (root == cfg.eos_id) | (out_len >= n_new)
  accepted_log = attempted_log = jnp.full((n_new, batch), -1, jnp.int32)
  depth = jnp.asarray(tree.depth)
  has_children = jnp.asarray(tree.num_children > 0, jnp.int32)
  tree_mask = jnp.broadcast_to(jnp.asarray(tree.mask), (batch,) + tree.mask.shape)

  def cond(carry):
    step, *_, done, _ = carry
    return (step < n_new) & ~jnp.all(done)

  def body(carry):
    step, cache, pstate, hidden, root, out_tokens, out_len, done, (accepted_log,
                                                                   attempted_log) = carry
    step_key = jax.random.fold_in(key, step + 1)
    k_propose, k_verify = jax.random.split(step_key)
    drafts, q, pstate = proposer.propose(proposer_params, pstate, hidden, root,
                                         k_propose, cfg.sampling)
    start = cache_length(cache)
    out = model.apply(variables, drafts, start[:, None] + depth[None], cache=cache,
                      new_token_mask=tree_mask)
    ver = _verify(cfg, tree, q, drafts, out.logits, jax.random.split(k_verify, batch))
    n_nodes = ver.num_accepted + 1  # root + accepted drafts
    new_len = jnp.where(done, start, start + n_nodes)
    if tree.is_chain:  # accepted nodes 0..n-1 already sit in slots start..start+n-1
      cache = set_cache_length(out.cache, new_len)
    else:
      cache = set_cache_length(commit_cache(out.cache, start, ver.accepted_nodes, n_nodes),
                               new_len)
    nodes = jnp.maximum(ver.accepted_nodes, 0)
    accepted_hidden = jnp.take_along_axis(out.hidden, nodes[:, :, None], axis=1)
    accepted_tokens = jnp.take_along_axis(drafts, nodes, axis=1)
    pstate = proposer.commit(proposer_params, pstate, accepted_tokens, accepted_hidden,
                             jnp.where(done, 0, n_nodes))
    hidden = jnp.where(done[:, None], hidden, out.hidden[rows, ver.last_node()])
    emitted = ver.tokens(drafts, pad_id=cfg.pad_id)  # [B, D+1]: drafts then bonus
    is_eos = (emitted == cfg.eos_id) & (jnp.arange(width)[None] < n_nodes[:, None])
    n_emit = jnp.where(is_eos.any(1), jnp.argmax(is_eos, 1) + 1, n_nodes)
    emitted = jnp.where(jnp.arange(width)[None] < n_emit[:, None], emitted, cfg.pad_id)
    out_tokens = jnp.where(done[:, None], out_tokens, _write_rows(out_tokens, emitted, out_len))
    out_len = jnp.where(done, out_len, out_len + n_emit)
    accepted_log = accepted_log.at[step].set(jnp.where(done, -1, ver.num_accepted))
    attempted_log = attempted_log.at[step].set(
        jnp.where(done, -1, ver.num_accepted + has_children[ver.last_node()]))
    done = done | is_eos.any(1) | (out_len >= n_new)
    return (step + 1, cache, pstate, hidden, ver.bonus_token, out_tokens, out_len, done,
            (accepted_log, attempted_log))

  init = (jnp.zeros((), jnp.int32), cache, pstate, hidden, root, out_tokens, out_len, done,
          (accepted_log, attempted_log))
  steps, *_, out_tokens, out_len, _, (accepted_log, attempted_log) = jax.lax.while_loop(
      cond, body, init)
  lengths = jnp.minimum(out_len, n_new)
  tokens = jnp.where(jnp.arange(n_new)[None] < lengths[:, None], out_tokens[:, :n_new],
                     cfg.pad_id)
  return SpeculativeOutput(tokens=tokens, lengths=lengths, steps=steps, accepted=accepted_log,
                           attempted=attempted_log)


def speculative_generate(model: DecoderLM, variables: Any, proposer: Proposer,
                         proposer_params: Any, prompts: np.ndarray, prompt_lengths: np.ndarray,
                         cfg: SpeculativeConfig, key: jax.Array | None = None
                         ) -> SpeculativeOutput:
  """Generates with speculative decoding; with lossless acceptance the output is distributed
  exactly as `generate(...)` with the same sampling config (token for token when greedy).

  Args:
    model / variables: the base `DecoderLM` and its variables.
    proposer / proposer_params: a draft proposer (effx.decoding.proposers) and its variables.
    prompts: int32 [batch, prompt_len] right-padded; prompt_lengths: int32 [batch].
    cfg: budget, cache length, sampling and acceptance rule.
    key: PRNG key (each row and step derives its own).
  """
  validate_prompts(prompts, prompt_lengths, cfg.max_new_tokens + proposer.tree.num_nodes,
                   cfg.max_len, model.vocab_size)
  key = jax.random.key(0) if key is None else key
  return _speculative(model, variables, proposer, proposer_params,
                      jnp.asarray(prompts, jnp.int32), jnp.asarray(prompt_lengths, jnp.int32),
                      key, cfg=cfg)


@dataclasses.dataclass
class SpeculativeStats:
  """Acceptance statistics of one or more `SpeculativeOutput`s (reference.md 1.6).

  tau: mean tokens emitted per verify step (accepted drafts + the bonus token);
  acceptance_rate: accepted drafts / drafted tokens along the deepest path (max_depth per step);
  per_depth: P(depth d accepted | a depth-d draft was tried), d = 1..D (with `attempted`; without
    it, of the steps that accepted >= d-1 drafts, the fraction that accepted >= d, which counts a
    step ending on a shallow leaf as a miss);
  histogram: fraction of steps accepting 0..D drafts;
  tree_utilisation: accepted nodes / verified nodes.
  """

  tau: float
  acceptance_rate: float
  per_depth: list[float]
  histogram: list[float]
  tree_utilisation: float
  steps: int


def speculative_stats(accepted: np.ndarray, tree_size: int, max_depth: int,
                      attempted: np.ndarray | None = None) -> SpeculativeStats:
  """Statistics from `SpeculativeOutput.accepted` (and `.attempted`) arrays ([steps, batch],
  -1 = inactive)."""
  acc = np.asarray(accepted).reshape(-1)
  tried = acc if attempted is None else np.asarray(attempted).reshape(-1)
  tried, acc = tried[acc >= 0], acc[acc >= 0]
  if acc.size == 0:
    return SpeculativeStats(0.0, 0.0, [0.0] * max_depth, [0.0] * (max_depth + 1), 0.0, 0)
  hist = np.bincount(acc, minlength=max_depth + 1)[:max_depth + 1] / acc.size
  per_depth = []
  for d in range(1, max_depth + 1):
    reached = np.sum(acc >= d - 1) if attempted is None else np.sum(tried >= d)
    per_depth.append(float(np.sum(acc >= d) / reached) if reached else 0.0)
  return SpeculativeStats(
      tau=float(np.mean(acc + 1)), acceptance_rate=float(np.mean(acc) / max(max_depth, 1)),
      per_depth=per_depth, histogram=hist.tolist(),
      tree_utilisation=float(np.mean(acc + 1) / tree_size), steps=int(acc.size))
