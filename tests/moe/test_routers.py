"""Routers: routing invariants, hand-computed losses, aux-loss-free bias."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from effx.moe import routers


def _logits(t: int, e: int, seed: int = 0) -> jax.Array:
  return jax.random.normal(jax.random.key(seed), (t, e)) * 2.0


@settings(max_examples=10, deadline=None)
@given(t=st.integers(1, 9), e=st.integers(1, 6), k=st.integers(1, 6),
       mode=st.sampled_from(["softmax_topk", "topk_softmax"]), renorm=st.booleans())
def test_top_k_invariants(t, e, k, mode, renorm):
  k = min(k, e)
  r = routers.top_k_routing(_logits(t, e, t * 7 + e), k, mode=mode, renormalize=renorm)
  idx, gates = np.asarray(r.expert_index), np.asarray(r.gates)
  assert idx.shape == gates.shape == (t, k) and r.probs.shape == (t, e)
  assert r.gates.dtype == jnp.float32 and r.expert_index.dtype == jnp.int32
  assert all(len(set(row)) == k for row in idx)  # k distinct experts per token
  assert ((idx >= 0) & (idx < e)).all() and (gates >= 0).all()
  probs = np.asarray(r.probs)
  # The chosen experts are the k most probable ones.
  kth = np.sort(probs, axis=-1)[:, e - k]
  assert (np.take_along_axis(probs, idx, -1) >= kth[:, None] - 1e-6).all()
  if mode == "topk_softmax" or renorm:
    np.testing.assert_allclose(gates.sum(-1), 1.0, rtol=1e-5)
  else:
    np.testing.assert_allclose(gates, np.take_along_axis(probs, idx, -1), rtol=1e-6)


def test_bias_changes_selection_not_gates():
  logits = jnp.array([[2.0, 1.0, 0.0]])
  bias = jnp.array([0.0, 0.0, 5.0])
  for mode in ("softmax_topk", "topk_softmax"):
    r = routers.top_k_routing(logits, 1, mode=mode, renormalize=False, bias=bias)
    assert int(r.expert_index[0, 0]) == 2
    expected = jax.nn.softmax(logits)[0, 2] if mode == "softmax_topk" else 1.0
    np.testing.assert_allclose(float(r.gates[0, 0]), float(expected), rtol=1e-6)


def test_expert_choice_each_expert_takes_capacity():
  r = routers.expert_choice_routing(_logits(10, 4), capacity=3)
  mask = np.asarray(r.mask)
  assert mask.shape == (10, 4) and (mask.sum(0) == 3).all()
  np.testing.assert_allclose(np.asarray(r.gates), np.where(mask, np.asarray(r.probs), 0))
  # each expert took its 3 most probable tokens
  probs = np.asarray(r.probs)
  for e in range(4):
    assert set(np.argsort(-probs[:, e])[:3]) == set(np.nonzero(mask[:, e])[0])


def test_load_balance_loss_hand_computed():
  # T=2, E=2, k=1: both tokens go to expert 0 -> f = [1, 0]; P = [0.7, 0.3]; loss = 2 * 0.7.
  probs = jnp.array([[0.8, 0.2], [0.6, 0.4]])
  r = routers.Routing(expert_index=jnp.array([[0], [0]]), gates=jnp.ones((2, 1)),
                      mask=jnp.ones((2, 1), bool), probs=probs, logits=jnp.log(probs))
  np.testing.assert_allclose(float(routers.load_balance_loss(r)), 1.4, rtol=1e-6)
  # k=2 counts both slots: f = [0.5, 0.5] -> 2 * (0.5*0.7 + 0.5*0.3) = 1.
  r2 = r.replace(expert_index=jnp.array([[0, 1], [1, 0]]), gates=jnp.ones((2, 2)),
                 mask=jnp.ones((2, 2), bool))
  np.testing.assert_allclose(float(routers.load_balance_loss(r2)), 1.0, rtol=1e-6)
  # gradient flows through P only
  g = jax.grad(lambda p: routers.load_balance_loss(r.replace(probs=p)))(probs)
  np.testing.assert_allclose(np.asarray(g), [[1.0, 0.0], [1.0, 0.0]], rtol=1e-6)


def test_z_loss_and_entropy_hand_computed():
  logits = jnp.array([[0.0, 0.0], [math.log(3.0), 0.0]])
  expected = (math.log(2.0) ** 2 + math.log(4.0) ** 2) / 2
  np.testing.assert_allclose(float(routers.router_z_loss(logits)), expected, rtol=1e-6)
  np.testing.assert_allclose(float(routers.router_entropy(jnp.full((3, 4), 0.25))),
                             math.log(4.0), rtol=1e-6)


def test_expert_bias_update_and_tree_walk():
  bias = jnp.zeros((4,))
  load = jnp.array([4.0, 2.0, 1.0, 1.0])  # mean 2
  np.testing.assert_allclose(np.asarray(routers.expert_bias_update(bias, load, 0.1)),
                             [-0.1, 0.0, 0.1, 0.1])
  state = {"layers": {"ffn": {"router": {"expert_bias": jnp.zeros((3, 4)),  # scanned: [L, E]
                                         "expert_load": jnp.tile(load, (3, 1))}}},
           "other": {"x": jnp.ones(2)}}
  new = routers.update_moe_state(state, 0.5)
  np.testing.assert_allclose(np.asarray(new["layers"]["ffn"]["router"]["expert_bias"]),
                             np.tile([-0.5, 0.0, 0.5, 0.5], (3, 1)))
  np.testing.assert_allclose(np.asarray(new["other"]["x"]), 1.0)
  jax.jit(routers.update_moe_state, static_argnums=1)(state, 0.5)  # pure and jit-able


def test_router_module_rng_only_for_jitter():
  x = jax.random.normal(jax.random.key(0), (6, 8))
  r = routers.Router(num_experts=4, top_k=2, jitter=0.1)
  v = r.init(jax.random.key(1), x)
  a = r.apply(v, x)  # deterministic: no "router" rng needed
  with pytest.raises(Exception, match="router"):
    r.apply(v, x, deterministic=False)
  b = r.apply(v, x, deterministic=False, rngs={"router": jax.random.key(2)})
  assert not np.allclose(np.asarray(a.logits), np.asarray(b.logits))
  kernel = v["params"]["kernel"]
  assert kernel.value.shape == (8, 4) and kernel.names == ("embed", None)


def test_router_bias_state_is_updated_outside_gradient():
  x = jax.random.normal(jax.random.key(0), (32, 8))
  r = routers.Router(num_experts=4, top_k=1, bias_balancing=True, bias_update_rate=0.01)
  v = r.init(jax.random.key(1), x)
  np.testing.assert_array_equal(np.asarray(v["moe_state"]["expert_bias"]), 0.0)  # not at init
  out, state = r.apply(v, x, mutable=["moe_state"])
  counts = np.bincount(np.asarray(out.expert_index).ravel(), minlength=4)
  np.testing.assert_allclose(np.asarray(state["moe_state"]["expert_load"]), counts)
  np.testing.assert_allclose(np.asarray(state["moe_state"]["expert_bias"]),
                             0.01 * np.sign(counts.mean() - counts))
  # Not mutable: the state is read, not written.
  r.apply(v, x)


@pytest.mark.parametrize("kw", [dict(top_k=5), dict(top_k=0), dict(routing="nope"),
                                dict(jitter=-1.0)])
def test_router_config_errors(kw):
  args = dict(num_experts=4, top_k=2) | kw
  with pytest.raises(ValueError, match=next(iter(kw))):
    routers.Router(**args)
