"""Tests of the verifiers (effx/decoding/verify.py).

Trust anchors for losslessness, three independent ways:
  (a) exact enumeration. A plain-Python recursion written from the algorithm's definition
      (reference 1.4), with draft tokens integrated out, gives the output distribution; after
      completing short outputs with target sampling it must equal the target's joint to 1e-12.
      Separately, the jitted implementation itself is enumerated exactly: it takes explicit
      uniforms and reports the acceptance probability of every test it makes, so a
      breadth-first search over "accept / reject" of each test (weights a and 1 - a) covers
      every branch; its output distribution must equal the Python one and the target to 1e-6.
  (b) G-tests on 65k vmapped samples per configuration, with temperature / top-k / top-p, per
      position and on 2-token joints, through the public keyed entry points.
  (c) negative controls (typical acceptance, broken residuals, per-path sampling) that the same
      harnesses must flag.
"""

from __future__ import annotations

import collections
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effx.decoding import tree as tree_lib
from effx.decoding import verify as V
from effx.decoding.sampling import SamplingConfig, warp_logits

BINARY = tree_lib.from_choices([[0], [1], [0, 0], [0, 1], [1, 0], [1, 1]])
WORKED = tree_lib.from_choices([[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]])
THREE = tree_lib.from_choices([[0], [1], [2], [0, 0]])
CHAIN2, CHAIN3 = tree_lib.chain(2), tree_lib.chain(3)


def bigram(seed: int, vocab: int, scale: float = 1.5, temperature: float = 1.0, top_k: int = 0,
           top_p: float = 1.0) -> np.ndarray:
  """A context-dependent distribution p(next | previous token), warped, float64 [V, V]."""
  logits = np.random.default_rng(seed).normal(size=(vocab, vocab)) * scale
  logp = V.process_logits(jnp.asarray(logits, jnp.float32), temperature, top_k, top_p)
  probs = np.asarray(jnp.exp(logp), np.float64)
  return probs / probs.sum(1, keepdims=True)


def kids_of(tree):
  """Children in try (rank) order, computed from parent/rank directly."""
  kids = collections.defaultdict(list)
  for i in range(1, tree.num_nodes):
    kids[int(tree.parent[i])].append((int(tree.rank[i]), i))
  return {p: [i for _, i in sorted(v)] for p, v in kids.items()}


# ---------------------------------------------------------------------------------------------
# (a) Independent exact enumeration of the algorithm (plain Python, float64).


def algorithm_output(tree, mode, root, P, Q=None, tokens=None, residual_fn=None):
  """{emitted token tuple: probability} of one verification step, by recursion over every
  uniform draw's branch. Sampled children are integrated out lazily (they are independent of
  the accept/reject outcomes of earlier siblings, except through without-replacement)."""
  kids = kids_of(tree)
  vocab = P.shape[0]
  if residual_fn is None:
    def residual_fn(r, q):
      rest = np.maximum(r - q, 0.0)
      return rest / rest.sum()

  def accepted(node, tok):
    return try_child(node, tok, 0, P[tok], ())

  def try_child(node, tok, j, r, tried):
    children = kids.get(node, [])
    if j == len(children):
      r = r / r.sum()
      return {(y,): r[y] for y in range(vocab) if r[y] > 0}
    child = children[j]
    if mode == "deterministic":
      x = int(tokens[child])
      draws = [(x, 1.0, np.eye(vocab)[x])]
    elif mode == "iid":
      draws = [(x, Q[tok, x], Q[tok]) for x in range(vocab) if Q[tok, x] > 0]
    else:
      base = Q[tok].copy()
      base[list(tried)] = 0.0
      base = base / base.sum()
      draws = [(x, base[x], base) for x in range(vocab) if base[x] > 0]
    out = collections.defaultdict(float)
    for x, weight, q in draws:
      a = min(1.0, r[x] / q[x])
      if a > 0:
        for seq, pr in accepted(child, x).items():
          out[(x,) + seq] += weight * a * pr
      if a < 1:
        for seq, pr in try_child(node, tok, j + 1, residual_fn(r, q), tried + (x,)).items():
          out[seq] += weight * (1 - a) * pr
    return out

  return accepted(0, root)


def by_length(dist: dict, vocab: int, depth: int) -> dict[int, np.ndarray]:
  """{m: array [V]*m} of the probability of emitting exactly that m-token sequence."""
  out = {m: np.zeros((vocab,) * m) for m in range(1, depth + 2)}
  for seq, pr in dist.items():
    out[len(seq)][seq] += pr
  return out


def complete(lengths: dict[int, np.ndarray], P: np.ndarray, k: int) -> np.ndarray:
  """Distribution of the first k tokens when short outputs are continued by target sampling.

  Works with any leading batch axes in front of the [V]*m token axes.
  """
  acc = lengths[1]
  for m in range(2, k + 1):
    acc = acc[..., :, None] * P + lengths.get(m, 0.0)
  return acc


def target_joint(root: int, P: np.ndarray, k: int) -> np.ndarray:
  acc = P[root]
  for _ in range(k - 1):
    acc = acc[..., :, None] * P
  return acc


# ---------------------------------------------------------------------------------------------
# (a) Exact enumeration of the jitted implementation, driven by explicit uniforms.


def tree_runner(tree, mode, residual_fn=V.residual):
  def run(u, g, tokens, p, q):
    return V._tree_core(tree, mode, residual_fn, u, g, tokens, p,
                        None if mode == "deterministic" else q)
  return run


def chain_runner(residual_fn=V.residual):
  def run(u, g, tokens, p, q):
    return V._chain_core(residual_fn, u[..., 0], g, tokens, q[:, 1:], p)
  return run


def enumerate_implementation(run, tree, tokens, p, q, weights, chunk=4096):
  """Every branch of the implementation's accept tests, breadth first.

  A state fixes the uniforms of the tests decided so far. Running the implementation reports
  the acceptance probability `a` of every test it made; the first undecided test it made
  depends only on decided ones, so branching it with u = a/2 (weight a) and u = (1+a)/2
  (weight 1-a) enumerates the implementation's exact output distribution.

  Returns (ctx, weight, accepted_nodes, num_accepted, final_dist) per leaf.
  """
  depth, slots, vocab = tree.max_depth, tree.max_children, p.shape[-1]
  width = depth * slots
  ctx = np.arange(tokens.shape[0])
  u = np.full((ctx.size, width), 0.5, np.float32)
  fixed = np.zeros((ctx.size, width), bool)
  w = np.asarray(weights, np.float64)
  rng = np.random.default_rng(0)
  leaves = []
  while ctx.size:
    m = ctx.size
    pad = (-m) % chunk
    gumbel = rng.gumbel(size=(m, vocab)).astype(np.float32)
    outs = []
    for start in range(0, m + pad, chunk):
      sl = np.arange(start, start + chunk) % m  # padded rows repeat real ones
      c = ctx[sl]
      res, trace = run(jnp.asarray(u[sl].reshape(chunk, depth, slots)), jnp.asarray(gumbel[sl]),
                       jnp.asarray(tokens[c]), jnp.asarray(p[c]),
                       None if q is None else jnp.asarray(q[c]))
      outs.append(jax.tree.map(np.asarray, (res, trace)))
    res, trace = jax.tree.map(lambda *xs: np.concatenate(xs)[:m], *outs)
    accept_prob = trace.accept_prob.reshape(m, width).astype(np.float64)
    open_ = trace.tried.reshape(m, width) & ~fixed
    has = open_.any(1)
    leaf = ~has
    final = trace.final_dist
    logd = np.where(final > 0, np.log(np.where(final > 0, final, 1)), -np.inf).astype(np.float32)
    assert np.array_equal(res.bonus_token[leaf], np.argmax(logd + gumbel, 1)[leaf])
    assert np.allclose(final.sum(1), 1, atol=1e-5)
    leaves.append((ctx[leaf], w[leaf], res.accepted_nodes[leaf], res.num_accepted[leaf],
                   final[leaf].astype(np.float64)))
    rows = np.flatnonzero(has)
    slot = np.argmax(open_[rows], 1)
    a = accept_prob[rows, slot]
    new_u, new_fixed, new_w, new_ctx = [], [], [], []
    for keep, value, weight in ((a > 0, a / 2, a), (a < 1, (1 + a) / 2, 1 - a)):
      r, s = rows[keep], slot[keep]
      uu, ff = u[r].copy(), fixed[r].copy()
      uu[np.arange(r.size), s] = value[keep]
      ff[np.arange(r.size), s] = True
      new_u.append(uu), new_fixed.append(ff), new_w.append(w[r] * weight[keep])
      new_ctx.append(ctx[r])
    ctx, u, fixed, w = (np.concatenate(x) for x in (new_ctx, new_u, new_fixed, new_w))
  return tuple(np.concatenate(x) for x in zip(*leaves))


def leaves_by_length(leaves, tokens, group, num_groups, vocab, depth):
  """{m: [G]+[V]*m} probability of emitting exactly each m-token sequence, per group."""
  ctx, w, nodes, n, final = leaves
  out = {}
  for m in range(1, depth + 2):
    sel = n == m - 1
    arr = np.zeros((num_groups,) + (vocab,) * m)
    drafted = np.take_along_axis(tokens[ctx[sel]], np.maximum(nodes[sel, 1:m], 0), 1)
    assert (nodes[sel, 1:m] >= 0).all() and (nodes[sel, m:] == -1).all()
    np.add.at(arr, (group[ctx[sel]],) + tuple(drafted.T), w[sel, None] * final[sel])
    out[m] = arr
  return out


def deterministic_contexts(tree, vocab, seed, count):
  """Draft-token assignments per root: top-ranked-like ones, all-equal (duplicate siblings)
  and random ones (losslessness must hold for any deterministic proposal)."""
  rng = np.random.default_rng(seed)
  rows = []
  for root in range(vocab):
    rows.append(np.r_[root, np.full(tree.num_nodes - 1, (root + 1) % vocab)])
    rows.append(np.r_[root, tree.rank[1:] % vocab])
    for _ in range(count):
      rows.append(np.r_[root, rng.integers(0, vocab, tree.num_nodes - 1)])
  return np.array(rows, np.int32)


def sampled_contexts(tree, mode, Q):
  """Every draft-token assignment with its probability under the proposal (per root)."""
  vocab = Q.shape[0]
  kids = kids_of(tree)
  sibling_before = {c: ch[:i] for ch in kids.values() for i, c in enumerate(ch)}
  rows, weights = [], []
  for root in range(vocab):
    for assign in itertools.product(range(vocab), repeat=tree.num_nodes - 1):
      tok = (root,) + assign
      w = 1.0
      for c in range(1, tree.num_nodes):
        q = Q[tok[tree.parent[c]]].copy()
        if mode == "without_replacement":
          q[[tok[s] for s in sibling_before[c]]] = 0.0
          q = q / q.sum() if q.sum() > 0 else q
        w *= q[tok[c]]
        if w == 0:
          break
      if w > 0:
        rows.append(tok)
        weights.append(w)
  return np.array(rows, np.int32), np.array(weights)


def node_inputs(tree, tokens, P, Q):
  """Per-context target rows p[i] = P[token i] and proposal rows q[c] = Q[token of parent c]."""
  p = P.astype(np.float32)[tokens]
  q = Q.astype(np.float32)[tokens[:, np.maximum(tree.parent, 0)]]
  return p, q


def max_deviation_from_target(lengths, roots, P, k):
  got = complete(lengths, P, k)
  want = np.stack([target_joint(int(r), P, k) for r in roots])
  return float(np.abs(got - want).max())


EXACT_CASES = [
    # (name, tree, mode, runner, target warping, draft seed)
    ("chain2-det", CHAIN2, "deterministic", "tree", dict(temperature=0.8, top_k=3), None),
    ("chain3-iid", CHAIN3, "iid", "tree", dict(temperature=1.2, top_p=0.8), 1),
    ("chain3-iid-chaincore", CHAIN3, "iid", "chain", dict(temperature=1.0, top_k=3), 2),
    ("binary-det", BINARY, "deterministic", "tree", dict(temperature=1.0, top_p=0.9), None),
    ("binary-iid", BINARY, "iid", "tree", dict(temperature=0.7, top_k=3), 3),
    ("binary-wor", BINARY, "without_replacement", "tree", dict(temperature=1.0), 4),
    ("three-wor", THREE, "without_replacement", "tree", dict(temperature=1.3, top_k=3), 5),
    ("three-iid", THREE, "iid", "tree", dict(temperature=1.0, top_p=0.85), 6),
    ("worked-det", WORKED, "deterministic", "tree", dict(temperature=1.0, top_k=3), None),
]


@pytest.mark.parametrize("name, tree, mode, runner, warp, draft_seed", EXACT_CASES,
                         ids=[c[0] for c in EXACT_CASES])
def test_exact_output_distribution_equals_target(name, tree, mode, runner, warp, draft_seed):
  vocab = 4
  depth = tree.max_depth
  k = depth + 1
  seed = sum(map(ord, name))
  P = bigram(seed, vocab, **warp)
  Q = None if draft_seed is None else bigram(100 + draft_seed, vocab, scale=1.0)
  Qn = P if Q is None else Q  # proposal rows are unused in deterministic mode
  run = tree_runner(tree, mode) if runner == "tree" else chain_runner()

  if mode == "deterministic":
    tokens = deterministic_contexts(tree, vocab, seed, count=6)
    weights = np.ones(len(tokens))
    group, roots = np.arange(len(tokens)), tokens[:, 0]
    python = [algorithm_output(tree, mode, int(t[0]), P, tokens=t) for t in tokens]
  else:
    tokens, weights = sampled_contexts(tree, mode, Q)
    group, roots = tokens[:, 0], np.arange(vocab)
    python = [algorithm_output(tree, mode, r, P, Q) for r in range(vocab)]

  # The algorithm (independent Python) is exactly lossless.
  py_lengths = [by_length(d, vocab, depth) for d in python]
  py_stacked = {m: np.stack([x[m] for x in py_lengths]) for m in py_lengths[0]}
  assert max_deviation_from_target(py_stacked, roots, P, k) < 1e-12
  assert all(abs(sum(d.values()) - 1) < 1e-12 for d in python)

  # The jitted implementation realises exactly that algorithm.
  p, q = node_inputs(tree, tokens, P, Qn)
  leaves = enumerate_implementation(run, tree, tokens, p, q, weights)
  impl = leaves_by_length(leaves, tokens, group, len(roots), vocab, depth)
  for m in impl:
    np.testing.assert_allclose(impl[m], py_stacked[m], atol=1e-6, rtol=0)
  assert max_deviation_from_target(impl, roots, P, k) < 1e-6


def _no_renormalisation(r, q, x):
  del x
  return jnp.maximum(r - q, 0.0)


def _no_removal(r, q, x):
  del q, x
  return r


def test_exact_harness_flags_broken_residuals_and_typical():
  vocab = 4
  P = bigram(11, vocab)
  Q = bigram(12, vocab, scale=1.0)
  deviations = {}

  tokens = deterministic_contexts(BINARY, vocab, 3, count=4)
  p, q = node_inputs(BINARY, tokens, P, P)
  group = np.arange(len(tokens))
  leaves = enumerate_implementation(tree_runner(BINARY, "deterministic", _no_renormalisation),
                                    BINARY, tokens, p, q, np.ones(len(tokens)))
  lengths = leaves_by_length(leaves, tokens, group, len(tokens), vocab, 2)
  deviations["binary-det-no-renorm"] = max_deviation_from_target(lengths, tokens[:, 0], P, 3)

  ctokens, cweights = sampled_contexts(CHAIN3, "iid", Q)
  p, q = node_inputs(CHAIN3, ctokens, P, Q)
  leaves = enumerate_implementation(chain_runner(_no_removal), CHAIN3, ctokens, p, q, cweights)
  lengths = leaves_by_length(leaves, ctokens, ctokens[:, 0], vocab, vocab, 3)
  deviations["chain3-iid-no-removal"] = max_deviation_from_target(lengths, np.arange(vocab), P, 4)

  # Typical acceptance: deterministic given the drafts, bonus drawn from p at the last node.
  p, _ = node_inputs(BINARY, tokens, P, P)
  res = V.verify_typical(BINARY, jnp.asarray(tokens), jnp.log(jnp.asarray(p)))
  last = np.asarray(res.last_node())
  leaves = (np.arange(len(tokens)), np.ones(len(tokens)), np.asarray(res.accepted_nodes),
            np.asarray(res.num_accepted), P[tokens[np.arange(len(tokens)), last]])
  lengths = leaves_by_length(leaves, tokens, group, len(tokens), vocab, 2)
  deviations["binary-typical"] = max_deviation_from_target(lengths, tokens[:, 0], P, 3)

  print("exact negative controls (max |P_out - P_target|):", deviations)
  assert all(v > 0.02 for v in deviations.values()), deviations


# ---------------------------------------------------------------------------------------------
# (b) G-tests on many keyed samples.

N_SAMPLES = 1 << 16


@functools.partial(jax.jit, static_argnames=("tree", "mode"))
def make_drafts(key, tree, mode, Q, roots):
  """Draft tokens [N, T]: top-rank of Q at the parent, or sampled (i.i.d. / w/o replacement)."""
  logq = jnp.log(Q)
  toks = [roots]
  for c in range(1, tree.num_nodes):
    par_tok = toks[int(tree.parent[c])]
    rank = int(tree.rank[c])
    if mode == "deterministic":
      tok = jnp.argsort(-Q, axis=1)[par_tok, rank]
    elif mode == "iid":
      tok = jax.random.categorical(jax.random.fold_in(key, c), logq[par_tok])
    else:  # Gumbel-top-k: siblings share the parent's noise, rank r takes the r-th largest
      noise = jax.random.gumbel(jax.random.fold_in(key, 1000 + int(tree.parent[c])),
                                (roots.shape[0], Q.shape[0]))
      tok = jnp.argsort(-(logq[par_tok] + noise), axis=1)[:, rank]
    toks.append(tok.astype(jnp.int32))
  return jnp.stack(toks, 1)


@functools.partial(jax.jit, static_argnames=("k",))
def complete_samples(key, roots, emitted, num_accepted, P, k):
  """First k tokens: the emitted ones, then plain target sampling."""
  prev, out = roots, []
  logp = jnp.log(P)
  for i in range(k):
    draw = jax.random.categorical(jax.random.fold_in(key, i), logp[prev])
    tok = jnp.where(i <= num_accepted, emitted[:, i], draw)
    out.append(tok)
    prev = tok
  return jnp.stack(out, 1)


def chi2_sf(stat: float, df: int) -> float:
  return float(jax.scipy.special.gammaincc(df / 2.0, stat / 2.0))


def g_tests(roots, seqs, P, k):
  """G statistics of (root, y_i) and (root, y_i, y_{i+1}) counts against the target.

  Returns [(name, G, df, p_value, count in zero-probability cells)].
  """
  vocab = P.shape[0]
  per_root = np.bincount(roots, minlength=vocab)
  joint = np.stack([target_joint(r, P, k) for r in range(vocab)])  # [V]+[V]*k
  results = []
  views = [(i,) for i in range(k)] + [(i, i + 1) for i in range(k - 1)]
  for axes in views:
    other = tuple(1 + a for a in range(k) if a not in axes)
    probs = joint.sum(axis=other).reshape(vocab, -1)  # [root, cells]
    cell = np.zeros(len(roots), np.int64)
    for a in axes:
      cell = cell * vocab + seqs[:, a]
    observed = np.bincount(roots * probs.shape[1] + cell, minlength=probs.size).reshape(
        probs.shape)
    expected = per_root[:, None] * probs
    zero = expected <= 0
    obs, exp = observed[~zero], expected[~zero]
    stat = 2.0 * float(np.sum(np.where(obs > 0, obs * np.log(np.maximum(obs, 1) / exp), 0.0)))
    df = int((~zero).sum() - vocab)
    results.append((f"y{axes}", stat, df, chi2_sf(stat, df), int(observed[zero].sum())))
  return results


def run_sampling_check(verify, tree, mode, P, Q, seed):
  vocab = P.shape[0]
  key = jax.random.key(seed)
  roots = jnp.arange(N_SAMPLES, dtype=jnp.int32) % vocab
  P32, Q32 = jnp.asarray(P, jnp.float32), jnp.asarray(Q, jnp.float32)
  tokens = make_drafts(jax.random.fold_in(key, 1), tree, mode, Q32, roots)
  p = P32[tokens]
  q = Q32[tokens[:, np.maximum(tree.parent, 0)]]
  keys = jax.random.split(jax.random.fold_in(key, 2), N_SAMPLES)
  res = verify(keys, tokens, p, q)
  k = tree.max_depth + 1
  seqs = complete_samples(jax.random.fold_in(key, 3), roots, res.tokens(tokens),
                          res.num_accepted, P32, k)
  return g_tests(np.asarray(roots), np.asarray(seqs), P, k), np.asarray(res.num_accepted)


def tree_verify(tree, mode):
  def verify(keys, tokens, p, q):
    return V.verify_tree_sampling(keys, tree, tokens, p, q if mode != "deterministic" else None,
                                  mode=mode)
  return verify


def chain_verify(keys, tokens, p, q):
  return V.verify_chain_sampling(keys, tokens, q[:, 1:], p)


STAT_CASES = {
    # name: (tree, mode, verifier kind, target warping, drafts proposed from the target itself)
    "chain3-iid": (CHAIN3, "iid", "chain", dict(temperature=0.8, top_k=3), False),
    "binary-det": (BINARY, "deterministic", "tree", dict(temperature=1.3, top_p=0.8), True),
    "binary-iid": (BINARY, "iid", "tree", dict(temperature=1.0, top_k=4, top_p=0.9), False),
    "three-wor": (THREE, "without_replacement", "tree", dict(temperature=0.7), False),
    "worked-det": (WORKED, "deterministic", "tree", dict(temperature=1.0, top_k=3), False),
}


def stat_config(name):
  tree, mode, kind, warp, from_target = STAT_CASES[name]
  vocab = 5
  seed = sum(map(ord, name))
  P = bigram(seed, vocab, **warp)
  Q = P if from_target else bigram(seed + 1, vocab, scale=1.0)
  return tree, mode, kind, P, Q, seed


@pytest.mark.parametrize("name", list(STAT_CASES))
def test_sampled_outputs_pass_g_tests(name):
  tree, mode, kind, P, Q, seed = stat_config(name)
  verify = chain_verify if kind == "chain" else tree_verify(tree, mode)
  results, accepted = run_sampling_check(verify, tree, mode, P, Q, seed)
  print(name, "mean accepted", accepted.mean(), [(r[0], round(r[1], 1), r[2], r[3])
                                                 for r in results])
  assert accepted.mean() > 0.3  # the drafts do get accepted, so the tree is exercised
  assert (accepted == tree.max_depth).any()
  for label, stat, df, pvalue, in_zero_cells in results:
    assert in_zero_cells == 0, (label, in_zero_cells)  # e.g. top-k/top-p-removed tokens
    assert pvalue > 1e-5, (label, stat, df, pvalue)


def broken_tree_verify(tree, mode, residual_fn):
  def verify(keys, tokens, p, q):
    u, g = V._row_noise(keys, (tree.max_depth, tree.max_children), p.shape[-1])
    return V._tree_core(tree, mode, residual_fn, u, g, tokens, p,
                        None if mode == "deterministic" else q)[0]
  return verify


def broken_chain_verify(residual_fn):
  def verify(keys, tokens, p, q):
    u, g = V._row_noise(keys, (tokens.shape[1] - 1, 1), p.shape[-1])
    return V._chain_core(residual_fn, u[..., 0], g, tokens, q[:, 1:], p)[0]
  return verify


def typical_verify(tree):
  def verify(keys, tokens, p, q):
    return V.verify_typical(tree, tokens, jnp.log(p), keys, temperature=1.0)
  return verify


def per_path_verify(tree):
  """Medusa-style per-path sampling: each path verified independently, then best of P."""
  paths = tree.paths

  def verify(keys, tokens, p, q):
    batch, vocab = tokens.shape[0], p.shape[-1]
    results = []
    for i, path in enumerate(paths):
      path_keys = jax.vmap(lambda k: jax.random.fold_in(k, i))(keys)
      toks = tokens[:, path]
      one_hot = jax.nn.one_hot(toks[:, 1:], vocab)
      results.append(V.verify_chain_sampling(path_keys, toks, one_hot, p[:, path]))
    lengths = jnp.stack([r.num_accepted for r in results], 1)
    best = jnp.argmax(lengths, 1)
    rows = jnp.arange(batch)
    nodes = jnp.stack([jnp.asarray(paths)[i][jnp.maximum(r.accepted_nodes, 0)]
                       * (r.accepted_nodes >= 0) - (r.accepted_nodes < 0)
                       for i, r in enumerate(results)], 1)[rows, best]
    bonus = jnp.stack([r.bonus_token for r in results], 1)[rows, best]
    return V.Verification(nodes.astype(jnp.int32), lengths[rows, best], bonus)
  return verify


NEGATIVE_CASES = [  # (name, configuration that the correct verifier passes above, verifier)
    ("typical", "binary-det", typical_verify(BINARY)),
    ("tree-no-renormalisation", "binary-det",
     broken_tree_verify(BINARY, "deterministic", _no_renormalisation)),
    ("chain-no-removal", "chain3-iid", broken_chain_verify(_no_removal)),
    ("per-path", "binary-det", per_path_verify(BINARY)),
]


@pytest.mark.parametrize("name, config, verify", NEGATIVE_CASES,
                         ids=[c[0] for c in NEGATIVE_CASES])
def test_g_tests_flag_biased_verifiers(name, config, verify):
  tree, mode, _, P, Q, seed = stat_config(config)
  results, _ = run_sampling_check(verify, tree, mode, P, Q, seed)
  worst = max(results, key=lambda r: r[1] / max(r[2], 1))
  print(name, "worst view", worst[0], "G", round(worst[1], 1), "df", worst[2], "p", worst[3],
        "zero-cell hits", sum(r[4] for r in results))
  assert min(r[3] for r in results) < 1e-10, results


# ---------------------------------------------------------------------------------------------
# Chain vs tree, greedy vs temperature 0, determinism.


def _random_inputs(seed, tree, batch, vocab, distinct_siblings=False):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab, size=(batch, tree.num_nodes))
  if distinct_siblings:
    for node in range(tree.num_nodes):
      kids = tree.children[node][tree.children[node] >= 0]
      for b in range(batch):
        tokens[b, kids] = rng.permutation(vocab)[:len(kids)]
  logits = rng.normal(size=(batch, tree.num_nodes, vocab)) * 2
  q = rng.dirichlet(np.ones(vocab), size=(batch, tree.num_nodes))
  return (jnp.asarray(tokens, jnp.int32), jnp.asarray(logits, jnp.float32),
          jnp.asarray(q, jnp.float32))


def test_chain_verifier_equals_tree_verifier_on_a_chain():
  tokens, logits, q = _random_inputs(0, CHAIN3, 512, 4)
  p = jnp.exp(V.process_logits(logits, 1.0))
  key = jax.random.key(5)
  a = V.verify_chain_sampling(key, tokens, q[:, 1:], p)
  b = V.verify_tree_sampling(key, CHAIN3, tokens, p, q, mode="iid")
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  assert 0 < float(a.num_accepted.mean()) < 3


@pytest.mark.parametrize("tree", [WORKED, tree_lib.load_medusa_tree("mc_sim_7b_63")],
                         ids=["worked", "medusa63"])
def test_temperature_zero_sampling_equals_greedy(tree):
  vocab = 12
  tokens, logits, _ = _random_inputs(1, tree, 64, vocab, distinct_siblings=True)
  # Make acceptance likely: the rank-0 child carries its parent's argmax.
  pred = np.asarray(jnp.argmax(logits, -1))
  tokens = np.asarray(tokens).copy()
  for node in range(1, tree.num_nodes):
    if tree.rank[node] == 0 and np.random.default_rng(node).uniform() < 0.8:
      par = tree.parent[node]
      sib = tree.children[par][tree.children[par] >= 0]
      for b in range(tokens.shape[0]):
        clash = [s for s in sib if s != node and tokens[b, s] == pred[b, par]]
        for s in clash:
          tokens[b, s] = tokens[b, node]
        tokens[b, node] = pred[b, par]
  tokens = jnp.asarray(tokens)
  greedy = V.verify_greedy(tree, tokens, logits)
  p = jnp.exp(V.process_logits(logits, 0.0))
  sampled = V.verify_tree_sampling(jax.random.key(0), tree, tokens, p)
  typical = V.verify_typical(tree, tokens, logits, temperature=0.0)
  for other in (sampled, typical):
    for x, y in zip(greedy, other):
      np.testing.assert_array_equal(x, y)
  assert int(greedy.num_accepted.max()) >= 2


def test_same_key_same_output_and_per_row_keys():
  batch = 32
  tokens, logits, q = _random_inputs(2, BINARY, batch, 5)
  p = jnp.exp(V.process_logits(logits, 1.0))
  key = jax.random.key(3)
  a = V.verify_tree_sampling(key, BINARY, tokens, p, q, mode="without_replacement")
  b = V.verify_tree_sampling(key, BINARY, tokens, p, q, mode="without_replacement")
  c = V.verify_tree_sampling(jax.random.key(4), BINARY, tokens, p, q, mode="without_replacement")
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  assert any(not np.array_equal(x, y) for x, y in zip(a, c))
  # A batch of row keys: row b's result depends only on its own key and inputs.
  keys = jax.random.split(key, batch)
  perm = np.random.default_rng(0).permutation(batch)
  full = V.verify_tree_sampling(keys, BINARY, tokens, p, q, mode="iid")
  shuffled = V.verify_tree_sampling(keys[perm], BINARY, tokens[perm], p[perm], q[perm],
                                    mode="iid")
  for x, y in zip(full, shuffled):
    np.testing.assert_array_equal(np.asarray(x)[perm], y)
  again = V.verify_tree_sampling(keys, BINARY, tokens, p, q, mode="iid")
  for x, y in zip(full, again):
    np.testing.assert_array_equal(x, y)
  # Legacy raw uint32 keys work too.
  raw = V.verify_chain_sampling(jax.random.PRNGKey(0), tokens[:, :3], q[:, 1:3], p[:, :3])
  raw2 = V.verify_chain_sampling(jax.random.PRNGKey(0), tokens[:, :3], q[:, 1:3], p[:, :3])
  for x, y in zip(raw, raw2):
    np.testing.assert_array_equal(x, y)


def test_root_only_tree_is_plain_sampling():
  tree = tree_lib.chain(0)
  tokens = jnp.zeros((4, 1), jnp.int32)
  logits = jnp.asarray(np.random.default_rng(0).normal(size=(4, 1, 6)), jnp.float32)
  g = V.verify_greedy(tree, tokens, logits)
  np.testing.assert_array_equal(g.bonus_token, jnp.argmax(logits[:, 0], -1))
  assert g.accepted_nodes.tolist() == [[0]] * 4 and g.num_accepted.tolist() == [0] * 4
  s = V.verify_tree_sampling(jax.random.key(0), tree, tokens, jnp.exp(V.process_logits(logits)))
  assert s.num_accepted.tolist() == [0] * 4


# ---------------------------------------------------------------------------------------------
# Greedy and typical by hand.


def _logits_with_argmax(argmax: list[list[int]], vocab: int) -> jnp.ndarray:
  out = np.zeros((len(argmax), len(argmax[0]), vocab), np.float32)
  for b, row in enumerate(argmax):
    for i, tok in enumerate(row):
      out[b, i, tok] = 5.0
  return jnp.asarray(out)


def test_greedy_hand_cases():
  vocab = 9
  # Worked example: nodes 0..6; parents [-1,0,0,1,1,2,3]; paths (0,1,4) (0,2,5) (0,1,3,6).
  argmax = [
      [2, 7, 3, 8, 8, 6, 8],  # node 1 fails, node 2 then node 5 pass, bonus at node 5
      [1, 4, 0, 0, 0, 0, 0],  # node1 accepted, then node 4 (tok 4) accepted, bonus at node 4
      [0, 0, 0, 0, 0, 0, 0],  # nothing accepted
      [1, 3, 0, 6, 0, 0, 7],  # full path 0-1-3-6, bonus 7
  ]
  tokens = jnp.asarray([
      [0, 1, 2, 5, 6, 3, 0],
      [0, 1, 2, 3, 4, 5, 6],
      [0, 1, 2, 3, 4, 5, 6],
      [0, 1, 2, 3, 4, 5, 6],
  ], jnp.int32)
  res = V.verify_greedy(WORKED, tokens, _logits_with_argmax(argmax, vocab))
  assert res.accepted_nodes.tolist() == [[0, 2, 5, -1], [0, 1, 4, -1], [0, -1, -1, -1],
                                         [0, 1, 3, 6]]
  assert res.num_accepted.tolist() == [2, 2, 0, 3]
  assert res.bonus_token.tolist() == [6, 0, 0, 7]
  assert res.last_node().tolist() == [5, 4, 0, 6]
  assert res.tokens(tokens).tolist() == [[2, 3, 6, -1], [1, 4, 0, -1], [0, -1, -1, -1],
                                         [1, 3, 6, 7]]


def test_greedy_never_accepts_padding():
  # Path (0, 2, 5, -1) is fully accepted. A pad read as node -1 = node 6 would carry token 8,
  # the argmax at node 5: a padded entry must still not count.
  tokens = jnp.asarray([[0, 4, 2, 4, 4, 3, 8]], jnp.int32)
  argmax = [[2, 0, 3, 0, 0, 8, 0]]
  res = V.verify_greedy(WORKED, tokens, _logits_with_argmax(argmax, 9))
  assert res.num_accepted.tolist() == [2]
  assert res.accepted_nodes.tolist() == [[0, 2, 5, -1]]
  assert res.bonus_token.tolist() == [8]


def test_greedy_ties_take_the_first_path_and_prefer_longer_paths():
  two = tree_lib.from_choices([[0], [1]])  # two leaves with the same draft token
  tokens = jnp.asarray([[0, 3, 3]], jnp.int32)
  res = V.verify_greedy(two, tokens, _logits_with_argmax([[3, 1, 2]], 5))
  assert res.accepted_nodes.tolist() == [[0, 1]] and res.bonus_token.tolist() == [1]
  # Duplicate siblings where only the second one's subtree continues: the longer path wins.
  tree = tree_lib.from_choices([[0], [1], [1, 0]])  # nodes: 1 (rank 0), 2 (rank 1), 3 under 2
  tokens = jnp.asarray([[0, 3, 3, 4]], jnp.int32)
  res = V.verify_greedy(tree, tokens, _logits_with_argmax([[3, 0, 4, 2]], 5))
  assert res.accepted_nodes.tolist() == [[0, 2, 3]] and res.num_accepted.tolist() == [2]
  assert res.bonus_token.tolist() == [2]


def _greedy_reference(tree, tokens, logits):
  pred = logits.argmax(-1)
  best = None
  for path in tree.paths:
    n = 0
    while n + 1 < len(path) and path[n + 1] >= 0 and tokens[path[n + 1]] == pred[path[n]]:
      n += 1
    if best is None or n > best[1]:
      best = (path, n)
  path, n = best
  nodes = [int(v) if i <= n else -1 for i, v in enumerate(path)]
  return nodes, n, int(pred[path[n]])


def test_greedy_matches_reference_on_random_inputs():
  tree = tree_lib.load_medusa_tree("mc_sim_7b_63")
  tokens, logits, _ = _random_inputs(9, tree, 200, 3)  # small vocab: many matches
  res = V.verify_greedy(tree, tokens, logits)
  tokens, logits = np.asarray(tokens), np.asarray(logits)
  for b in range(tokens.shape[0]):
    nodes, n, bonus = _greedy_reference(tree, tokens[b], logits[b])
    assert res.accepted_nodes[b].tolist() == nodes
    assert int(res.num_accepted[b]) == n and int(res.bonus_token[b]) == bonus
  assert int(res.num_accepted.max()) >= 3


def test_typical_acceptance_threshold():
  # p at the root: known entropy; the draft passes iff p(x) > min(eps, alpha * exp(-H)).
  probs = np.array([0.5, 0.3, 0.12, 0.08])
  entropy = -np.sum(probs * np.log(probs))
  logits = np.log(np.broadcast_to(probs, (4, 2, 4))).astype(np.float32)
  tokens = jnp.asarray([[0, 0], [0, 1], [0, 2], [0, 3]], jnp.int32)
  for eps, alpha in ((0.09, 0.3), (0.2, 0.5)):
    res = V.verify_typical(tree_lib.chain(1), tokens, jnp.asarray(logits),
                           posterior_threshold=eps, posterior_alpha=alpha)
    threshold = min(eps, alpha * np.exp(-entropy))
    assert res.num_accepted.tolist() == [int(v > threshold) for v in probs]
  # Bonus: argmax without a key, sampled from p with one.
  assert res.bonus_token.tolist() == [0, 0, 0, 0]
  sampled = V.verify_typical(tree_lib.chain(1), jnp.tile(tokens, (500, 1)),
                             jnp.tile(jnp.asarray(logits), (500, 1, 1)), jax.random.key(0))
  assert len(set(np.asarray(sampled.bonus_token).tolist())) == 4


# ---------------------------------------------------------------------------------------------
# Warping and validation.


def test_process_logits_is_the_plain_decoding_warping():
  logits = jnp.asarray(np.random.default_rng(0).normal(size=(3, 7, 11)) * 2, jnp.float32)
  for t, k, p in ((1.0, 0, 1.0), (0.7, 4, 1.0), (1.3, 0, 0.8), (0.9, 5, 0.6), (0.0, 0, 1.0)):
    got = V.process_logits(logits, t, k, p)
    np.testing.assert_array_equal(got, warp_logits(logits, SamplingConfig(t, k, p)))
    probs = np.exp(np.asarray(got, np.float64))
    np.testing.assert_allclose(probs.sum(-1), 1, atol=1e-5)
    kept = (probs > 0).sum(-1)
    if t == 0:
      assert (kept == 1).all() and (probs.argmax(-1) == np.asarray(logits).argmax(-1)).all()
    if k:
      assert (kept <= k).all()
    if t and not k and p == 1.0:
      np.testing.assert_allclose(got, jax.nn.log_softmax(logits / t), atol=1e-5)
    if p < 1:  # the smallest set of most likely tokens whose mass reaches p
      base = np.exp(np.asarray(V.process_logits(logits, t, k, 1.0), np.float64))
      srt = -np.sort(-base, -1)
      need = (np.cumsum(srt, -1) - srt < p).sum(-1)
      np.testing.assert_array_equal(kept, need)


def test_input_validation():
  tokens, logits, q = _random_inputs(0, BINARY, 2, 4)
  p = jnp.exp(V.process_logits(logits))
  with pytest.raises(ValueError, match="draft_tokens: must be \\[batch, 7\\]"):
    V.verify_greedy(BINARY, tokens[:, :5], logits)
  with pytest.raises(ValueError, match="target_probs: must be"):
    V.verify_tree_sampling(jax.random.key(0), BINARY, tokens, p[:, :3])
  with pytest.raises(ValueError, match="mode: got 'nucleus'"):
    V.verify_tree_sampling(jax.random.key(0), BINARY, tokens, p, q, mode="nucleus")
  with pytest.raises(ValueError, match="draft_probs: required for mode 'iid'"):
    V.verify_tree_sampling(jax.random.key(0), BINARY, tokens, p, mode="iid")
  with pytest.raises(ValueError, match="key: got 3 row keys for a batch of 2"):
    V.verify_tree_sampling(jax.random.split(jax.random.key(0), 3), BINARY, tokens, p)
  with pytest.raises(ValueError, match="draft_probs: must be \\[batch, 2, vocab\\]"):
    V.verify_chain_sampling(jax.random.key(0), tokens[:, :3], q[:, :3], p[:, :3])
