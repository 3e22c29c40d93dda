"""Draft heads and their training on a frozen base model."""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effx.attention.mha import MultiHeadAttention
from effx.decoding.head_training import (HeadTrainConfig, HeadTrainer, load_heads, save_heads)
from effx.decoding.heads import HydraHeads, MedusaHeads, embedding_table, lm_head_kernel
from effx.decoding.proposers import HydraProposer
from effx.decoding import tree as tree_lib
from effx.layers import GatedMLP
from effx.model import DecoderLM, block

V, E, L = 20, 32, 16


@pytest.fixture(scope="module")
def base():
  model = DecoderLM(vocab_size=V, embed_dim=E, num_layers=1,
                    layer_pattern=(block(functools.partial(MultiHeadAttention, num_heads=2),
                                         functools.partial(GatedMLP, hidden_dim=64)),))
  return model, model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))


def batches(seed=0, batch=4):
  """A periodic token stream: heads can learn it exactly."""
  rs = np.random.RandomState(seed)
  while True:
    start = rs.randint(0, 5, size=(batch, 1))
    inputs = ((start + np.arange(L)[None]) % 5 + 3).astype(np.int32)
    yield dict(inputs=inputs, targets=np.roll(inputs, -1, 1), positions=np.broadcast_to(
        np.arange(L, dtype=np.int32), inputs.shape).copy(),
               segment_ids=np.ones_like(inputs), weights=np.ones(inputs.shape, np.float32))


def test_new_medusa_head_reproduces_the_base_lm_head(base):
  model, variables = base
  trainer = HeadTrainer(HeadTrainConfig(kind="medusa", num_heads=2), model, variables)
  params, _ = trainer.init()
  hidden = jax.random.normal(jax.random.key(1), (3, E))
  logits = trainer.heads.apply(params["heads"], hidden)  # zero-init blocks = identity
  expected = hidden @ lm_head_kernel(variables["params"])
  np.testing.assert_allclose(np.asarray(logits[:, 0]), np.asarray(expected), atol=1e-5)
  np.testing.assert_allclose(np.asarray(logits[:, 1]), np.asarray(expected), atol=1e-5)


@pytest.mark.parametrize("kind,target", [("medusa", "data"), ("hydra", "self"),
                                         ("hydra++", "teacher")])
def test_training_lowers_the_loss_and_checkpoints_separately(base, kind, target, tmp_path):
  model, variables = base
  cfg = HeadTrainConfig(kind=kind, target=target, num_heads=2, steps=40, learning_rate=3e-3,
                        warmup_steps=2, top_k=3)
  trainer = HeadTrainer(cfg, model, variables)
  params, opt_state = trainer.init()
  it = batches()
  first = trainer._loss(params, next(batches(1)), trainer._base(next(batches(1))), None)[0]
  params, opt_state, steps = trainer.fit(params, opt_state, it, log=lambda *_: None)
  last = trainer._loss(params, next(batches(1)), trainer._base(next(batches(1))), None)[0]
  assert steps == 40 and float(last) < float(first)
  report = trainer.evaluate(params, list(itertools.islice(batches(2), 2)))
  assert report["acceptance"].shape == (2, 3)
  assert np.all(report["acceptance"] >= 0) and np.all(report["acceptance"].sum(1) <= 1 + 1e-6)
  assert report["expected_accept_length"] == pytest.approx(
      report["top1"][0] + report["top1"][0] * report["top1"][1])
  save_heads(str(tmp_path / kind), params, report)
  restored, rep = load_heads(str(tmp_path / kind), jax.eval_shape(lambda: params))
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_allclose(rep["acceptance"], report["acceptance"])


def test_hydra_tree_tokens_follow_each_nodes_own_path(base):
  model, variables = base
  heads = HydraHeads(num_heads=2, vocab_size=V, embed_dim=E)
  hp = heads.init(jax.random.key(3), jnp.zeros((1, E)), jnp.zeros((1, 2, E)))
  leaves, treedef = jax.tree.flatten(hp)
  keys = jax.random.split(jax.random.key(4), len(leaves))
  hp = jax.tree.unflatten(treedef, [x + jax.random.normal(k, x.shape) for x, k in
                                    zip(leaves, keys)])
  emb = embedding_table(variables["params"])
  tree = tree_lib.from_choices([[0], [1], [0, 0], [0, 1], [1, 0]])
  proposer = HydraProposer(heads, tree)
  hidden = jax.random.normal(jax.random.key(5), (2, E))
  root = jnp.array([4, 7], jnp.int32)
  tokens, _, _ = proposer.propose({"heads": hp, "embedding": emb}, (), hidden, root, None, None)
  tokens = np.asarray(tokens)
  for b in range(2):
    for node in range(1, tree.num_nodes):
      path = []
      j = int(tree.parent[node])
      while j >= 0:
        path.insert(0, tokens[b, j])
        j = int(tree.parent[j])
      d = int(tree.depth[node])
      logits = heads.apply(hp, d - 1, hidden[b:b + 1], jnp.take(emb, jnp.array([path]), axis=0),
                           method=HydraHeads.head)
      ranked = np.argsort(-np.asarray(logits[0]), kind="stable")
      assert tokens[b, node] == ranked[int(tree.rank[node])]


def test_head_configs_are_validated():
  with pytest.raises(ValueError, match="heads.kind"):
    HeadTrainConfig(kind="eagle")
  with pytest.raises(ValueError, match="heads.target"):
    HeadTrainConfig(target="labels")
  with pytest.raises(ValueError, match="MedusaHeads.num_heads"):
    MedusaHeads(num_heads=0, vocab_size=4)


def test_new_prefix_layer_keeps_the_hidden_state(base):
  """Hydra++'s prefix layer starts with zeroed residual branches: its output is the norm of h
  (a random block would scramble the state the heads were to start from)."""
  model, variables = base
  trainer = HeadTrainer(HeadTrainConfig(kind="hydra++", num_heads=2, num_blocks=2), model,
                        variables)
  params, _ = trainer.init()
  hidden = jax.random.normal(jax.random.key(1), (2, 5, E))
  out, _ = trainer.heads.prefix_module(parent=None).apply(
      params["prefix"], hidden, jnp.broadcast_to(jnp.arange(5), (2, 5)))
  expected = hidden / jnp.sqrt(jnp.mean(hidden ** 2, -1, keepdims=True) + 1e-6)
  np.testing.assert_allclose(np.asarray(out), np.asarray(expected), atol=1e-4)
