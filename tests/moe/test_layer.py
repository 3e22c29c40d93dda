"""MoEFeedForward: config validation, sown losses/metrics, decoding shapes, router gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effx.moe import MoEFeedForward, routers

SMALL = dict(num_experts=4, top_k=2, expert_dim=6, expert_axis=None)


def _x(b=2, s=5, d=8, seed=0):
  return jax.random.normal(jax.random.key(seed), (b, s, d))


@pytest.mark.parametrize("kw,field", [
    (dict(top_k=5), "top_k"), (dict(num_experts=0), "num_experts"),
    (dict(capacity_factor=0.0), "capacity_factor"),
    (dict(eval_capacity_factor=-1.0), "eval_capacity_factor"),
    (dict(dispatch="sparse"), "dispatch"), (dict(impl="cuda"), "impl"),
    (dict(drop_policy="random"), "drop_policy"), (dict(activation="tanhh"), "activation"),
    (dict(load_balance_coef=-1.0), "load_balance_coef"), (dict(block_size=0), "block_size"),
    (dict(routing="hash"), "routing"), (dict(expert_dim=0), "expert_dim"),
])
def test_config_errors_name_the_field(kw, field):
  with pytest.raises(ValueError, match=field) as err:
    MoEFeedForward(**(SMALL | kw))
  assert "\n" not in str(err.value)


def test_expert_choice_refused_for_causal_unless_allowed():
  with pytest.raises(ValueError, match="allow_noncausal_routing") as err:
    MoEFeedForward(**SMALL, routing="expert_choice")
  assert "\n" not in str(err.value) and "routing" in str(err.value)
  x = _x()
  for kw in (dict(causal=False), dict(allow_noncausal_routing=True)):
    m = MoEFeedForward(**SMALL, routing="expert_choice", **kw)
    y = m.apply(m.init(jax.random.key(0), x), x)
    assert y.shape == x.shape and np.isfinite(np.asarray(y)).all()


def test_sown_losses_and_metrics():
  x = _x()
  m = MoEFeedForward(**SMALL, load_balance_coef=0.5, z_loss_coef=0.25, num_shared_experts=1,
                     shared_expert_dim=3)
  params = {"params": m.init(jax.random.key(1), x)["params"]}
  y, sown = m.apply(params, x, mutable=["aux_loss", "metrics"])
  aux, met = sown["aux_loss"], sown["metrics"]
  assert set(aux) == {"load_balance_loss", "router_z_loss"}
  assert set(met) == {"expert_load", "drop_rate", "load_balance_unscaled", "router_z_unscaled",
                      "router_entropy"}
  np.testing.assert_allclose(float(aux["load_balance_loss"][0]),
                             0.5 * float(met["load_balance_unscaled"][0]), rtol=1e-6)
  np.testing.assert_allclose(float(aux["router_z_loss"][0]),
                             0.25 * float(met["router_z_unscaled"][0]), rtol=1e-6)
  load = np.asarray(met["expert_load"][0])
  assert load.shape == (4,) and np.isclose(load.sum(), 1.0)
  assert float(met["drop_rate"][0]) == 0.0  # dropless
  assert 0 < float(met["router_entropy"][0]) <= np.log(4) + 1e-6
  assert params["params"]["shared_experts"]["wo"].value.shape == (3, 8)
  # coefficients 0: nothing sown into aux_loss
  m0 = MoEFeedForward(**SMALL, load_balance_coef=0.0, z_loss_coef=0.0)
  _, sown0 = m0.apply({"params": m0.init(jax.random.key(1), x)["params"]}, x,
                      mutable=["aux_loss", "metrics"])
  assert "aux_loss" not in sown0 or not sown0["aux_loss"]


def test_params_carry_logical_axes():
  x = _x()
  v = MoEFeedForward(**SMALL).init(jax.random.key(1), x)["params"]
  assert v["wi"].names == ("expert", "embed", None, "mlp") and v["wi"].value.shape == (4, 8, 2, 6)
  assert v["wo"].names == ("expert", "mlp", "embed") and v["wo"].value.shape == (4, 6, 8)
  assert v["router"]["kernel"].names == ("embed", None)


def test_router_gradient_nonzero_from_the_output_alone():
  x = _x()
  m = MoEFeedForward(**SMALL, load_balance_coef=0.0, z_loss_coef=0.0)
  params = m.init(jax.random.key(1), x)["params"]
  g = jax.grad(lambda p: jnp.sum(jnp.sin(m.apply({"params": p}, x))))(params)
  assert float(jnp.abs(g["router"]["kernel"].value).max()) > 0
  assert float(jnp.abs(g["wi"].value).max()) > 0


@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
def test_decoding_one_token_at_a_time_matches_full_sequence(dispatch):
  """Token-choice routing is per token: a [1, 1] step gives the same row as the full batch
  (nothing dropped at eval capacity 4 = E / k * 2)."""
  x = _x(2, 3)
  m = MoEFeedForward(**SMALL, dispatch=dispatch, eval_capacity_factor=4.0)
  params = {"params": m.init(jax.random.key(1), x)["params"]}
  full = m.apply(params, x)
  step = jax.jit(lambda xt: m.apply(params, xt))
  for b in range(2):
    for s in range(3):
      y = step(x[b:b + 1, s:s + 1])
      assert y.shape == (1, 1, 8)
      np.testing.assert_allclose(np.asarray(y[0, 0]), np.asarray(full[b, s]), rtol=1e-5,
                                 atol=1e-6)


def test_train_capacity_factor_drops_and_eval_does_not():
  x = _x(4, 8)
  m = MoEFeedForward(**SMALL, dispatch="capacity", capacity_factor=0.25,
                     eval_capacity_factor=2.0)
  params = {"params": m.init(jax.random.key(1), x)["params"]}
  _, train = m.apply(params, x, deterministic=False, mutable=["metrics"])
  _, ev = m.apply(params, x, mutable=["metrics"])
  assert float(train["metrics"]["drop_rate"][0]) >= 0.5
  assert float(ev["metrics"]["drop_rate"][0]) < float(train["metrics"]["drop_rate"][0])


def test_bias_balancing_state_and_update_function():
  x = _x(2, 16)
  m = MoEFeedForward(**SMALL, bias_balancing=True, load_balance_coef=0.0)
  v = m.init(jax.random.key(1), x)
  state = {"params": v["params"], "moe_state": v["moe_state"]}
  _, new = m.apply(state, x, mutable=["moe_state", "metrics"])
  load = new["moe_state"]["router"]["expert_load"]
  np.testing.assert_allclose(float(load.sum()), 2 * 16 * 2)  # all T*k slots counted
  bias = routers.update_moe_state(new["moe_state"], 0.1)["router"]["expert_bias"]
  np.testing.assert_allclose(np.asarray(bias), 0.1 * np.sign(np.mean(load) - np.asarray(load)))


def test_bfloat16_layer():
  x = _x()
  m16 = MoEFeedForward(**SMALL, dtype=jnp.bfloat16)
  m32 = MoEFeedForward(**SMALL)
  params = {"params": m32.init(jax.random.key(1), x)["params"]}
  y16, y32 = m16.apply(params, x), m32.apply(params, x)
  assert y16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y16, np.float32), np.asarray(y32), rtol=5e-2, atol=5e-2)
