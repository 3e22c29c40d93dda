"""Tests for effx.model.DecoderLM: decode == full forward (scanned and unrolled), layer
patterns, scan == unroll, remat policies, bf16 compute, hidden states, packed documents."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from effx.attention import masks as M
from effx.attention.mha import MultiHeadAttention
from effx.layers.mlp import GatedMLP
from effx.model import DecoderLM, block, cache_length, count_params, set_cache_length

VOCAB, EMBED = 32, 16


def make_lm(*, scan_layers=True, num_layers=4, pattern="global+window", **kwargs):
  ffn = functools.partial(GatedMLP, hidden_dim=32)
  glob = block(functools.partial(MultiHeadAttention, num_heads=4, num_kv_heads=2), ffn)
  window = block(functools.partial(MultiHeadAttention, num_heads=4, num_kv_heads=1,
                                   mask=M.CausalMask() & M.SlidingWindowMask(3)), ffn,
                 norm="layernorm")
  layer_pattern = {"global+window": [glob, window], "global": [glob], "window": [window]}[pattern]
  return DecoderLM(vocab_size=VOCAB, embed_dim=EMBED, num_layers=num_layers,
                   layer_pattern=layer_pattern, scan_layers=scan_layers, **kwargs)


def _tokens(batch, t, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, (batch, t)), jnp.int32)


@functools.cache
def _apply(model):
  return jax.jit(model.apply)


def _init(model, tokens, seed=0):
  """Random variables of `model`'s shapes (filled from numpy: `model.init` compiles slowly)."""
  shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), tokens))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name == "scale":
      return jnp.asarray(1 + 0.1 * rng.standard_normal(leaf.shape), leaf.dtype)
    std = 1.0 if name == "embedding" else 0.3
    return jnp.asarray(std * rng.standard_normal(leaf.shape), leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


# Built once: jit caches are keyed on the model, and factories (partials) compare by identity.
LM = {"scan": make_lm(scan_layers=True, num_layers=2),
      "unrolled": make_lm(scan_layers=False, num_layers=2),
      "global": make_lm(pattern="global", num_layers=2),
      "window": make_lm(pattern="window", num_layers=2),
      "tied": make_lm(num_layers=2, tie_embeddings=True)}


@pytest.mark.parametrize("kind", ["scan", "unrolled"])
def test_decode_equals_full_forward(kind):
  """Ragged right-padded prompts, prefill into the cache, then token-by-token decode; the
  pattern mixes a global GQA block and a sliding-window MQA block (window 3 < prompt)."""
  model = LM[kind]
  tokens = _tokens(3, 10)
  variables = _init(model, tokens)
  full = _apply(model)(variables, tokens).logits
  lengths = np.array([5, 2, 4])
  width = 5
  prompts = jnp.where(jnp.arange(width)[None] < lengths[:, None], tokens[:, :width], 0)
  out = _apply(model)(variables, prompts, cache=model.init_cache(3, 12))
  for r, n in enumerate(lengths):
    np.testing.assert_allclose(np.asarray(out.logits[r, :n]), np.asarray(full[r, :n]),
                               rtol=1e-5, atol=1e-5)
  cache = set_cache_length(out.cache, jnp.asarray(lengths, jnp.int32))
  assert cache_length(cache).tolist() == lengths.tolist()
  rows = jnp.arange(3)
  for i in range(5):
    idx = jnp.asarray(lengths + i)
    out = _apply(model)(variables, tokens[rows, idx][:, None], cache=cache)  # default positions
    cache = out.cache
    np.testing.assert_allclose(np.asarray(out.logits[:, 0]), np.asarray(full[rows, idx]),
                               rtol=1e-5, atol=1e-5)
  assert cache_length(cache).tolist() == (lengths + 5).tolist()


def _unrolled_layout(params, num_repeats):
  """Scanned params (stacked under "layers") -> the unrolled layout ("repeat_{r}")."""
  out = {k: v for k, v in params.items() if k != "layers"}
  for r in range(num_repeats):
    out[f"repeat_{r}"] = jax.tree.map(lambda a: a[r], params["layers"])
  return out


def test_scan_and_unrolled_agree_on_the_same_weights():
  scanned, unrolled = LM["scan"], LM["unrolled"]
  tokens = _tokens(3, 10)
  v_scan = _init(scanned, tokens)
  shapes_unrolled = jax.eval_shape(unrolled.init, jax.random.key(0), tokens)
  layers = v_scan["params"]["layers"]
  assert set(layers) == {"block_0", "block_1"}
  assert layers["block_0"]["attention"]["query_kernel"].shape == (1, EMBED, 4, 4)
  assert layers["block_1"]["attention"]["key_kernel"].shape == (1, EMBED, 1, 4)
  converted = _unrolled_layout(v_scan["params"], scanned.num_repeats)
  assert jax.tree.structure(converted) == jax.tree.structure(
      nn.unbox(shapes_unrolled)["params"])
  assert count_params(v_scan["params"]) == count_params(converted)
  a = _apply(scanned)(v_scan, tokens)
  b = _apply(unrolled)({"params": converted}, tokens)
  np.testing.assert_allclose(np.asarray(a.logits), np.asarray(b.logits), rtol=1e-5, atol=1e-5)


def test_layer_pattern_structure_and_sliding_window_receptive_field():
  shapes = jax.eval_shape(LM["scan"].init, jax.random.key(0), _tokens(1, 4))
  layers = nn.unbox(shapes)["params"]["layers"]
  assert "bias" not in layers["block_0"]["attention_norm"]  # rmsnorm block
  assert "bias" in layers["block_1"]["attention_norm"]  # layernorm block
  assert layers["block_1"]["attention"]["value_kernel"].shape[2] == 1  # MQA
  # Two window-3 layers: position p sees tokens p-4..p only.
  model = LM["window"]
  tokens = _tokens(1, 8, seed=2)
  variables = _init(model, tokens)
  out = _apply(model)(variables, tokens).logits
  changed = _apply(model)(variables, tokens.at[0, 0].set((tokens[0, 0] + 1) % VOCAB)).logits
  diff = np.abs(np.asarray(out - changed))[0].max(-1)
  assert np.all(diff[:5] > 1e-6), diff
  np.testing.assert_array_equal(diff[5:], 0)


@pytest.mark.parametrize("kind", ["scan", "tied"])
def test_hidden_states_and_lm_head(kind):
  model = LM[kind]
  tokens = _tokens(3, 10)
  variables = _init(model, tokens)
  out = _apply(model)(variables, tokens)
  assert out.hidden.shape == (3, 10, EMBED) and out.logits.shape == (3, 10, VOCAB)
  assert out.logits.dtype == jnp.float32 and out.cache is None
  params = variables["params"]
  tied = kind == "tied"
  assert ("lm_head" in params) != tied
  head = params["embed"]["embedding"].T if tied else params["lm_head"]["kernel"]
  np.testing.assert_allclose(np.asarray(out.logits), np.asarray(out.hidden @ head),
                             rtol=1e-5, atol=1e-5)


def test_packed_documents_equal_separate_runs():
  model = LM["global"]
  doc_a, doc_b = _tokens(1, 4, seed=4), _tokens(1, 4, seed=5)
  packed = jnp.concatenate([doc_a, doc_b], 1)
  seg = jnp.asarray([[1] * 4 + [2] * 4], jnp.int32)
  pos = jnp.asarray([list(range(4)) * 2], jnp.int32)
  variables = _init(model, packed)
  out = _apply(model)(variables, packed, pos, seg).logits
  alone = _apply(model)(variables, jnp.concatenate([doc_a, doc_b], 0)).logits
  np.testing.assert_allclose(np.asarray(out[0, :4]), np.asarray(alone[0]), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(out[0, 4:]), np.asarray(alone[1]), rtol=1e-5, atol=1e-5)


def _loss_and_grads(model, params, tokens):
  def loss_fn(params):
    logits = model.apply({"params": params}, tokens[:, :-1]).logits
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
  return jax.jit(jax.value_and_grad(loss_fn))(params)


@pytest.mark.slow
def test_remat_policies_give_the_same_loss_and_grads():
  tokens = _tokens(2, 9, seed=6)
  base = make_lm(pattern="global", num_layers=2)
  params = _init(base, tokens)["params"]
  loss0, grads0 = _loss_and_grads(base, params, tokens)
  for policy, scan in (("full", True), ("dots", True), ("dots_no_batch", True), ("full", False)):
    model = make_lm(pattern="global", num_layers=2, remat_policy=policy, scan_layers=scan)
    p = params if scan else _unrolled_layout(params, 2)
    loss, grads = _loss_and_grads(model, p, tokens)
    np.testing.assert_allclose(float(loss), float(loss0), rtol=1e-6)
    if not scan:  # restack to compare with the scanned reference
      grads = {**{k: g for k, g in grads.items() if not k.startswith("repeat_")},
               "layers": jax.tree.map(lambda *a: jnp.stack(a),
                                      *[grads[f"repeat_{r}"] for r in range(2)])}
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b),
                                                         rtol=1e-5, atol=1e-6), grads, grads0)


def test_bf16_compute_with_f32_params():
  tokens = _tokens(2, 8, seed=7)
  model32 = LM["global"]
  model16 = make_lm(pattern="global", num_layers=2, dtype=jnp.bfloat16, param_dtype=jnp.float32)
  shapes = jax.eval_shape(model16.init, jax.random.key(0), tokens)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nn.unbox(shapes)))
  variables = _init(model16, tokens)
  out16 = _apply(model16)(variables, tokens)
  out32 = _apply(model32)(variables, tokens)
  assert out16.logits.dtype == jnp.float32 and out16.hidden.dtype == jnp.bfloat16
  scale = float(np.abs(np.asarray(out32.logits)).max())
  np.testing.assert_allclose(np.asarray(out16.logits), np.asarray(out32.logits),
                             atol=0.05 * scale)
  # A training update keeps the parameters in float32.
  loss, grads = _loss_and_grads(model16, variables["params"], tokens)
  assert np.isfinite(float(loss))
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))
  new = optax.apply_updates(variables["params"], jax.tree.map(lambda g: -1e-2 * g, grads))
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(new))
  # The bf16 model decodes through its (bf16) cache as well.
  cache = model16.init_cache(2, 8)
  assert jax.tree.leaves(cache)[0].dtype == jnp.bfloat16
  dec = _apply(model16)(variables, tokens, cache=cache)
  np.testing.assert_allclose(np.asarray(dec.logits), np.asarray(out16.logits), atol=0.05 * scale)


def test_params_carry_logical_axis_names():
  variables = jax.eval_shape(LM["scan"].init, jax.random.key(0), _tokens(1, 4))
  specs = nn.get_partition_spec(variables)["params"]
  P = jax.sharding.PartitionSpec
  assert specs["layers"]["block_0"]["attention"]["query_kernel"] == P(
      "layers", "embed", "heads", "head_dim")
  assert specs["layers"]["block_1"]["attention"]["key_kernel"] == P(
      "layers", "embed", "kv_heads", "head_dim")
  assert specs["layers"]["block_0"]["ffn"]["wi"] == P("layers", "embed", None, "mlp")
  assert specs["embed"]["embedding"] == P("vocab", "embed")
  assert specs["lm_head"]["kernel"] == P("embed", "vocab")


@pytest.mark.parametrize("kwargs,field", [
    (dict(num_layers=3), "model.num_layers"),
    (dict(remat_policy="some"), "model.remat_policy"),
    (dict(vocab_size=0), "model.vocab_size"),
    (dict(embed_dim=18), "attention.num_heads"),
])
def test_config_errors(kwargs, field):
  base = dict(vocab_size=VOCAB, embed_dim=EMBED, num_layers=4)
  base.update(kwargs)
  ffn = functools.partial(GatedMLP, hidden_dim=8)
  attn = functools.partial(MultiHeadAttention, num_heads=4)
  with pytest.raises(ValueError, match=field) as err:
    DecoderLM(layer_pattern=[block(attn, ffn), block(attn, ffn)], **base)
  assert "\n" not in str(err.value)
