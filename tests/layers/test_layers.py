"""Tests for effx.layers: norms, MLPs, embeddings and rotary embeddings against numpy."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from effx.layers import (MLP, Embed, GatedMLP, LayerNorm, RMSNorm, RotaryConfig, activation,
                         apply_rotary, make_norm)

RNG = np.random.default_rng(0)


def _x(*shape, scale=1.0, offset=0.0):
  return (RNG.standard_normal(shape) * scale + offset).astype(np.float32)


def _rms_ref(x, scale, eps):
  x = x.astype(np.float64)
  return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * scale


def _ln_ref(x, scale, bias, eps):
  x = x.astype(np.float64)
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * scale + bias


# ----------------------------------------------------------------------------------- norms


def test_rmsnorm_matches_numpy():
  x = _x(2, 3, 8, scale=3.0)
  norm = RMSNorm(epsilon=1e-5)
  params = nn.unbox(norm.init(jax.random.key(0), x))["params"]
  scale = _x(8)
  y = norm.apply({"params": {"scale": jnp.asarray(scale)}}, x)
  assert params["scale"].shape == (8,) and np.all(np.asarray(params["scale"]) == 1)
  np.testing.assert_allclose(np.asarray(y), _rms_ref(x, scale, 1e-5), rtol=1e-5, atol=1e-5)


def test_rmsnorm_without_scale_has_no_params():
  x = _x(2, 4, 8)
  norm = RMSNorm(use_scale=False)
  variables = norm.init(jax.random.key(0), x)
  assert not jax.tree.leaves(variables)
  np.testing.assert_allclose(np.asarray(norm.apply(variables, x)), _rms_ref(x, 1.0, 1e-6),
                             rtol=1e-5, atol=1e-5)


def test_layernorm_matches_numpy():
  x = _x(2, 3, 8, scale=2.0, offset=5.0)
  norm = LayerNorm(epsilon=1e-5)
  scale, bias = _x(8), _x(8)
  y = norm.apply({"params": {"scale": jnp.asarray(scale), "bias": jnp.asarray(bias)}}, x)
  np.testing.assert_allclose(np.asarray(y), _ln_ref(x, scale, bias, 1e-5), rtol=1e-4, atol=1e-4)


def test_layernorm_without_bias():
  x = _x(3, 8)
  norm = LayerNorm(use_bias=False)
  variables = nn.unbox(norm.init(jax.random.key(0), x))
  assert set(variables["params"]) == {"scale"}
  np.testing.assert_allclose(np.asarray(norm.apply(variables, x)), _ln_ref(x, 1.0, 0.0, 1e-6),
                             rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["rmsnorm", "layernorm"])
def test_norm_bf16_in_bf16_out_with_f32_stats(kind):
  # Large offset: a bf16 mean/variance would lose the small deviations entirely.
  x32 = _x(2, 4, 64, scale=0.5, offset=100.0)
  x = jnp.asarray(x32, jnp.bfloat16)
  norm = make_norm(kind)
  variables = norm.init(jax.random.key(0), x)
  for leaf in jax.tree.leaves(nn.unbox(variables)):
    assert leaf.dtype == jnp.float32  # params default to float32
  y = norm.apply(variables, x)
  assert y.dtype == jnp.bfloat16
  xr = np.asarray(x.astype(jnp.float32))  # the bf16 input, exactly
  ref = _rms_ref(xr, 1.0, 1e-6) if kind == "rmsnorm" else _ln_ref(xr, 1.0, 0.0, 1e-6)
  # Stats in f32: only the final rounding to bf16 (relative 2^-8) separates y from the f64 ref.
  np.testing.assert_allclose(np.asarray(y.astype(jnp.float32)), ref, rtol=2 ** -7, atol=2e-2)
  # A compute-dtype override: bf16 in, f32 out.
  y32 = make_norm(kind, dtype=jnp.float32).apply(variables, x)
  assert y32.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(y32), ref, rtol=1e-4, atol=1e-3)


def test_make_norm_unknown_kind():
  with pytest.raises(ValueError, match="norm: unknown kind 'batchnorm'"):
    make_norm("batchnorm")


# ------------------------------------------------------------------------------------- MLPs


def _silu(x):
  return x / (1 + np.exp(-x))


def test_gated_mlp_shapes_and_numerics():
  x = _x(2, 5, 8)
  mlp = GatedMLP(hidden_dim=16, activation="silu")
  params = nn.unbox(mlp.init(jax.random.key(0), x))["params"]
  assert params["wi"].shape == (8, 2, 16) and params["wo"].shape == (16, 8)
  y = mlp.apply({"params": params}, x)
  assert y.shape == (2, 5, 8) and y.dtype == jnp.float32
  wi, wo = np.asarray(params["wi"], np.float64), np.asarray(params["wo"], np.float64)
  ref = (_silu(x @ wi[:, 0]) * (x @ wi[:, 1])) @ wo
  np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("use_bias", [False, True])
def test_mlp_shapes_and_numerics(use_bias):
  x = _x(2, 5, 8)
  mlp = MLP(hidden_dim=12, activation="relu", use_bias=use_bias)
  params = nn.unbox(mlp.init(jax.random.key(0), x))["params"]
  assert params["wi"]["kernel"].shape == (8, 12) and params["wo"]["kernel"].shape == (12, 8)
  assert ("bias" in params["wi"]) == use_bias
  if use_bias:  # non-zero biases so they are exercised
    params = jax.tree.map(lambda p: p, params)
    params["wi"]["bias"] = jnp.asarray(_x(12))
    params["wo"]["bias"] = jnp.asarray(_x(8))
  y = mlp.apply({"params": params}, x)
  assert y.shape == (2, 5, 8)
  h = x @ np.asarray(params["wi"]["kernel"]) + (np.asarray(params["wi"]["bias"]) if use_bias else 0)
  ref = np.maximum(h, 0) @ np.asarray(params["wo"]["kernel"]) + (
      np.asarray(params["wo"]["bias"]) if use_bias else 0)
  np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-4, atol=1e-5)


def test_mlp_bf16_compute_f32_params():
  x = jnp.asarray(_x(2, 3, 8), jnp.bfloat16)
  for mlp in (GatedMLP(16, dtype=jnp.bfloat16), MLP(16, dtype=jnp.bfloat16)):
    variables = mlp.init(jax.random.key(0), x)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nn.unbox(variables)))
    assert mlp.apply(variables, x).dtype == jnp.bfloat16


def test_mlp_config_errors():
  with pytest.raises(ValueError, match="GatedMLP.hidden_dim: got 0"):
    GatedMLP(hidden_dim=0)
  with pytest.raises(ValueError, match="MLP.hidden_dim: got -1"):
    MLP(hidden_dim=-1)
  with pytest.raises(ValueError, match="activation: unknown name 'tanhh'"):
    GatedMLP(hidden_dim=4, activation="tanhh")
  assert activation("relu")(jnp.array(-1.0)) == 0


# ------------------------------------------------------------------------------- embedding


def test_embed_lookup_and_tied_attend():
  emb = Embed(vocab_size=11, features=6)
  tokens = jnp.array([[0, 3, 10], [5, 5, 1]], jnp.int32)
  params = nn.unbox(emb.init(jax.random.key(0), tokens))["params"]
  table = np.asarray(params["embedding"])
  assert table.shape == (11, 6)
  np.testing.assert_array_equal(np.asarray(emb.apply({"params": params}, tokens)),
                                table[np.asarray(tokens)])
  h = _x(2, 3, 6)
  logits = emb.apply({"params": params}, h, method=Embed.attend)
  np.testing.assert_allclose(np.asarray(logits), h @ table.T, rtol=1e-5, atol=1e-5)
  with pytest.raises(TypeError, match="integer"):
    emb.apply({"params": params}, jnp.zeros((1, 2), jnp.float32))


# ------------------------------------------------------------------ logical partitioning


@pytest.mark.parametrize("module,x,expected", [
    (RMSNorm(), _x(2, 8), {("scale",): P("norm")}),
    (LayerNorm(), _x(2, 8), {("scale",): P("norm"), ("bias",): P("norm")}),
    (GatedMLP(16), _x(1, 2, 8), {("wi",): P("embed", None, "mlp"), ("wo",): P("mlp", "embed")}),
    (MLP(16, use_bias=True), _x(1, 2, 8),
     {("wi", "kernel"): P("embed", "mlp"), ("wi", "bias"): P("mlp"),
      ("wo", "kernel"): P("mlp", "embed"), ("wo", "bias"): P("embed")}),
    (Embed(7, 8), np.zeros((1, 2), np.int32), {("embedding",): P("vocab", "embed")}),
], ids=["rmsnorm", "layernorm", "gated_mlp", "mlp", "embed"])
def test_params_carry_logical_axis_names(module, x, expected):
  variables = jax.eval_shape(module.init, jax.random.key(0), x)
  specs = nn.get_partition_spec(variables)["params"]
  flat = {tuple(k.key for k in path): spec for path, spec in
          jax.tree_util.tree_leaves_with_path(specs, is_leaf=lambda s: isinstance(s, P))}
  assert flat == expected
  assert all(len(spec) > 0 for spec in flat.values())


# ---------------------------------------------------------------------------------- rotary


def _rotate_ref(x, positions, inv):
  """numpy half-split RoPE: pair (i, i + r/2) is a complex number rotated by pos * inv[i]."""
  r = 2 * len(inv)
  z = x[..., :r // 2] + 1j * x[..., r // 2:r]
  ang = positions[..., None, None] * inv  # [b, s, 1, r/2]
  z = z * np.exp(1j * ang)
  return np.concatenate([z.real, z.imag, x[..., r:]], axis=-1)


@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_rotary_matches_complex_reference(fraction):
  cfg = RotaryConfig(base=100.0, fraction=fraction)
  x = _x(2, 5, 3, 8)
  pos = np.array([[0, 1, 2, 7, 30], [4, 3, 2, 1, 0]], np.int32)
  y = apply_rotary(jnp.asarray(x), jnp.asarray(pos), cfg)
  inv = np.asarray(cfg.inverse_frequencies(int(8 * fraction)), np.float64)
  np.testing.assert_allclose(np.asarray(y), _rotate_ref(x.astype(np.float64), pos, inv),
                             rtol=1e-4, atol=1e-4)
  if fraction < 1:  # the unrotated channels pass through untouched
    np.testing.assert_array_equal(np.asarray(y)[..., 4:], x[..., 4:])


@pytest.mark.parametrize("cfg", [RotaryConfig(), RotaryConfig(base=500.0, fraction=0.5),
                                 RotaryConfig(scaling="llama3", factor=8.0,
                                              original_max_position=64)],
                         ids=["rope", "partial", "llama3"])
def test_rotary_dot_product_depends_only_on_offset(cfg):
  q, k = _x(1, 1, 1, 16), _x(1, 1, 1, 16)

  def score(m, n):
    qm = apply_rotary(jnp.asarray(q), jnp.array([[m]], jnp.int32), cfg)
    kn = apply_rotary(jnp.asarray(k), jnp.array([[n]], jnp.int32), cfg)
    return float(jnp.sum(qm * kn))

  for offset in (0, 3, 11):
    scores = [score(m + offset, m) for m in (0, 5, 40, 123)]
    np.testing.assert_allclose(scores, scores[0], rtol=1e-4, atol=1e-4)
  assert abs(score(3, 0) - score(11, 0)) > 1e-3  # positions do matter


def test_rotary_none_is_identity():
  x = jnp.asarray(_x(2, 4, 2, 8))
  pos = jnp.broadcast_to(jnp.arange(4, dtype=jnp.int32), (2, 4)) * 17
  y = apply_rotary(x, pos, RotaryConfig(kind="none"))
  np.testing.assert_array_equal(np.asarray(y), np.asarray(x))


def test_rotary_keeps_bf16():
  x = jnp.asarray(_x(1, 3, 2, 8), jnp.bfloat16)
  assert apply_rotary(x, jnp.zeros((1, 3), jnp.int32), RotaryConfig()).dtype == jnp.bfloat16


def test_inverse_frequencies_plain_and_linear():
  base = RotaryConfig(base=10_000.0).inverse_frequencies(4)
  np.testing.assert_allclose(np.asarray(base), [1.0, 0.01], rtol=1e-6)
  lin = RotaryConfig(base=10_000.0, scaling="linear", factor=4.0).inverse_frequencies(4)
  np.testing.assert_allclose(np.asarray(lin), [0.25, 0.0025], rtol=1e-6)


def test_inverse_frequencies_llama3_hand_case():
  # rotary_dim 8, base 10^4: inv = [1, 0.1, 0.01, 0.001], wavelengths 2*pi/inv =
  # [6.28, 62.8, 628, 6283]. With original_max_position 1024, low 1, high 4: wavelengths
  # < 256 keep their frequency, > 1024 are divided by the factor (8), and 628 lies between,
  # smoothly interpolated with smooth = (1024 / 628.3 - 1) / (4 - 1).
  cfg = RotaryConfig(base=10_000.0, scaling="llama3", factor=8.0, low_freq_factor=1.0,
                     high_freq_factor=4.0, original_max_position=1024)
  smooth = (1024 / (2 * math.pi / 0.01) - 1) / 3
  expected = [1.0, 0.1, (1 - smooth) * 0.01 / 8 + smooth * 0.01, 0.001 / 8]
  assert 0 < smooth < 1
  np.testing.assert_allclose(np.asarray(cfg.inverse_frequencies(8)), expected, rtol=1e-5)


@pytest.mark.parametrize("kwargs,field", [
    (dict(kind="alibi"), "rotary.kind"), (dict(base=1.0), "rotary.base"),
    (dict(fraction=0.0), "rotary.fraction"), (dict(scaling="yarn"), "rotary.scaling")])
def test_rotary_config_errors(kwargs, field):
  with pytest.raises(ValueError, match=field):
    RotaryConfig(**kwargs)
