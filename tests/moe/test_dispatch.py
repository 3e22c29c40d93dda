"""Dispatch: capacity invariants, and every execution agrees (values and gradients)."""

from __future__ import annotations

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effx.moe import dispatch, routers

ACT = jax.nn.silu


def _setup(t, d, e, f, k, seed=0):
  ks = jax.random.split(jax.random.key(seed), 4)
  x = jax.random.normal(ks[0], (t, d))
  logits = jax.random.normal(ks[1], (t, e)) * 2.0
  wi = jax.random.normal(ks[2], (e, d, 2, f)) / np.sqrt(d)
  wo = jax.random.normal(ks[3], (e, f, d)) / np.sqrt(f)
  return x, logits, wi, wo


def _reference(x, routing, wi, wo):
  """Per-slot dense computation: sum_k gate * expert_{idx}(x)."""
  h = jnp.einsum("td,edjf->tejf", x, wi, precision="highest")
  y_all = jnp.einsum("tef,efd->ted", ACT(h[..., 0, :]) * h[..., 1, :], wo, precision="highest")
  y_slots = jnp.take_along_axis(y_all, routing.expert_index[..., None], axis=1)
  return jnp.einsum("tk,tkd->td", routing.gates * routing.mask, y_slots)


def _run(x, logits, wi, wo, k, **kw):
  routing = routers.top_k_routing(logits, k)
  return dispatch.moe_forward(x, routing, wi, wo, ACT, **kw)


EXECUTIONS = [dict(execution="dropless", impl="blocked", block_size=4),
              dict(execution="dropless", impl="blocked", block_size=256),
              dict(execution="dropless", impl="ragged"),
              dict(execution="capacity", capacity=None)]


@pytest.mark.parametrize("t,e,k,block,seed", [(1, 4, 2, 8, 0), (13, 5, 3, 4, 1),
                                              (7, 3, 1, 3, 2), (9, 1, 1, 2, 3)])
def test_executions_match_reference(t, e, k, block, seed):
  """Group sizes that are not block multiples, empty experts, T smaller than E, one expert."""
  x, logits, wi, wo = _setup(t, 6, e, 5, k, seed)
  routing = routers.top_k_routing(logits, k)
  ref = _reference(x, routing, wi, wo)

  @jax.jit
  def run(x, routing, wi, wo):
    return [dispatch.moe_forward(x, routing, wi, wo, ACT, **kw)
            for kw in (dict(execution="dropless", impl="blocked", block_size=block),
                       dict(execution="capacity", capacity=t))]

  for y, info in run(x, routing, wi, wo):
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=2e-5, atol=2e-5)
    assert float(info.drop_rate) == 0.0


def test_all_executions_same_values_and_grads():
  t, d, e, f, k = 24, 8, 4, 6, 2
  x, logits, wi, wo = _setup(t, d, e, f, k)

  def loss(args, kw):
    x, logits, wi, wo = args
    if kw.get("execution") == "capacity":
      kw = kw | dict(capacity=t)  # nothing dropped
    y, _ = _run(x, logits, wi, wo, k, **kw)
    return jnp.sum(jnp.sin(y))

  results = [jax.jit(jax.value_and_grad(lambda a, kw=kw: loss(a, kw)))((x, logits, wi, wo))
             for kw in EXECUTIONS]
  (v0, g0) = results[0]
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(g0))  # incl. router logits
  for v, g in results[1:]:
    np.testing.assert_allclose(float(v), float(v0), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g0)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_blocked_grouped_matmul_against_reference_with_grads():
  m, kdim, n, g, block = 24, 5, 7, 4, 4
  sizes = np.array([3, 0, 9, 6], np.int32)  # not block multiples, one empty group
  padded = -(-sizes // block) * block
  starts = np.cumsum(padded) - padded
  rows = int(np.ceil((sizes.sum() + g * (block - 1)) / block) * block)
  assert rows >= m
  ks = jax.random.split(jax.random.key(0), 3)
  rhs = jax.random.normal(ks[1], (g, kdim, n))
  lhs = np.zeros((rows, kdim), np.float32)
  group_of_row = np.full(rows, -1)
  vals = np.asarray(jax.random.normal(ks[0], (int(sizes.sum()), kdim)))
  i = 0
  for grp in range(g):
    lhs[starts[grp]:starts[grp] + sizes[grp]] = vals[i:i + sizes[grp]]
    group_of_row[starts[grp]:starts[grp] + sizes[grp]] = grp
    i += sizes[grp]
  lhs = jnp.asarray(lhs)
  used = group_of_row >= 0

  def ref(lhs, rhs):
    out = jnp.einsum("mk,mkn->mn", lhs, rhs[np.maximum(group_of_row, 0)])
    return jnp.where(used[:, None], out, 0.0)

  def blk(lhs, rhs):
    return dispatch.grouped_matmul(lhs, rhs, jnp.asarray(sizes), impl="blocked", block=block)

  np.testing.assert_allclose(np.asarray(blk(lhs, rhs))[used], np.asarray(ref(lhs, rhs))[used],
                             rtol=1e-5, atol=1e-5)
  cot = jax.random.normal(ks[2], (rows, n)) * used[:, None]
  g_ref = jax.grad(lambda a, b: jnp.sum(ref(a, b) * cot), argnums=(0, 1))(lhs, rhs)
  g_blk = jax.jit(jax.grad(lambda a, b: jnp.sum(blk(a, b) * cot), argnums=(0, 1)))(lhs, rhs)
  for a, b in zip(g_blk, g_ref):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("policy", ["gate", "position"])
def test_capacity_respected_and_dropped_tokens_give_zero(policy):
  t, d, e, f, k = 32, 4, 4, 3, 2
  x, logits, wi, wo = _setup(t, d, e, f, k, seed=3)
  logits = logits.at[:, 0].add(3.0)  # expert 0 is popular: it overflows
  routing = routers.top_k_routing(logits, k)
  cap = dispatch.compute_capacity(t, k, e, 0.5)
  assert cap == 8
  valid = routing.mask.reshape(-1)
  y_slots, kept = dispatch.capacity_expert_outputs(
      x, jnp.arange(t * k) // k, routing.expert_index.reshape(-1), valid, wi, wo, ACT,
      capacity=cap, priority=dispatch.drop_priority(routing, policy))
  kept = np.asarray(kept)
  idx = np.asarray(routing.expert_index).reshape(-1)
  assert (np.bincount(idx[kept], minlength=e) <= cap).all()
  assert (np.bincount(idx[kept], minlength=e) == np.minimum(np.bincount(idx, minlength=e),
                                                              cap)).all()
  np.testing.assert_array_equal(np.asarray(y_slots)[~kept], 0.0)
  gates = np.asarray(routing.gates).reshape(-1)
  for ex in range(e):
    sel, drop = (idx == ex) & kept, (idx == ex) & ~kept
    if drop.any():
      if policy == "gate":  # the lowest gates were dropped
        assert gates[drop].max() <= gates[sel].min()
      else:  # first choices before second choices, then token order
        order = np.arange(t * k).reshape(t, k).T.reshape(-1)
        prio = np.empty(t * k, int)
        prio[order] = np.arange(t * k)
        assert prio[drop].min() > prio[sel].max()
  y, info = dispatch.moe_forward(x, routing, wi, wo, ACT, execution="capacity", capacity=cap,
                                 drop_policy=policy)
  np.testing.assert_allclose(float(info.drop_rate), 1 - kept.mean(), rtol=1e-6)
  assert float(info.drop_rate) > 0
  fully_dropped = ~kept.reshape(t, k).any(-1)
  np.testing.assert_array_equal(np.asarray(y)[fully_dropped], 0.0)


def test_compute_capacity():
  assert dispatch.compute_capacity(4096, 2, 8, 1.25) == 1280
  assert dispatch.compute_capacity(1, 2, 8, 1.25) == 1  # decoding: at least 1, at most T
  assert dispatch.compute_capacity(10, 2, 2, 4.0) == 10


def test_pallas_hook():
  x, logits, wi, wo = _setup(8, 4, 4, 3, 2)
  if importlib.util.find_spec("effx.pallas_kernels.grouped_matmul") is None:
    with pytest.raises(NotImplementedError, match="grouped_matmul"):
      _run(x, logits, wi, wo, 2, execution="dropless", impl="pallas")
  else:
    y, _ = _run(x, logits, wi, wo, 2, execution="dropless", impl="pallas")
    ref, _ = _run(x, logits, wi, wo, 2, execution="dropless", impl="ragged")
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-4, atol=1e-4)


def test_bfloat16_close_to_float32():
  x, logits, wi, wo = _setup(16, 8, 4, 6, 2)
  y32, _ = _run(x, logits, wi, wo, 2, execution="dropless", impl="blocked")
  y16, _ = _run(*(a.astype(jnp.bfloat16) for a in (x,)), logits,
                wi.astype(jnp.bfloat16), wo.astype(jnp.bfloat16), 2, execution="dropless",
                impl="blocked")
  assert y16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y16, np.float32), np.asarray(y32), rtol=5e-2, atol=5e-2)
