"""Verifying draft tokens against the target model: greedy, typical (lossy) and lossless sampling.

All verifiers are jittable, batch-first and take a static `DraftTree` (node 0 = root = the
token the base model already chose; see effx/decoding/tree.py). Inputs, per row b:

  draft_tokens  int32 [B, T]     token of each tree node (column 0 is the root);
  target_logits float [B, T, V]  target model logits at each node: row i scores the token that
  / target_probs float [B, T, V] follows node i (the verify forward's output at node i).

Every verifier returns a `Verification` (accepted_nodes [B, D+1], num_accepted [B],
bonus_token [B]):

  accepted_nodes[b, :num_accepted[b] + 1] are the node ids from the root (always 0) to the
    last accepted node, the rest is -1;
  num_accepted[b] in 0..D is the number of accepted *draft* tokens;
  bonus_token[b] is the extra token drawn from the target at the last accepted node.

A step therefore emits num_accepted + 1 tokens: the accepted drafts, then the bonus (which is
the next step's root). The decode loop continues from node `last_node()` (its hidden state and
KV row), and commits the num_accepted + 1 accepted nodes (the root included, since the root
was one of the T new tokens) with `cache.commit(start, accepted_nodes, num_accepted + 1)`.

Lossless verifiers (`verify_chain_sampling`, `verify_tree_sampling`) take probabilities that
must come from `process_logits` (= `effx.decoding.sampling.warp_logits`), the warping plain
sampling uses, so their output is distributed exactly as plain sampling with the same
temperature / top-k / top-p. Their randomness is one key per row (`key` [B], or one key that
is split into B): a row's result depends only on its key and its inputs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from effx.decoding.sampling import SamplingConfig, warp_logits
from effx.decoding.tree import DraftTree

MODES = ("deterministic", "iid", "without_replacement")

# (r [V], q [V], x scalar) -> r' [V]: the target distribution left after rejecting draft x ~ q.
ResidualFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


class Verification(NamedTuple):
  """Outcome of one verification step (see the module docstring).

  Attributes:
    accepted_nodes: int32 [B, D+1] root-to-last-accepted node ids, -1 padded.
    num_accepted: int32 [B] accepted draft tokens (0..D), the root not counted.
    bonus_token: int32 [B] token sampled (or argmax'd) from the target at the last accepted node.
  """

  accepted_nodes: jax.Array
  num_accepted: jax.Array
  bonus_token: jax.Array

  def last_node(self) -> jax.Array:
    """int32 [B]: the last accepted node (0 = root if no draft was accepted)."""
    return jnp.take_along_axis(self.accepted_nodes, self.num_accepted[:, None], axis=1)[:, 0]

  def tokens(self, draft_tokens: jax.Array, pad_id: int = -1) -> jax.Array:
    """int32 [B, D+1]: the emitted tokens, accepted drafts then the bonus, `pad_id` after.

    Row b holds num_accepted[b] + 1 real tokens.
    """
    nodes = self.accepted_nodes[:, 1:]
    drafts = jnp.take_along_axis(draft_tokens, jnp.maximum(nodes, 0), axis=1)
    drafts = jnp.concatenate([drafts, jnp.zeros_like(drafts[:, :1])], axis=1)
    idx = jnp.arange(drafts.shape[1])[None]
    n = self.num_accepted[:, None]
    out = jnp.where(idx < n, drafts, jnp.where(idx == n, self.bonus_token[:, None], pad_id))
    return out.astype(jnp.int32)


class _Trace(NamedTuple):
  """What a lossless verifier decided, for exact analysis in tests.

  Attributes:
    accept_prob: float32 [B, D, C] acceptance probability of the child tried at (depth d,
      child slot j): the child is accepted iff uniforms[b, d, j] < accept_prob (0 if not tried).
    tried: bool [B, D, C] whether that slot was tried.
    final_dist: float32 [B, V] normalised distribution the bonus / residual token was drawn from.
  """

  accept_prob: jax.Array
  tried: jax.Array
  final_dist: jax.Array


def process_logits(logits: jax.Array, temperature: float = 1.0, top_k: int = 0,
                   top_p: float = 1.0) -> jax.Array:
  """Log-probabilities after temperature, then top-k, then top-p: effx's one warping.

  Identical to `effx.decoding.sampling.warp_logits` (plain decoding uses it too).

  Args:
    logits: float [..., V].
    temperature: static float >= 0; 0 = greedy (a one-hot distribution on the argmax).
    top_k: static int, 0 or None = no top-k.
    top_p: static float in (0, 1], 1 = no nucleus.
  Returns:
    float32 [..., V] normalised log-probabilities, -inf for removed tokens.
  """
  return warp_logits(logits, SamplingConfig(temperature=float(temperature),
                                            top_k=int(top_k or 0), top_p=float(top_p)))


# ---------------------------------------------------------------------------------------------
# Shared helpers.


def _row_keys(key: jax.Array, batch: int) -> jax.Array:
  """One key per row: `key` is either a batch of keys [B] (raw: [B, 2]) or one key to split."""
  typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
  single = key.ndim == (0 if typed else 1)
  if single:
    return jax.random.split(key, batch)
  if key.shape[0] != batch:
    raise ValueError(f"key: got {key.shape[0]} row keys for a batch of {batch}")
  return key


def _row_noise(keys: jax.Array, accept_shape: tuple[int, ...], vocab: int
               ) -> tuple[jax.Array, jax.Array]:
  """Per row: uniforms [*accept_shape] for the accept tests, Gumbel noise [V] for the last draw.

  One uniform draw per row, in [tiny, 1) (so the Gumbel transform is finite).
  """
  size = int(np.prod(accept_shape))

  def one(k):
    u = jax.random.uniform(k, (size + vocab,), minval=jnp.finfo(jnp.float32).tiny)
    return u[:size].reshape(accept_shape), -jnp.log(-jnp.log(u[size:]))
  return jax.vmap(one)(keys)


def _gumbel_pick(dist: jax.Array, gumbel: jax.Array) -> jax.Array:
  """argmax(log dist + gumbel): a draw from dist (need not be normalised); never a zero entry."""
  positive = dist > 0
  logd = jnp.where(positive, jnp.log(jnp.where(positive, dist, 1.0)), -jnp.inf)
  return jnp.argmax(logd + gumbel, axis=-1).astype(jnp.int32)


def _normalise(p: jax.Array) -> jax.Array:
  total = p.sum(-1, keepdims=True)
  return p / jnp.where(total > 0, total, 1.0)


def residual(r: jax.Array, q: jax.Array, x: jax.Array) -> jax.Array:
  """norm(max(0, r - q)): the target left after rejecting a draft from q (q = δ_x: r with x
  removed). Falls back to r if nothing is left (a rejection then had probability 0)."""
  del x
  rest = jnp.maximum(r - q, 0.0)
  total = rest.sum()
  return jnp.where(total > 0, rest / jnp.where(total > 0, total, 1.0), r)


def _accept_prob(r_x: jax.Array, q_x: jax.Array) -> jax.Array:
  """min(1, r(x) / q(x)); 0 where q(x) = 0 (such a draft cannot have been drawn)."""
  return jnp.where(q_x > 0, jnp.minimum(1.0, r_x / jnp.where(q_x > 0, q_x, 1.0)), 0.0)


def _check_tree_inputs(tree: DraftTree, draft_tokens: jax.Array, **arrays) -> None:
  if not isinstance(tree, DraftTree):
    raise ValueError(f"tree: must be a DraftTree, got {type(tree).__name__}")
  if draft_tokens.ndim != 2 or draft_tokens.shape[1] != tree.num_nodes:
    raise ValueError(f"draft_tokens: must be [batch, {tree.num_nodes}] for this tree, got "
                     f"{draft_tokens.shape}")
  for name, value in arrays.items():
    if value is None:
      continue
    if value.ndim != 3 or value.shape[:2] != draft_tokens.shape:
      raise ValueError(f"{name}: must be [batch, {tree.num_nodes}, vocab] matching draft_tokens "
                       f"{draft_tokens.shape}, got {value.shape}")


def _select_path(tree: DraftTree, node_ok: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Longest accepted prefix over the tree's paths (ties: first path, i.e. smallest leaf id).

  Args:
    node_ok: bool [B, T], whether node i's draft passes the test at its parent.
  Returns:
    (accepted_nodes int32 [B, D+1] -1 padded, num_accepted int32 [B]).
  """
  paths = jnp.asarray(tree.paths)  # [P, D+1]
  child = paths[:, 1:]
  ok = (child >= 0)[None] & node_ok[:, jnp.maximum(child, 0)]  # pads never pass
  length = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=-1), axis=-1)  # [B, P]
  best = jnp.argmax(length, axis=-1)
  n = jnp.take_along_axis(length, best[:, None], axis=1)[:, 0]
  nodes = jnp.where(jnp.arange(tree.max_depth + 1)[None] <= n[:, None], paths[best], -1)
  return nodes.astype(jnp.int32), n.astype(jnp.int32)


# ---------------------------------------------------------------------------------------------
# Greedy and typical acceptance.


@functools.partial(jax.jit, static_argnames=("tree",))
def verify_greedy(tree: DraftTree, draft_tokens: jax.Array, target_logits: jax.Array
                  ) -> Verification:
  """Greedy verification (temperature 0): accept drafts that equal the target's argmax.

  Along each root-to-leaf path the draft at depth i+1 is accepted iff it equals the argmax of
  the target logits at its parent; the result is the longest accepted prefix over all paths
  (ties: first path). Padding of short paths is never accepted. The bonus token is the argmax
  at the last accepted node, so the output equals plain greedy decoding token for token.

  Args:
    tree: static draft tree with T nodes.
    draft_tokens: int [B, T].
    target_logits: float [B, T, V].
  """
  _check_tree_inputs(tree, draft_tokens, target_logits=target_logits)
  pred = jnp.argmax(target_logits, axis=-1).astype(jnp.int32)  # [B, T]
  node_ok = draft_tokens == pred[:, np.maximum(tree.parent, 0)]
  nodes, n = _select_path(tree, node_ok)
  last = jnp.take_along_axis(nodes, n[:, None], axis=1)
  bonus = jnp.take_along_axis(pred, last, axis=1)[:, 0]
  return Verification(nodes, n, bonus)


@functools.partial(jax.jit, static_argnames=("tree", "temperature", "top_k", "top_p"))
def verify_typical(tree: DraftTree, draft_tokens: jax.Array, target_logits: jax.Array,
                   key: jax.Array | None = None, *, temperature: float = 1.0, top_k: int = 0,
                   top_p: float = 1.0, posterior_threshold: float = 0.09,
                   posterior_alpha: float = 0.3) -> Verification:
  """Medusa's typical acceptance. LOSSY: the output is NOT distributed as the target model.

  With p the warped target distribution at a node's parent (`process_logits`) and H(p) its
  entropy, the node's draft x passes iff p(x) > min(posterior_threshold,
  posterior_alpha * exp(-H(p))); the longest passing prefix over all paths is accepted (ties:
  first path). It favours drafts (anything plausible is kept), trading exactness for longer
  acceptance. At temperature 0 it equals `verify_greedy`.

  Args:
    tree: static draft tree; draft_tokens int [B, T]; target_logits float [B, T, V].
    key: per-row keys [B] (or one key) for the bonus token; None = argmax bonus.
    temperature, top_k, top_p: static warping (as in plain sampling).
    posterior_threshold: ε (0.09 recommended for generation).
    posterior_alpha: δ (0.3, about √ε).
  """
  _check_tree_inputs(tree, draft_tokens, target_logits=target_logits)
  logp = process_logits(target_logits, temperature, top_k, top_p)  # [B, T, V]
  probs = jnp.exp(logp)
  entropy = -jnp.sum(jnp.where(probs > 0, probs * jnp.where(probs > 0, logp, 0.0), 0.0), -1)
  threshold = jnp.minimum(posterior_threshold, posterior_alpha * jnp.exp(-entropy))  # [B, T]
  parent = np.maximum(tree.parent, 0)
  rows = jnp.arange(draft_tokens.shape[0])[:, None]
  p_draft = probs[rows, parent[None], draft_tokens]  # [B, T]: p_parent(draft)
  nodes, n = _select_path(tree, p_draft > threshold[:, parent])
  last = jnp.take_along_axis(nodes, n[:, None], axis=1)[:, 0]
  last_logp = logp[rows[:, 0], last]  # [B, V]
  if key is None:
    bonus = jnp.argmax(last_logp, axis=-1)
  else:
    bonus = jax.vmap(jax.random.categorical)(_row_keys(key, draft_tokens.shape[0]), last_logp)
  return Verification(nodes, n, bonus.astype(jnp.int32))


# ---------------------------------------------------------------------------------------------
# Lossless: chains.


@functools.partial(jax.jit, static_argnames=("residual_fn",))
def _chain_core(residual_fn: ResidualFn, uniforms: jax.Array, gumbel: jax.Array,
                draft_tokens: jax.Array, draft_probs: jax.Array, target_probs: jax.Array
                ) -> tuple[Verification, _Trace]:
  """Leviathan/Chen sampling driven by explicit noise: uniforms [B, γ], gumbel [B, V]."""
  gamma = draft_tokens.shape[1] - 1
  p, q = _normalise(target_probs.astype(jnp.float32)), _normalise(draft_probs.astype(jnp.float32))
  x = draft_tokens[:, 1:]
  p_x = jnp.take_along_axis(p[:, :gamma], x[..., None], axis=-1)[..., 0]  # p_{i-1}(x_i)
  q_x = jnp.take_along_axis(q, x[..., None], axis=-1)[..., 0]
  a = _accept_prob(p_x, q_x)  # [B, γ]
  n = jnp.sum(jnp.cumprod((uniforms < a).astype(jnp.int32), axis=-1), axis=-1)  # [B]
  p_n = jnp.take_along_axis(p, n[:, None, None], axis=1)[:, 0]  # target at the last accepted
  if gamma > 0:
    stop = jnp.minimum(n, gamma - 1)
    q_stop = jnp.take_along_axis(q, stop[:, None, None], axis=1)[:, 0]
    x_stop = jnp.take_along_axis(x, stop[:, None], axis=1)[:, 0]
    rest = jax.vmap(residual_fn)(p_n, q_stop, x_stop)
    final = jnp.where((n < gamma)[:, None], rest, p_n)
  else:
    final = p_n
  final = _normalise(final)
  token = _gumbel_pick(final, gumbel)
  ids = jnp.arange(gamma + 1)[None]
  nodes = jnp.where(ids <= n[:, None], ids, -1).astype(jnp.int32)
  trace = _Trace(accept_prob=a[..., None], tried=(ids[:, :gamma] <= n[:, None])[..., None],
                 final_dist=final)
  return Verification(nodes, n.astype(jnp.int32), token), trace


@jax.jit
def verify_chain_sampling(key: jax.Array, draft_tokens: jax.Array, draft_probs: jax.Array,
                          target_probs: jax.Array) -> Verification:
  """Lossless speculative sampling of a chain (Leviathan et al. 2023; Chen et al. 2023).

  Draft i (1..γ) is accepted iff u_i < min(1, p_{i-1}(x_i) / q_i(x_i)); at the first rejection
  the token is drawn from norm(max(0, p - q)) there; if all γ pass, a bonus is drawn from p_γ.
  The emitted tokens are distributed exactly as plain sampling from p. Deterministic drafts
  are q = one-hot (then acceptance is p(x) and the residual is p without x).

  Args:
    key: per-row keys [B] (or one key, split into B).
    draft_tokens: int [B, γ+1]; column 0 is the root (already emitted), 1..γ the drafts.
    draft_probs: float [B, γ, V]; row i-1 is the distribution draft i was drawn from.
    target_probs: float [B, γ+1, V]; row i is the target distribution after node i (warped
      with `process_logits`).
  Returns:
    `Verification` with accepted_nodes [B, γ+1] (node ids = positions in the chain).
  """
  batch, width = draft_tokens.shape
  gamma = width - 1
  if draft_probs.shape[:2] != (batch, gamma) or draft_probs.ndim != 3:
    raise ValueError(f"draft_probs: must be [batch, {gamma}, vocab], got {draft_probs.shape}")
  if target_probs.shape != (batch, width, draft_probs.shape[2]):
    raise ValueError(f"target_probs: must be [batch, {width}, {draft_probs.shape[2]}], got "
                     f"{target_probs.shape}")
  keys = _row_keys(key, batch)
  uniforms, gumbel = _row_noise(keys, (gamma, 1), target_probs.shape[-1])
  return _chain_core(residual, uniforms[..., 0], gumbel, draft_tokens, draft_probs,
                     target_probs)[0]


# ---------------------------------------------------------------------------------------------
# Lossless: trees.


def _proposal(mode: str, q_row: jax.Array | None, x: jax.Array, tried: jax.Array, vocab: int
              ) -> jax.Array:
  """The distribution a child was drawn from, given the siblings already tried."""
  if mode == "deterministic":
    return jax.nn.one_hot(x, vocab, dtype=jnp.float32)
  if mode == "iid":
    return q_row
  masked = jnp.where(tried, 0.0, q_row)  # without replacement: q restricted to untried tokens
  return masked / jnp.where(masked.sum() > 0, masked.sum(), 1.0)


def _walk_row(tree: DraftTree, mode: str, residual_fn: ResidualFn, uniforms: jax.Array,
              gumbel: jax.Array, tokens: jax.Array, p: jax.Array, q: jax.Array | None
              ) -> tuple[Verification, _Trace]:
  """One row: walk from the root, trying each node's children in order, one draw per child."""
  depth, slots = tree.max_depth, tree.max_children
  vocab = p.shape[-1]
  children = jnp.asarray(tree.children)  # [T, C]

  def depth_step(d, state):
    cur, n, done, path, final, accept_prob, tried_slots = state

    def child_step(j, cs):
      r, tried_tokens, chosen, accept_prob, tried_slots = cs
      c = children[cur, j]
      active = (c >= 0) & ~done & (chosen < 0)
      c0 = jnp.maximum(c, 0)
      x = tokens[c0]
      q_j = _proposal(mode, None if q is None else q[c0], x, tried_tokens, vocab)
      a = _accept_prob(r[x], q_j[x])
      accept = active & (uniforms[d, j] < a)
      reject = active & ~accept
      r = jnp.where(reject, residual_fn(r, q_j, x), r)
      tried_tokens = tried_tokens.at[x].set(tried_tokens[x] | reject)
      chosen = jnp.where(accept, c, chosen)
      accept_prob = accept_prob.at[d, j].set(jnp.where(active, a, 0.0))
      tried_slots = tried_slots.at[d, j].set(active)
      return r, tried_tokens, chosen, accept_prob, tried_slots

    init = (p[cur], jnp.zeros((vocab,), bool), jnp.int32(-1), accept_prob, tried_slots)
    r, _, chosen, accept_prob, tried_slots = jax.lax.fori_loop(0, slots, child_step, init)
    advanced = chosen >= 0
    stop = ~done & ~advanced
    final = jnp.where(stop, r, final)
    path = path.at[d + 1].set(jnp.where(advanced, chosen, -1))
    cur = jnp.where(advanced, chosen, cur)
    n = n + advanced.astype(jnp.int32)
    return cur, n, done | stop, path, final, accept_prob, tried_slots

  init = (jnp.int32(0), jnp.int32(0), jnp.bool_(False),
          jnp.full((depth + 1,), -1, jnp.int32).at[0].set(0), jnp.zeros((vocab,), jnp.float32),
          jnp.zeros((depth, slots), jnp.float32), jnp.zeros((depth, slots), bool))
  if depth:  # (a root-only tree has nothing to try)
    init = jax.lax.fori_loop(0, depth, depth_step, init)
  cur, n, done, path, final, accept_prob, tried_slots = init
  final = _normalise(jnp.where(done, final, p[cur]))  # reached a leaf: bonus from p there
  token = _gumbel_pick(final, gumbel)
  return Verification(path, n, token), _Trace(accept_prob, tried_slots, final)


@functools.partial(jax.jit, static_argnames=("tree", "mode", "residual_fn"))
def _tree_core(tree: DraftTree, mode: str, residual_fn: ResidualFn, uniforms: jax.Array,
               gumbel: jax.Array, draft_tokens: jax.Array, target_probs: jax.Array,
               draft_probs: jax.Array | None) -> tuple[Verification, _Trace]:
  """Tree verification driven by explicit noise: uniforms [B, D, C], gumbel [B, V]."""
  p = _normalise(target_probs.astype(jnp.float32))
  q = None if draft_probs is None else _normalise(draft_probs.astype(jnp.float32))
  walk = functools.partial(_walk_row, tree, mode, residual_fn)
  if q is None:
    return jax.vmap(lambda u, g, t, pp: walk(u, g, t, pp, None))(uniforms, gumbel,
                                                                 draft_tokens, p)
  return jax.vmap(walk)(uniforms, gumbel, draft_tokens, p, q)


@functools.partial(jax.jit, static_argnames=("tree", "mode"))
def verify_tree_sampling(key: jax.Array, tree: DraftTree, draft_tokens: jax.Array,
                         target_probs: jax.Array, draft_probs: jax.Array | None = None,
                         mode: str = "deterministic") -> Verification:
  """Lossless verification of a draft tree: one random draw per tried node, never per path.

  Walk from the root. At the current node with target distribution r = p[node], try its
  children in rank order; child c (token x, proposed from q_c) is accepted with probability
  min(1, r(x) / q_c(x)); on rejection r <- norm(max(0, r - q_c)) and the next sibling is tried.
  An accepted child becomes the current node; if every child is rejected, the token is drawn
  from r; at a leaf, the bonus is drawn from p[leaf]. The emitted tokens are distributed
  exactly as plain sampling from the target. Modes (how the children were proposed):

  - "deterministic": top-k style proposals (q_c = one-hot): accept with r(x), on rejection
    remove x from r and renormalise. `draft_probs` is not needed.
  - "iid" (SpecInfer): children drawn independently; q_c = draft_probs[c].
  - "without_replacement" (recursive speculative decoding): siblings drawn one after another
    without replacement, in rank order, from draft_probs[c] (the unrestricted distribution);
    q_c is it restricted to the tokens not yet tried, renormalised.

  Args:
    key: per-row keys [B] (or one key, split into B); same key, same output.
    tree: static draft tree with T nodes; draft_tokens int [B, T] (column 0 = root).
    target_probs: float [B, T, V] warped target distributions (`jnp.exp(process_logits(...))`).
    draft_probs: float [B, T, V]; row c = the distribution node c was drawn from (row 0
      unused); drafts must have positive probability under it.
    mode: static, one of MODES.
  """
  if mode not in MODES:
    raise ValueError(f"mode: got {mode!r}; must be one of {MODES}")
  if mode != "deterministic" and draft_probs is None:
    raise ValueError(f"draft_probs: required for mode {mode!r} (children sampled from q)")
  _check_tree_inputs(tree, draft_tokens, target_probs=target_probs, draft_probs=draft_probs)
  if mode == "deterministic":
    draft_probs = None
  batch, vocab = draft_tokens.shape[0], target_probs.shape[-1]
  uniforms, gumbel = _row_noise(_row_keys(key, batch), (tree.max_depth, tree.max_children),
                                vocab)
  return _tree_core(tree, mode, residual, uniforms, gumbel, draft_tokens, target_probs,
                    draft_probs)[0]


__all__ = ["MODES", "Verification", "process_logits", "residual", "verify_chain_sampling",
           "verify_greedy", "verify_tree_sampling", "verify_typical"]
