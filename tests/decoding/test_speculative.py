"""Speculative decoding end to end: what each method promises, checked against plain decoding."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effx.attention.mha import MultiHeadAttention
from effx.decoding import tree as tree_lib
from effx.decoding.generate import generate, pad_prompts, prefill
from effx.decoding.head_training import head_outputs
from effx.decoding.heads import HydraHeads, MedusaHeads, embedding_table
from effx.decoding.proposers import DraftModelProposer, HydraProposer, MedusaProposer
from effx.decoding.sampling import SamplingConfig, warp_logits
from effx.decoding.speculative import (SpeculativeConfig, speculative_generate,
                                       speculative_stats)
from effx.decoding.verify import verify_greedy
from effx.layers import GatedMLP
from effx.model import DecoderLM, block, commit_cache

VOCAB, WIDTH = 24, 32
TREE = tree_lib.from_choices([[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]])
CHAIN = tree_lib.chain(3)


def tiny_lm(layers: int = 2, vocab: int = VOCAB) -> DecoderLM:
  return DecoderLM(vocab_size=vocab, embed_dim=WIDTH, num_layers=layers,
                   layer_pattern=(block(functools.partial(MultiHeadAttention, num_heads=4),
                                        functools.partial(GatedMLP, hidden_dim=64)),))


def init(model: DecoderLM, seed: int):
  return jax.tree.map(lambda x: x, model.init(jax.random.key(seed), jnp.zeros((1, 4), jnp.int32)))


def noisy(params, seed: int, scale: float):
  """Random perturbation so zero-initialised residual blocks are not the identity."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [x + scale * jax.random.normal(k, x.shape)
                                      for x, k in zip(leaves, keys)])


@pytest.fixture(scope="module")
def base():
  model = tiny_lm()
  return model, init(model, 0)


def proposers(model, variables):
  """(name, proposer, params) for every proposer kind, with random weights."""
  hidden = jnp.zeros((1, WIDTH))
  med = MedusaHeads(num_heads=3, vocab_size=model.vocab_size)
  med_p = {"heads": noisy(med.init(jax.random.key(1), hidden), 11, 0.3)}
  emb = embedding_table(variables["params"])
  hyd = HydraHeads(num_heads=3, vocab_size=model.vocab_size, embed_dim=WIDTH)
  hyd_p = {"heads": noisy(hyd.init(jax.random.key(2), hidden, jnp.zeros((1, 3, WIDTH))), 12,
                          0.3), "embedding": emb}
  hpp = HydraHeads(num_heads=3, vocab_size=model.vocab_size, embed_dim=WIDTH, prefix_layer=True,
                   num_blocks=2)
  hpp_p = {"heads": noisy(hpp.init(jax.random.key(3), hidden, jnp.zeros((1, 3, WIDTH))), 13,
                          0.3), "embedding": emb,
           "prefix": hpp.prefix_module(parent=None).init(
               jax.random.key(4), jnp.zeros((1, 2, WIDTH)), jnp.zeros((1, 2), jnp.int32))}
  draft = tiny_lm(layers=1, vocab=model.vocab_size)
  return [("medusa", MedusaProposer(med, TREE), med_p),
          ("hydra", HydraProposer(hyd, TREE), hyd_p),
          ("hydra++", HydraProposer(hpp, TREE), hpp_p),
          ("draft_model", DraftModelProposer(draft, 3), init(draft, 5)),
          ("self_draft", DraftModelProposer(model, 3), variables)]


def prompts_batch(seed: int = 0, lengths=(5, 9, 2, 7)):
  rs = np.random.RandomState(seed)
  return pad_prompts([rs.randint(3, VOCAB, n) for n in lengths])


@pytest.mark.parametrize("name,tree", [
    ("medusa", TREE), ("hydra", TREE), ("hydra++", TREE), ("draft_model", None),
    ("self_draft", None), ("medusa", CHAIN), ("hydra", CHAIN), ("hydra++", CHAIN)],
    ids=lambda x: "chain" if x is CHAIN else "tree" if x is TREE else x)
def test_greedy_speculative_equals_greedy_plain(base, name, tree):
  """Every proposer; heads with a branching tree (KV commit) and with a chain (no commit)."""
  model, variables = base
  _, proposer, params = next(p for p in proposers(model, variables) if p[0] == name)
  if tree is not None:
    proposer = dataclasses.replace(proposer, tree=tree)
  prompts, lengths = prompts_batch()
  plain = generate(model, variables, prompts, lengths, max_new_tokens=24, max_len=64)
  eos = int(np.asarray(plain.tokens)[0, 10])  # a token row 0 emits: rows stop at it
  plain = generate(model, variables, prompts, lengths, max_new_tokens=24, max_len=64, eos_id=eos)
  spec = speculative_generate(model, variables, proposer, params, prompts, lengths,
                              SpeculativeConfig(max_new_tokens=24, max_len=64, eos_id=eos))
  np.testing.assert_array_equal(np.asarray(spec.tokens), np.asarray(plain.tokens))
  np.testing.assert_array_equal(np.asarray(spec.lengths), np.asarray(plain.lengths))
  assert int(np.asarray(plain.lengths)[0]) <= 11  # the EOS really stopped row 0


def test_self_draft_accepts_every_draft(base):
  model, variables = base
  prompts, lengths = prompts_batch()
  proposer = DraftModelProposer(model, 3)
  out = speculative_generate(model, variables, proposer, variables, prompts, lengths,
                             SpeculativeConfig(max_new_tokens=21, max_len=64))
  stats = speculative_stats(np.asarray(out.accepted), 4, 3)
  assert stats.tau == pytest.approx(4.0)
  assert stats.per_depth == pytest.approx([1.0, 1.0, 1.0])
  assert int(out.steps) == 5  # 1 token from the prefill + 5 steps x 4 tokens = 21


def test_commit_gives_the_cache_plain_decoding_builds(base):
  model, variables = base
  _, proposer, params = proposers(model, variables)[1]  # Hydra: parent-dependent tokens
  prompts, lengths = prompts_batch(3)
  max_len = 32
  cache, logits, hidden = prefill(model, variables, jnp.asarray(prompts), jnp.asarray(lengths),
                                  max_len)
  rows = np.arange(len(lengths))
  root = jnp.argmax(logits, -1).astype(jnp.int32)
  drafts, _, _ = proposer.propose(params, (), hidden[rows, lengths - 1], root, None, None)
  # Force acceptance of a real path by making the base agree: use the base's own argmax tokens
  start = jnp.asarray(lengths)
  out = model.apply(variables, drafts, start[:, None] + jnp.asarray(TREE.depth)[None],
                    cache=cache, new_token_mask=jnp.broadcast_to(jnp.asarray(TREE.mask),
                                                                 (len(rows),) + TREE.mask.shape))
  ver = verify_greedy(TREE, drafts, out.logits)
  committed = commit_cache(out.cache, start, ver.accepted_nodes, ver.num_accepted + 1)
  for b in rows:
    n = int(ver.num_accepted[b]) + 1
    path = np.asarray(ver.accepted_nodes[b, :n])
    seq = np.concatenate([prompts[b, :lengths[b]], np.asarray(drafts[b])[path]])[None]
    ref = model.apply(variables, jnp.asarray(seq), cache=model.init_cache(1, max_len))
    length = lengths[b] + n
    for layer_c, ref_c in zip(committed, ref.cache):
      assert int(layer_c.length[0, b]) == length
      np.testing.assert_allclose(np.asarray(layer_c.k[:, b, :length]),
                                 np.asarray(ref_c.k[:, 0, :length]), atol=1e-5)
      np.testing.assert_allclose(np.asarray(layer_c.v[:, b, :length]),
                                 np.asarray(ref_c.v[:, 0, :length]), atol=1e-5)


def test_seeded_sampling_repeats_exactly(base):
  model, variables = base
  _, proposer, params = proposers(model, variables)[0]
  prompts, lengths = prompts_batch()
  cfg = SpeculativeConfig(max_new_tokens=12, max_len=64, sampling=SamplingConfig(temperature=1.0))
  a = speculative_generate(model, variables, proposer, params, prompts, lengths, cfg,
                           jax.random.key(7))
  b = speculative_generate(model, variables, proposer, params, prompts, lengths, cfg,
                           jax.random.key(7))
  c = speculative_generate(model, variables, proposer, params, prompts, lengths, cfg,
                           jax.random.key(8))
  np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
  assert not np.array_equal(np.asarray(a.tokens), np.asarray(c.tokens))


# ---- losslessness of the whole loop, statistically -------------------------------------------

SMALL_V = 6


def g_test_p_value(counts: np.ndarray, probs: np.ndarray) -> float:
  """G-test of observed counts against exact cell probabilities (zero cells must be empty)."""
  n = counts.sum()
  nonzero = probs > 0
  assert counts[~nonzero].sum() == 0, "samples fell in zero-probability cells"
  obs, exp = counts[nonzero], n * probs[nonzero]
  g = 2 * np.sum(np.where(obs > 0, obs * np.log(np.maximum(obs, 1) / exp), 0.0))
  df = int(nonzero.sum()) - 1
  return float(jax.scipy.special.gammaincc(df / 2.0, g / 2.0))


def exact_joint(model, variables, prompt, sampling, steps=3):
  """Exact joint distribution of the first `steps` generated tokens under `sampling`."""
  seqs = np.asarray(prompt)[None]
  probs = np.ones(1)
  for _ in range(steps):
    out = model.apply(variables, jnp.asarray(seqs))
    p = np.asarray(jnp.exp(warp_logits(out.logits[:, -1], sampling)), np.float64)
    probs = (probs[:, None] * p).reshape(-1)
    seqs = np.concatenate([np.repeat(seqs, SMALL_V, 0),
                           np.tile(np.arange(SMALL_V), len(seqs))[:, None]], axis=1)
  return probs / probs.sum()


@pytest.mark.slow
@pytest.mark.parametrize("name,sampling,acceptance,expect_lossless", [
    ("medusa", SamplingConfig(temperature=1.0), "lossless", True),
    ("hydra", SamplingConfig(temperature=0.8, top_k=4), "lossless", True),
    ("draft_model", SamplingConfig(temperature=1.0, top_p=0.9), "lossless", True),
    ("medusa", SamplingConfig(temperature=1.0), "typical", False),
])
def test_loop_keeps_the_target_distribution(name, sampling, acceptance, expect_lossless):
  model = tiny_lm(vocab=SMALL_V)
  variables = noisy(init(model, 0), 21, 0.5)
  _, proposer, params = next(p for p in proposers(model, variables) if p[0] == name)
  if name != "draft_model":
    params = {**params, "heads": noisy(params["heads"], 22, 1.0)}
  n = 4000
  prompt = np.array([1, 4, 2], np.int32)
  prompts, lengths = pad_prompts([prompt] * n)
  cfg = SpeculativeConfig(max_new_tokens=3, max_len=16, sampling=sampling, acceptance=acceptance)
  out = speculative_generate(model, variables, proposer, params, prompts, lengths, cfg,
                             jax.random.key(3))
  tokens = np.asarray(out.tokens)
  cells = tokens[:, 0] * SMALL_V ** 2 + tokens[:, 1] * SMALL_V + tokens[:, 2]
  counts = np.bincount(cells, minlength=SMALL_V ** 3)
  probs = exact_joint(model, variables, prompt, sampling)
  stats = speculative_stats(np.asarray(out.accepted), proposer.tree.num_nodes,
                            proposer.tree.max_depth)
  assert stats.steps > 0
  if expect_lossless:
    assert g_test_p_value(counts, probs) > 1e-4
  else:
    try:
      p_value = g_test_p_value(counts, probs)
    except AssertionError:  # samples in zero-probability cells: biased beyond doubt
      return
    assert p_value < 1e-6


# ---- drafts at every depth = the heads' teacher-forced predictions ----------------------------

def teacher_forced_logits(proposer, params, model, variables, seqs: np.ndarray) -> np.ndarray:
  """Head logits [rows, L, K, V] teacher-forced (as in training) on token rows [rows, L].

  Rows are zero-padded to TF_WIDTH columns (causal: the padding changes no position <= L-1),
  so every call shares one compiled function per (proposer, model)."""
  rows, length = seqs.shape
  padded = np.zeros((rows, TF_WIDTH), np.int32)
  padded[:, :length] = seqs
  return np.asarray(_teacher_forced_fn(proposer, model)(params, variables,
                                                        jnp.asarray(padded)))[:, :length]


TF_WIDTH = 48


@functools.lru_cache(maxsize=None)
def _teacher_forced_fn(proposer, model):
  @jax.jit
  def run(params, variables, seqs):
    positions = jnp.broadcast_to(jnp.arange(seqs.shape[1], dtype=jnp.int32), seqs.shape)
    batch = dict(inputs=seqs, positions=positions, segment_ids=jnp.ones_like(seqs))
    base_out = model.apply(variables, seqs, positions, batch["segment_ids"])
    return head_outputs(proposer.heads, params, params.get("embedding"), batch, base_out)
  return run


def small_vocab_setup(name: str):
  """A 6-token base model and noisy heads: drafts are often right, also at depth >= 2."""
  model = tiny_lm(vocab=SMALL_V)
  variables = noisy(init(model, 0), 21, 0.5)
  _, proposer, params = next(p for p in proposers(model, variables) if p[0] == name)
  rs = np.random.RandomState(4)
  prompts, lengths = pad_prompts([rs.randint(0, SMALL_V, n) for n in (5, 9, 2)])
  return model, variables, proposer, {**params, "heads": noisy(params["heads"], 22, 1.0)}, \
      prompts, lengths


@pytest.mark.parametrize("name", ["medusa", "hydra", "hydra++"])
def test_drafts_equal_teacher_forced_head_predictions(name):
  """Through prefill and commits of varying length (Hydra++'s prefix cache and positions),
  every tree node is its head's rank-th candidate teacher-forced on the node's own path."""
  model, variables, proposer, params, prompts, lengths = small_vocab_setup(name)
  tree, depth = proposer.tree, proposer.tree.max_depth
  plain = np.asarray(generate(model, variables, prompts, lengths, max_new_tokens=24,
                              max_len=48).tokens)
  full = [np.concatenate([prompts[b, :n], plain[b]]) for b, n in enumerate(lengths)]
  hid = [np.asarray(model.apply(variables, jnp.asarray(s[None])).hidden[0]) for s in full]
  _, _, prompt_hidden = prefill(model, variables, jnp.asarray(prompts), jnp.asarray(lengths), 48)
  state = proposer.prefill(params, proposer.init_state(len(lengths), 48), jnp.asarray(prompts),
                           prompt_hidden, jnp.asarray(lengths))
  rs, t = np.random.RandomState(0), np.asarray(lengths) - 1  # t: last accepted position
  rows = range(len(lengths))
  for step in range(4):
    drafts, _, state = proposer.propose(
        params, state, jnp.asarray(np.stack([hid[b][t[b]] for b in rows])),
        jnp.asarray([full[b][t[b] + 1] for b in rows], jnp.int32), jax.random.key(step),
        SamplingConfig())
    drafts = np.asarray(drafts)
    for b in rows:
      paths = [drafts[b, p[p >= 0]] for p in tree.paths]  # root..leaf tokens per leaf
      seqs = np.stack([np.concatenate([full[b][:t[b] + 1], p, np.zeros(depth + 1 - len(p), int)])
                       for p in paths])
      tf = teacher_forced_logits(proposer, params, model, variables, seqs)[:, t[b]]  # [P, K, V]
      for p, nodes in enumerate(tree.paths):
        for node in nodes[1:][nodes[1:] >= 0]:
          d, r = int(tree.depth[node]), int(tree.rank[node])
          ranked = np.sort(tf[p, d - 1])[::-1]
          assert tf[p, d - 1, drafts[b, node]] == pytest.approx(ranked[r], abs=1e-4), (
              f"{name}: step {step} row {b} node {node} (depth {d}, rank {r})")
    num = rs.randint(1, depth + 2, size=len(lengths))  # root + 0..D accepted drafts
    state = proposer.commit(
        params, state, jnp.asarray(np.stack([full[b][t[b] + 1:t[b] + depth + 2] for b in rows])),
        jnp.asarray(np.stack([hid[b][t[b] + 1:t[b] + depth + 2] for b in rows])),
        jnp.asarray(num, jnp.int32))
    t = t + num


@pytest.mark.parametrize("name", ["medusa", "hydra", "hydra++"])
def test_loop_acceptance_matches_a_direct_count(name):
  """Accepted drafts per step and row logged by the loop, and the per-depth acceptance made
  from them, equal a count from teacher-forced head predictions on the greedy output."""
  model, variables, proposer, params, prompts, lengths = small_vocab_setup(name)
  tree, n_new = proposer.tree, 20
  cfg = SpeculativeConfig(max_new_tokens=n_new, max_len=48)
  spec = speculative_generate(model, variables, proposer, params, prompts, lengths, cfg)
  plain = np.asarray(generate(model, variables, prompts, lengths,
                              max_new_tokens=n_new + tree.max_depth + 1, max_len=48).tokens)
  logged, attempted = np.asarray(spec.accepted), np.asarray(spec.attempted)
  tried, hit = np.zeros(tree.max_depth), np.zeros(tree.max_depth)
  for b, n in enumerate(lengths):
    seq = np.concatenate([prompts[b, :n], plain[b]])
    top = np.argsort(-teacher_forced_logits(proposer, params, model, variables, seq[None])[0],
                     axis=-1, kind="stable")  # [L, K, V] candidates best first
    t, emitted, counts, depths = n - 1, 1, [], []
    while emitted < n_new:
      node, accepted, depth = 0, 0, 0
      while tree.num_children[node]:  # try the children of the last accepted node
        tried[accepted] += 1
        depth += 1
        kids = [c for c in tree.children[node] if c >= 0 and
                top[t, tree.depth[c] - 1, tree.rank[c]] == seq[t + accepted + 2]]
        if not kids:
          break
        hit[accepted] += 1
        node, accepted = kids[0], accepted + 1
      counts.append(accepted)
      depths.append(depth)
      t, emitted = t + accepted + 1, emitted + accepted + 1
    assert logged[logged[:, b] >= 0, b].tolist() == counts, f"{name}: row {b}"
    assert attempted[attempted[:, b] >= 0, b].tolist() == depths, f"{name}: row {b}"
  assert hit[1] > 0  # depth 2 was reached and accepted: the check covers it
  stats = speculative_stats(logged, tree.num_nodes, tree.max_depth, attempted)
  np.testing.assert_allclose(stats.per_depth, hit / np.maximum(tried, 1), atol=1e-12)
