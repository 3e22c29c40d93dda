"""Draft proposers behind one interface: Medusa heads, Hydra / Hydra++ heads, a small draft LM.

A proposer is a static (hashable) object the speculative loop calls under jit:

  state = proposer.init_state(batch, max_len)
  state = proposer.prefill(params, state, prompts, prompt_hidden, prompt_lengths)
  tokens, draft_probs, state = proposer.propose(params, state, hidden, root, key, sampling)
  state = proposer.commit(params, state, accepted_tokens, accepted_hidden, num)

with `params` the proposer's own variables (e.g. {"heads": ..., "embedding": ...}), `hidden`
[batch, embed] the base model's hidden state at the last accepted position, `root` int32
[batch] the token the base model chose after it (tree node 0), `tokens` int32 [batch, T]
(column 0 = root), `draft_probs` float32 [batch, T, vocab] (row c = the distribution node c was
sampled from) or None for deterministic top-k proposals, and for `commit` the root + accepted
drafts of the step (`accepted_tokens` [batch, D+1], their base hidden states `accepted_hidden`
[batch, D+1, embed], `num` [batch] how many are real).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from effx.decoding.generate import prompt_segments
from effx.decoding.heads import HydraHeads, MedusaHeads
from effx.decoding.sampling import SamplingConfig, sample, warp_logits
from effx.decoding.tree import DraftTree, chain
from effx.model import DecoderLM, set_cache_length


def _top_candidates(logits: jax.Array, top_k: int) -> jax.Array:
  """int32 [..., top_k] the top-k token ids of logits [..., V], best first."""
  return jax.lax.top_k(logits, top_k)[1].astype(jnp.int32)


def _tree_top_k(tree: DraftTree) -> int:
  return int(tree.rank.max()) + 1


@dataclasses.dataclass(frozen=True, eq=False)
class MedusaProposer:
  """Medusa: node tokens = head (depth-1)'s rank-th candidate at the last accepted state.

  Attributes:
    heads: the `MedusaHeads` module; tree: the static draft tree (depth <= heads.num_heads).
  """

  heads: MedusaHeads
  tree: DraftTree

  def __post_init__(self):
    if self.tree.max_depth > self.heads.num_heads:
      raise ValueError(f"tree: depth {self.tree.max_depth} exceeds the {self.heads.num_heads} "
                       f"Medusa heads")

  def init_state(self, batch: int, max_len: int) -> tuple:
    return ()

  def prefill(self, params, state, prompts, prompt_hidden, prompt_lengths):
    return state

  def propose(self, params, state, hidden, root, key, sampling):
    logits = self.heads.apply(params["heads"], hidden)  # [B, K, V]
    cand = _top_candidates(logits, _tree_top_k(self.tree))  # [B, K, k]
    depth = np.maximum(self.tree.depth - 1, 0)
    tokens = cand[:, depth, self.tree.rank]  # [B, T]
    return tokens.at[:, 0].set(root), None, state

  def commit(self, params, state, accepted_tokens, accepted_hidden, num):
    return state


@flax.struct.dataclass
class HydraState:
  """Hydra++'s prefix-layer cache and its output at the last accepted position."""

  cache: Any
  prefix_out: jax.Array


@dataclasses.dataclass(frozen=True, eq=False)
class HydraProposer:
  """Hydra / Hydra++: the tree is built level by level; a node's token is the rank-th
  candidate of the head of its depth conditioned on its own path.

  `params` = {"heads": HydraHeads variables, "embedding": base embedding [V, E], and for
  Hydra++ "prefix": the prefix layer's variables}.
  """

  heads: HydraHeads
  tree: DraftTree

  def __post_init__(self):
    if self.tree.max_depth > self.heads.num_heads:
      raise ValueError(f"tree: depth {self.tree.max_depth} exceeds the {self.heads.num_heads} "
                       f"Hydra heads")

  @property
  def _ancestors(self) -> np.ndarray:
    """int [T, D+1]: root-to-node ids of each node, padded with the node itself."""
    table = np.zeros((self.tree.num_nodes, self.tree.max_depth + 1), np.int32)
    for i in range(self.tree.num_nodes):
      path, j = [], i
      while j >= 0:
        path.append(j)
        j = int(self.tree.parent[j])
      path = path[::-1]
      table[i] = path + [i] * (table.shape[1] - len(path))
    return table

  def init_state(self, batch: int, max_len: int) -> HydraState | tuple:
    if not self.heads.prefix_layer:
      return ()
    prefix = self.heads.prefix_module(parent=None)
    return HydraState(cache=prefix.init_cache(batch, max_len, self.heads.embed_dim),
                      prefix_out=jnp.zeros((batch, self.heads.embed_dim), self.heads.dtype))

  def _run_prefix(self, params, state: HydraState, hidden, num):
    """Feeds hidden [B, A, E] (first `num` real) to the prefix layer; returns the new state."""
    prefix = self.heads.prefix_module(parent=None)
    start = state.cache.length
    positions = start[:, None] + jnp.arange(hidden.shape[1], dtype=jnp.int32)[None]
    out, cache = prefix.apply(params["prefix"], hidden, positions, state.cache)
    last = jnp.take_along_axis(out, jnp.maximum(num - 1, 0)[:, None, None], axis=1)[:, 0]
    return HydraState(cache=cache.replace(length=start + num), prefix_out=last)

  def prefill(self, params, state, prompts, prompt_hidden, prompt_lengths):
    if not self.heads.prefix_layer:
      return state
    return self._run_prefix(params, state, prompt_hidden, prompt_lengths)

  def propose(self, params, state, hidden, root, key, sampling):
    if self.heads.prefix_layer:
      hidden = state.prefix_out
    tree, ancestors = self.tree, self._ancestors
    embedding = params["embedding"]
    top_k = _tree_top_k(tree)
    tokens = jnp.zeros((root.shape[0], tree.num_nodes), jnp.int32).at[:, 0].set(root)
    for d in range(1, tree.max_depth + 1):
      parents = np.unique(tree.parent[tree.depth == d])
      path = tokens[:, ancestors[parents, :d]]  # [B, P_d, d]: root..parent tokens
      path_emb = jnp.take(embedding, path, axis=0).astype(self.heads.dtype)
      h = jnp.broadcast_to(hidden[:, None], (hidden.shape[0], len(parents), hidden.shape[-1]))
      logits = self.heads.apply(params["heads"], d - 1, h, path_emb, method=HydraHeads.head)
      cand = _top_candidates(logits, top_k)  # [B, P_d, k]
      nodes = np.nonzero(tree.depth == d)[0]
      slot = np.searchsorted(parents, tree.parent[nodes])
      tokens = tokens.at[:, nodes].set(cand[:, slot, tree.rank[nodes]])
    return tokens, None, state

  def commit(self, params, state, accepted_tokens, accepted_hidden, num):
    if not self.heads.prefix_layer:
      return state
    return self._run_prefix(params, state, accepted_hidden, num)


@dataclasses.dataclass(frozen=True, eq=False)
class DraftModelProposer:
  """A small draft `DecoderLM` proposing a chain of `num_draft` tokens (Leviathan / Chen).

  Its own KV cache follows the accepted tokens. `params` = the draft model's variables.
  Greedy decoding proposes argmax tokens; sampling draws them from the draft's warped
  distribution (returned as `draft_probs` for lossless verification).
  """

  model: DecoderLM
  num_draft: int

  @property
  def tree(self) -> DraftTree:
    return chain(self.num_draft)

  def init_state(self, batch: int, max_len: int):
    return self.model.init_cache(batch, max_len)

  def prefill(self, params, state, prompts, prompt_hidden, prompt_lengths):
    positions = jnp.broadcast_to(jnp.arange(prompts.shape[1], dtype=jnp.int32), prompts.shape)
    out = self.model.apply(params, prompts, positions, prompt_segments(prompts, prompt_lengths),
                           cache=state)
    return set_cache_length(out.cache, prompt_lengths)

  def propose(self, params, state, hidden, root, key, sampling: SamplingConfig):
    batch = root.shape[0]

    def step(carry, i):
      cache, token = carry
      out = self.model.apply(params, token[:, None], cache=cache)
      logits = out.logits[:, 0]
      keys = jax.random.split(jax.random.fold_in(key, i), batch)
      nxt = sample(keys, logits, sampling)
      return (out.cache, nxt), (nxt, jnp.exp(warp_logits(logits, sampling)))

    # num_draft + 1 calls: the last feeds d_γ so the cache holds every proposed token.
    (cache, _), (drafts, probs) = jax.lax.scan(step, (state, root),
                                               jnp.arange(self.num_draft + 1))
    tokens = jnp.concatenate([root[:, None], drafts[:-1].T], axis=1)
    probs = jnp.concatenate([jnp.zeros_like(probs[:1]), probs[:-1]], axis=0)
    return tokens, jnp.swapaxes(probs, 0, 1), cache

  def commit(self, params, state, accepted_tokens, accepted_hidden, num):
    start = state[0].length[0] - (self.num_draft + 1)
    return set_cache_length(state, start + num)


Proposer = MedusaProposer | HydraProposer | DraftModelProposer

__all__ = ["MedusaProposer", "HydraProposer", "DraftModelProposer", "HydraState", "Proposer"]
