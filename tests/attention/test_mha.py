"""Tests for effx.attention.mha / dot_product / kv_cache: MultiHeadAttention against numpy
references, GQA == MHA with repeated KV heads, KV-cache decoding == full forward, draft-tree
calls == per-path chains, KVCache.commit == plain decoding, config errors."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effx.attention import masks as M
from effx.attention.dot_product import dot_product_attention
from effx.attention.kv_cache import KVCache
from effx.attention.mha import MultiHeadAttention
from effx.layers.rotary import RotaryConfig

EMBED, HEADS, HEAD_DIM = 16, 4, 4
WINDOW = M.CausalMask() & M.SlidingWindowMask(3)
MASKS = {"causal": M.CausalMask(), "window": WINDOW}


def _x(batch, t, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal((batch, t, EMBED)),
                     jnp.float32)


def _pos(batch, t, start=0):
  return jnp.broadcast_to(jnp.arange(start, start + t, dtype=jnp.int32), (batch, t))


@functools.cache
def _jit(attn):
  """`attn.apply`, jitted (one compile per shape beats op-by-op dispatch on a slow CPU)."""
  return jax.jit(attn.apply)


def _init(attn, x, seed=0):
  """Random variables of `attn`'s shapes (numpy-filled: `attn.init` compiles slowly)."""
  shapes = nn.unbox(jax.eval_shape(attn.init, jax.random.key(0), x, _pos(*x.shape[:2])))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), s.dtype), shapes)


def _numpy_attention(params, x, allowed, soft_cap=None):
  """Plain numpy MHA (no rotary): x [b, t, e], allowed bool [b, h or 1, t, t]."""
  p = {k: np.asarray(v, np.float64) for k, v in params["params"].items()}
  x = np.asarray(x, np.float64)
  q = np.einsum("bte,ehd->bthd", x, p["query_kernel"])
  k = np.einsum("bte,ehd->bthd", x, p["key_kernel"])
  v = np.einsum("bte,ehd->bthd", x, p["value_kernel"])
  groups = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  if soft_cap is not None:
    logits = soft_cap * np.tanh(logits / soft_cap)
  allowed = np.broadcast_to(allowed, logits.shape)
  logits = np.where(allowed, logits, -np.inf)
  mx = np.max(logits, -1, keepdims=True)
  w = np.where(allowed, np.exp(logits - np.where(np.isfinite(mx), mx, 0)), 0)
  probs = w / np.maximum(w.sum(-1, keepdims=True), 1e-300)
  out = np.einsum("bhqk,bkhd->bqhd", probs, v)
  return np.einsum("bqhd,hde->bqe", out, p["out_kernel"])


# --------------------------------------------------------------------------- masks vs numpy


@pytest.mark.parametrize("soft_cap", [None, 2.0])
def test_window_and_segment_masks_match_numpy(soft_cap):
  # Two packed documents per row (positions restart at each), one padding tail.
  seg = np.array([[1, 1, 1, 1, 1, 2, 2, 2, 2, 0],
                  [1, 1, 2, 2, 2, 2, 2, 2, 0, 0]], np.int32)
  pos = np.array([[0, 1, 2, 3, 4, 0, 1, 2, 3, 0],
                  [0, 1, 0, 1, 2, 3, 4, 5, 0, 0]], np.int32)
  window = 3
  attn = MultiHeadAttention(num_heads=HEADS, num_kv_heads=2, impl="xla",
                            mask=M.CausalMask() & M.SlidingWindowMask(window),
                            rotary=RotaryConfig(kind="none"), logit_soft_cap=soft_cap)
  x = _x(2, 10)
  params = _init(attn, x)
  y, cache = _jit(attn)(params, x, jnp.asarray(pos), segment_ids=jnp.asarray(seg))
  assert cache is None
  # The dense mask, built by hand from the definitions.
  b, t = seg.shape
  allowed = np.zeros((b, 1, t, t), bool)
  for r in range(b):
    for i in range(t):
      for j in range(t):
        allowed[r, 0, i, j] = (seg[r, i] != 0 and seg[r, i] == seg[r, j]
                               and 0 <= pos[r, i] - pos[r, j] < window)
  ref = _numpy_attention(params, x, allowed, soft_cap)
  np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(y)[seg == 0], 0)  # padding queries read nothing


@pytest.mark.parametrize("q_len", [5, 1])
@pytest.mark.parametrize("contraction", ["einsum", "broadcast", "auto"])
def test_dot_product_attention_matches_numpy_with_groups(contraction, q_len):
  rng = np.random.default_rng(1)
  q = rng.standard_normal((2, q_len, 6, 4)).astype(np.float32)
  k = rng.standard_normal((2, 7, 2, 4)).astype(np.float32)
  v = rng.standard_normal((2, 7, 2, 4)).astype(np.float32)
  allowed = rng.random((2, 6, q_len, 7)) < 0.6
  allowed[:, :, 0, :] = False  # an empty row -> zeros
  out = dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                              jnp.asarray(allowed), sm_scale=0.3, contraction=contraction)
  kk, vv = np.repeat(k, 3, 2), np.repeat(v, 3, 2)
  logits = np.einsum("bqhd,bkhd->bhqk", q, kk) * 0.3
  logits = np.where(allowed, logits, -np.inf)
  probs = np.exp(logits - logits.max(-1, keepdims=True, initial=-1e30))
  probs = probs / np.maximum(probs.sum(-1, keepdims=True), 1e-30)
  ref = np.einsum("bhqk,bkhd->bqhd", probs, vv)
  np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(out)[:, 0], 0)


def test_contractions_agree_in_value_and_gradient_bf16():
  """The broadcast form equals the einsum form (bf16 inputs, f32 accumulation in both) and has
  the same gradients, with a soft cap and GQA."""
  rng = np.random.default_rng(2)
  q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.bfloat16)
             for s in ((2, 3, 4, 8), (2, 9, 2, 8), (2, 9, 2, 8)))
  allowed = jnp.asarray(rng.random((2, 1, 3, 9)) < 0.7)

  def loss(contraction, q, k, v):
    out = dot_product_attention(q, k, v, allowed, logit_soft_cap=5.0, contraction=contraction)
    return jnp.sum(out.astype(jnp.float32) ** 2), out

  (_, ref), ref_grads = jax.value_and_grad(functools.partial(loss, "einsum"), (0, 1, 2),
                                           has_aux=True)(q, k, v)
  (_, out), grads = jax.value_and_grad(functools.partial(loss, "broadcast"), (0, 1, 2),
                                       has_aux=True)(q, k, v)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32),
                             rtol=2e-2, atol=2e-2)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r, np.float32),
                               rtol=3e-2, atol=3e-2)


def test_dot_product_attention_rejects_unknown_contraction():
  x = jnp.zeros((1, 2, 2, 4))
  with pytest.raises(ValueError, match="contraction: got 'fast'; allowed"):
    dot_product_attention(x, x, x, None, contraction="fast")


# ------------------------------------------------------------------------------ GQA == MHA


@pytest.mark.parametrize("kv_heads", [2, 1], ids=["gqa", "mqa"])
def test_grouped_kv_equals_mha_with_repeated_kv_heads(kv_heads):
  x = _x(2, 7)
  pos = _pos(2, 7)
  grouped = MultiHeadAttention(num_heads=HEADS, num_kv_heads=kv_heads, mask=WINDOW)
  full = MultiHeadAttention(num_heads=HEADS, mask=WINDOW)
  params = _init(grouped, x)
  p = dict(params["params"])
  groups = HEADS // kv_heads
  assert p["key_kernel"].shape == (EMBED, kv_heads, HEAD_DIM)
  # Query head h reads KV head h // groups: repeat each KV head `groups` times in place.
  mha_params = {"params": {**p, "key_kernel": jnp.repeat(p["key_kernel"], groups, axis=1),
                           "value_kernel": jnp.repeat(p["value_kernel"], groups, axis=1)}}
  y_grouped, _ = _jit(grouped)(params, x, pos)
  y_full, _ = _jit(full)(mha_params, x, pos)
  np.testing.assert_allclose(np.asarray(y_grouped), np.asarray(y_full), rtol=1e-5, atol=1e-6)
  # ... and the same holds for a KV-cache decode step.
  cache_g = grouped.init_cache(2, 8, EMBED)
  cache_f = full.init_cache(2, 8, EMBED)
  assert cache_g.k.shape == (2, 8, kv_heads, HEAD_DIM) and cache_f.k.shape == (2, 8, HEADS, 4)
  yg, _ = _jit(grouped)(params, x, pos, cache=cache_g)
  yf, _ = _jit(full)(mha_params, x, pos, cache=cache_f)
  np.testing.assert_allclose(np.asarray(yg), np.asarray(yf), rtol=1e-5, atol=1e-6)


# -------------------------------------------------------------------------- KV-cache decode


@pytest.mark.parametrize("mask", list(MASKS.values()), ids=list(MASKS))
def test_cache_decode_equals_full_forward_with_ragged_prompts(mask):
  t, width, max_len = 10, 6, 12
  lengths = np.array([6, 2, 4])  # right-padded prompts of different lengths (width 6)
  attn = MultiHeadAttention(num_heads=HEADS, num_kv_heads=2, mask=mask)
  x = _x(3, t, seed=3)
  params = _init(attn, x)
  full, _ = _jit(attn)(params, x, _pos(3, t))
  # Prefill the padded prompts (the padding is junk that must never be read) ...
  junk = jnp.where(jnp.arange(width)[None, :, None] < lengths[:, None, None], x[:, :width], 7.0)
  y, cache = _jit(attn)(params, junk, _pos(3, width), cache=attn.init_cache(3, max_len, EMBED))
  assert cache.length.tolist() == [width] * 3
  for r, n in enumerate(lengths):
    np.testing.assert_allclose(np.asarray(y[r, :n]), np.asarray(full[r, :n]), rtol=1e-5,
                               atol=1e-5)
  # ... set each row's length to its prompt, then decode one token at a time.
  cache = cache.replace(length=jnp.asarray(lengths, jnp.int32))
  for i in range(4):
    idx = jnp.asarray(lengths + i)
    tok = x[jnp.arange(3), idx][:, None]
    y, cache = _jit(attn)(params, tok, idx[:, None].astype(jnp.int32), cache=cache)
    np.testing.assert_allclose(np.asarray(y[:, 0]), np.asarray(full[jnp.arange(3), idx]),
                               rtol=1e-5, atol=1e-5)
  assert cache.length.tolist() == (lengths + 4).tolist()


def test_chunked_prefill_into_cache_equals_full_forward():
  attn = MultiHeadAttention(num_heads=HEADS, mask=WINDOW)
  x = _x(2, 9, seed=4)
  params = _init(attn, x)
  full, _ = _jit(attn)(params, x, _pos(2, 9))
  cache = attn.init_cache(2, 9, EMBED)
  outs = []
  for lo, hi in ((0, 4), (4, 9)):
    y, cache = _jit(attn)(params, x[:, lo:hi], _pos(2, hi - lo, lo), cache=cache)
    outs.append(y)
  np.testing.assert_allclose(np.asarray(jnp.concatenate(outs, 1)), np.asarray(full),
                             rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------ draft-tree calls

# Node: 0 (root), 1, 2 children of 0, 3, 4 children of 1, 5 child of 2.
PARENTS = [-1, 0, 0, 1, 1, 2]
DEPTH = np.array([0, 1, 1, 2, 2, 2])
PATHS = [[0, 1, 3], [0, 1, 4], [0, 2, 5]]


def _tree_mask():
  n = len(PARENTS)
  m = np.zeros((n, n), bool)
  for i in range(n):
    j = i
    while j >= 0:
      m[i, j] = True
      j = PARENTS[j]
  return m


def _prefilled(attn, params, prefix, lengths, max_len):
  """A cache holding `prefix` rows up to per-row `lengths`."""
  b, t = prefix.shape[:2]
  _, cache = _jit(attn)(params, prefix, _pos(b, t), cache=attn.init_cache(b, max_len, EMBED))
  return cache.replace(length=jnp.asarray(lengths, jnp.int32))


@pytest.mark.parametrize("mask", list(MASKS.values()), ids=list(MASKS))
def test_tree_call_equals_each_path_run_separately(mask):
  attn = MultiHeadAttention(num_heads=HEADS, num_kv_heads=2, mask=mask)
  prefix = _x(2, 5, seed=5)
  tree_x = _x(2, len(PARENTS), seed=6)
  params = _init(attn, prefix)
  lengths = np.array([5, 3])
  cache = _prefilled(attn, params, prefix, lengths, max_len=16)
  tree_mask = jnp.broadcast_to(jnp.asarray(_tree_mask()), (2, len(PARENTS), len(PARENTS)))
  tree_pos = jnp.asarray(lengths[:, None] + DEPTH[None], jnp.int32)
  y_tree, after = _jit(attn)(params, tree_x, tree_pos, cache=cache, new_token_mask=tree_mask)
  assert after.length.tolist() == (lengths + len(PARENTS)).tolist()
  for path in PATHS:
    chain = tree_x[:, jnp.asarray(path)]
    y_path, _ = _jit(attn)(params, chain, _pos(2, len(path))
                           + jnp.asarray(lengths[:, None], jnp.int32), cache=cache)
    np.testing.assert_allclose(np.asarray(y_tree[:, jnp.asarray(path)]), np.asarray(y_path),
                               rtol=1e-5, atol=1e-5)


def test_commit_equals_plain_decoding_of_accepted_tokens():
  attn = MultiHeadAttention(num_heads=HEADS, num_kv_heads=2)
  prefix = _x(2, 5, seed=7)
  tree_x = _x(2, len(PARENTS), seed=8)
  params = _init(attn, prefix)
  lengths = np.array([4, 2])
  cache = _prefilled(attn, params, prefix, lengths, max_len=16)
  tree_mask = jnp.broadcast_to(jnp.asarray(_tree_mask()), (2, len(PARENTS), len(PARENTS)))
  tree_pos = jnp.asarray(lengths[:, None] + DEPTH[None], jnp.int32)
  _, verified = _jit(attn)(params, tree_x, tree_pos, cache=cache, new_token_mask=tree_mask)
  # Row 0 accepts the path 0 -> 1 -> 4; row 1 accepts 0 -> 2 only (the rest is padding).
  accepted = jnp.asarray([[0, 1, 4], [0, 2, 5]], jnp.int32)
  num = jnp.asarray([3, 2], jnp.int32)
  start = jnp.asarray(lengths, jnp.int32)
  committed = verified.commit(start, accepted, num)
  assert committed.length.tolist() == [7, 4]
  for r in range(2):
    n = int(num[r])
    toks = tree_x[r:r + 1, accepted[r, :n]]
    row_cache = jax.tree.map(lambda a: a[r:r + 1], cache)
    _, plain = _jit(attn)(params, toks, _pos(1, n, int(lengths[r])), cache=row_cache)
    valid = int(lengths[r]) + n
    assert int(plain.length[0]) == valid
    np.testing.assert_allclose(np.asarray(committed.k[r, :valid]), np.asarray(plain.k[0, :valid]),
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(committed.v[r, :valid]), np.asarray(plain.v[0, :valid]),
                               rtol=1e-6, atol=1e-6)
  # Decoding on from the committed cache == decoding on from the plainly built one.
  nxt = _x(2, 1, seed=9)
  y_c, _ = _jit(attn)(params, nxt, committed.length[:, None], cache=committed)
  for r in range(2):
    n = int(num[r])
    row_cache = jax.tree.map(lambda a: a[r:r + 1], cache)
    _, plain = _jit(attn)(params, tree_x[r:r + 1, accepted[r, :n]],
                          _pos(1, n, int(lengths[r])), cache=row_cache)
    y_p, _ = _jit(attn)(params, nxt[r:r + 1], plain.length[:, None], cache=plain)
    np.testing.assert_allclose(np.asarray(y_c[r]), np.asarray(y_p[0]), rtol=1e-5, atol=1e-5)


def test_kv_cache_append_per_row_offsets():
  cache = KVCache.create(2, 6, 1, 2)
  cache = cache.replace(length=jnp.array([1, 3], jnp.int32))
  new = jnp.arange(2 * 2 * 1 * 2, dtype=jnp.float32).reshape(2, 2, 1, 2) + 1
  out = cache.append(new, -new)
  assert out.length.tolist() == [3, 5]
  np.testing.assert_array_equal(np.asarray(out.k[0, 1:3]), np.asarray(new[0]))
  np.testing.assert_array_equal(np.asarray(out.k[1, 3:5]), np.asarray(new[1]))
  np.testing.assert_array_equal(np.asarray(out.v[1, 3:5]), -np.asarray(new[1]))
  assert float(jnp.abs(out.k[0, 3:]).sum()) == 0 and float(jnp.abs(out.k[1, :3]).sum()) == 0


# ---------------------------------------------------------------------------- config errors


def _one_line_error(fn, *needles):
  with pytest.raises(ValueError) as err:
    fn()
  msg = str(err.value)
  assert "\n" not in msg, msg
  for needle in needles:
    assert needle in msg, msg
  return msg


def test_config_errors_are_one_line_naming_the_field():
  _one_line_error(lambda: MultiHeadAttention(num_heads=4, num_kv_heads=3),
                  "attention.num_kv_heads", "3", "num_heads=4")
  _one_line_error(lambda: MultiHeadAttention(num_heads=0), "attention.num_heads", "0")
  _one_line_error(lambda: MultiHeadAttention(num_heads=2, impl="flash"), "attention.impl",
                  "'flash'")
  _one_line_error(lambda: MultiHeadAttention(num_heads=2, head_dim=0), "attention.head_dim")
  _one_line_error(lambda: MultiHeadAttention(num_heads=2, cache_contraction="gemv"),
                  "attention.cache_contraction", "'gemv'", "einsum")
  attn = MultiHeadAttention(num_heads=3)
  _one_line_error(lambda: attn.init(jax.random.key(0), _x(1, 2), _pos(1, 2)),
                  "attention.num_heads", "3", "16")
  _one_line_error(lambda: attn.init_cache(1, 4, EMBED), "attention.num_heads")
  # An explicit head_dim lifts the divisibility requirement.
  explicit = MultiHeadAttention(num_heads=3, head_dim=4)
  y, _ = _jit(explicit)(_init(explicit, _x(1, 2)), _x(1, 2), _pos(1, 2))
  assert y.shape == (1, 2, EMBED)
  bad_pos = lambda: MultiHeadAttention(num_heads=2).init(jax.random.key(0), _x(1, 3), _pos(1, 2))
  _one_line_error(bad_pos, "positions")


# ------------------------------------------------------------------------------------ cudnn


@pytest.mark.parametrize("mask", list(MASKS.values()), ids=list(MASKS))
def test_cudnn_impl_equals_xla(mask):
  # On CPU jax.nn.dot_product_attention(implementation=None) runs its XLA path; on GPUs with
  # cuDNN it runs the fused kernel (f32 falls back to XLA there too).
  x = _x(2, 7, seed=10)
  pos = _pos(2, 7)
  xla = MultiHeadAttention(num_heads=HEADS, num_kv_heads=2, mask=mask, impl="xla")
  cudnn = MultiHeadAttention(num_heads=HEADS, num_kv_heads=2, mask=mask, impl="cudnn")
  params = _init(xla, x)
  y_xla, _ = _jit(xla)(params, x, pos)
  y_cudnn, _ = _jit(cudnn)(params, x, pos)
  np.testing.assert_allclose(np.asarray(y_cudnn), np.asarray(y_xla), rtol=1e-5, atol=1e-5)
  # With segment ids the cudnn impl uses the masked XLA path: still equal.
  seg = jnp.asarray([[1, 1, 1, 2, 2, 2, 0]] * 2, jnp.int32)
  y_xla, _ = _jit(xla)(params, x, pos, segment_ids=seg)
  y_cudnn, _ = _jit(cudnn)(params, x, pos, segment_ids=seg)
  np.testing.assert_allclose(np.asarray(y_cudnn), np.asarray(y_xla), rtol=1e-5, atol=1e-5)


def test_cudnn_impl_rejects_other_masks_clearly():
  attn = MultiHeadAttention(num_heads=2, mask=M.CausalMask() & M.GlobalTokensMask(2),
                            impl="cudnn")
  _one_line_error(lambda: attn.init(jax.random.key(0), _x(1, 4), _pos(1, 4)),
                  "attention.impl", "'cudnn'")
