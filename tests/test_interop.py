"""effx layers inside models that are not effx's: a plain Linen model and an NNX model through
`flax.nnx.bridge.ToNNX`, under jax.jit, jax.grad, jax.vmap and jax.checkpoint (remat)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from effx.attention.masks import CausalMask, SlidingWindowMask
from effx.attention.mha import MultiHeadAttention
from effx.moe.layer import MoEFeedForward

B, S, E, V = 2, 8, 16, 11


def attention() -> MultiHeadAttention:
  return MultiHeadAttention(num_heads=4, num_kv_heads=2, mask=CausalMask() & SlidingWindowMask(4))


def moe(cls=MoEFeedForward) -> MoEFeedForward:
  # expert_axis=None: no expert parallelism, whatever mesh is current
  return cls(num_experts=4, top_k=2, expert_dim=8, expert_axis=None)


def inputs(key: int = 1, lead: tuple[int, ...] = ()) -> tuple[jax.Array, jax.Array, jax.Array]:
  x = jax.random.normal(jax.random.key(key), lead + (B, S, E))
  pos = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), lead + (B, S))
  labels = jax.random.randint(jax.random.key(key + 1), lead + (B, S), 0, V)
  return x, pos, labels


def xent(logits, labels):
  return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[..., None], -1))


def assert_trees_close(a, b, atol=1e-5):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol),
               a, b)


def assert_all_nonzero(grads):
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert np.all(np.isfinite(g)), path
    assert np.abs(np.asarray(g)).max() > 0, f"zero gradient at {jax.tree_util.keystr(path)}"


# ----------------------------------------------------------------------------- plain Linen


class UserModel(nn.Module):
  """Somebody's own Linen model: LayerNorms and Dense are theirs, attention and MoE are effx's."""

  remat: bool = False

  @nn.compact
  def __call__(self, x, positions):
    attn_cls = nn.remat(MultiHeadAttention) if self.remat else MultiHeadAttention
    moe_cls = nn.remat(MoEFeedForward) if self.remat else MoEFeedForward
    a = attention()
    y, _ = attn_cls(**{f: getattr(a, f) for f in ("num_heads", "num_kv_heads", "mask")},
                    name="attn")(nn.LayerNorm()(x), positions)
    x = x + y
    x = x + moe_cls(num_experts=4, top_k=2, expert_dim=8, expert_axis=None,
                    name="moe")(nn.LayerNorm()(x))
    return nn.Dense(V)(x)


def test_linen_model_jit_grad_vmap_remat():
  model = UserModel()
  x, pos, labels = inputs()
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), x, pos)["params"])
  assert params["attn"]["query_kernel"].shape == (E, 4, 4)
  assert params["moe"]["wi"].shape == (4, E, 2, 8)

  def loss(p, x, pos, labels, m=model):
    logits, state = m.apply({"params": p}, x, pos, mutable=["aux_loss"])
    aux = sum(jax.tree.leaves(state["aux_loss"]))  # the MoE's load-balance + z losses
    return xent(logits, labels) + aux

  apply = jax.jit(model.apply)
  value, grads = jax.jit(jax.value_and_grad(loss))(params, x, pos, labels)
  assert np.isfinite(value)
  assert_all_nonzero(grads["attn"])
  assert_all_nonzero(grads["moe"])

  # remat: jax.checkpoint around the whole apply, and nn.remat around the effx modules
  @jax.jit
  def remat_grads(p):
    return (jax.grad(jax.checkpoint(loss))(p, x, pos, labels),
            jax.grad(lambda q: loss(q, x, pos, labels, UserModel(remat=True)))(p))
  outer, inner = remat_grads(params)
  assert_trees_close(outer, grads)
  assert_trees_close(inner, grads)

  # vmap over an extra leading axis == a Python loop over it
  xs, ps, _ = inputs(key=5, lead=(3,))
  batched = jax.jit(jax.vmap(model.apply, in_axes=(None, 0, 0)))({"params": params}, xs, ps)
  looped = jnp.stack([apply({"params": params}, xs[i], ps[i]) for i in range(3)])
  np.testing.assert_allclose(batched, looped, atol=1e-5)


# ----------------------------------------------------------------------------- NNX


class MoEForNNX(MoEFeedForward):
  """`MoEFeedForward` for `nnx.bridge.ToNNX`.

  The bridge turns every sown value into an attribute; this keeps the aux losses only, and the
  latest value instead of a growing tuple, so a training step can read `aux_loss()`.
  """

  def sow(self, col, name, value, *args, **kwargs):
    if col != "aux_loss":
      return False
    return super().sow(col, name, value, reduce_fn=lambda _, new: new,
                       init_fn=lambda: jnp.zeros((), jnp.float32))


class UserNNXModel(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.attn = nnx.bridge.ToNNX(attention(), rngs=rngs)
    self.moe = nnx.bridge.ToNNX(moe(MoEForNNX), rngs=rngs)
    self.norm = nnx.RMSNorm(E, rngs=rngs)
    self.out = nnx.Linear(E, V, rngs=rngs)

  def __call__(self, x, positions):
    y, _ = self.attn(x, positions)
    x = x + y
    x = x + self.moe(self.norm(x), mutable=["aux_loss"])  # fresh aux losses every call
    return self.out(x)

  def aux_loss(self) -> jax.Array:
    return self.moe.load_balance_loss[...] + self.moe.router_z_loss[...]


def make_nnx_model() -> UserNNXModel:
  x, pos, _ = inputs()
  # effx params carry logical axis names; flax 0.12 NNX shards such variables eagerly and needs
  # a mesh + rules for that, so build without eager sharding (or under `jax.set_mesh(mesh)`
  # with `nn.logical_axis_rules`).
  with nnx.use_eager_sharding(False):
    model = UserNNXModel(nnx.Rngs(0))
    nnx.bridge.lazy_init(model, x, pos)
  return model


def test_nnx_model_through_to_nnx_jit_grad_vmap_remat():
  model = make_nnx_model()
  assert model.attn.query_kernel[...].shape == (E, 4, 4)
  assert model.moe.wi[...].shape == (4, E, 2, 8)
  x, pos, labels = inputs()
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def forward(params, rest, x, pos):  # the functional form: plain jax transforms apply
    # copy=True: fresh Variables at the current trace (jax.grad passes `rest` through as is,
    # and the call updates the RNG counts and the sown aux losses)
    m = nnx.merge(graphdef, params, rest, copy=True)
    return m(x, pos), m.aux_loss()

  def loss(params, rest, x, pos, labels):
    logits, aux = forward(params, rest, x, pos)
    return xent(logits, labels) + aux

  jit_forward = jax.jit(forward)
  logits, aux = jit_forward(params, rest, x, pos)
  assert logits.shape == (B, S, V) and float(aux) > 0

  @jax.jit
  def grads_plain_and_remat(params, rest):
    return (jax.grad(loss)(params, rest, x, pos, labels),
            jax.grad(jax.checkpoint(loss))(params, rest, x, pos, labels))
  grads, remat = grads_plain_and_remat(params, rest)
  assert_all_nonzero(grads["attn"])
  assert_all_nonzero(grads["moe"])
  assert_trees_close(remat, grads)

  xs, ps, _ = inputs(key=5, lead=(3,))
  batched, _ = jax.jit(jax.vmap(forward, in_axes=(None, None, 0, 0)))(params, rest, xs, ps)
  looped = jnp.stack([jit_forward(params, rest, xs[i], ps[i])[0] for i in range(3)])
  np.testing.assert_allclose(batched, looped, atol=1e-5)

  # the stateful NNX API works as well
  @nnx.jit
  def nnx_step(m):
    return nnx.grad(lambda m: xent(m(x, pos), labels) + m.aux_loss())(m), m(x, pos)
  nnx_grads, nnx_logits = nnx_step(model)
  assert_trees_close(nnx.state(nnx_grads, nnx.Param), grads)
  np.testing.assert_allclose(nnx_logits, logits, atol=1e-5)


def test_unmodified_moe_through_to_nnx():
  """The library MoE layer itself goes through the bridge: its sown names are distinct."""
  x, pos, _ = inputs()
  with nnx.use_eager_sharding(False):
    layer = nnx.bridge.ToNNX(moe(), rngs=nnx.Rngs(0))
    nnx.bridge.lazy_init(layer, x)
    y = layer(x)
  assert y.shape == x.shape and np.isfinite(np.asarray(y)).all()
