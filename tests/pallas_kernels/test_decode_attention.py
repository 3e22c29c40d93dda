"""Tests for effx/pallas_kernels/decode_attention (kernels vs the pure-jnp reference).

The TPU kernel runs in TPU interpret mode and the Mosaic GPU kernel in GPU interpret mode, both
with the race detector on and uninitialised memory poisoned with NaN. Tolerances (absolute, relative to max |reference|, inputs ~N(0, 1)):
float32 1e-5 (outputs) and 1e-5 (log-sum-exp); bfloat16 2e-2 (P is cast to bf16 before the PV
matmul, as in every flash kernel; the output is rounded to bf16).
"""

from __future__ import annotations

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax.experimental.pallas import tpu as pltpu

from effx.pallas_kernels import decode_attention as da
from effx.pallas_kernels.decode_attention import gpu as da_gpu
from effx.pallas_kernels.decode_attention import reference as da_ref
from effx.pallas_kernels.decode_attention import tpu as da_tpu
from effx.pallas_kernels.decode_attention.config import BlockSizes
from _helpers import GPU_INTERPRET, SETTINGS, TPU_INTERPRET

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def _inputs(seed, b, t, h, hkv, d, kv_len, dtype):
  ks = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(ks[0], (b, t, h, d), jnp.float32).astype(dtype)
  k = jax.random.normal(ks[1], (b, kv_len, hkv, d), jnp.float32).astype(dtype)
  v = jax.random.normal(ks[2], (b, kv_len, hkv, d), jnp.float32).astype(dtype)
  return q, k, v


def _tree_mask(seed, b, t):
  """Random draft trees: node i's parent is a random earlier node; i sees its ancestors."""
  rng = np.random.default_rng(seed)
  mask = np.zeros((b, t, t), bool)
  for bb in range(b):
    parent = [-1] + [int(rng.integers(0, i)) for i in range(1, t)]
    for i in range(t):
      j = i
      while j >= 0:
        mask[bb, i, j] = True
        j = parent[j]
  return jnp.asarray(mask)


def _check_close(name, got, want, atol):
  got = np.asarray(jnp.asarray(got, jnp.float32))
  want = np.asarray(jnp.asarray(want, jnp.float32))
  assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
  finite = np.isfinite(want)
  np.testing.assert_array_equal(np.isfinite(got), finite, err_msg=name)
  err = np.abs(got[finite] - want[finite]).max() if finite.any() else 0.0
  assert err <= atol * max(1.0, np.abs(want[finite]).max()), f"{name}: max err {err} > {atol}"


def _compare_tpu(q, k, v, lengths, ntm, *, block_sizes, cap=None):
  with pltpu.force_tpu_interpret_mode(TPU_INTERPRET):
    o, lse = da_tpu.decode_attention_tpu(q, k, v, lengths, ntm, block_sizes=block_sizes,
                                         logit_soft_cap=cap, return_lse=True)
  ro, rlse = da_ref.decode_attention_reference(q, k, v, lengths, ntm, logit_soft_cap=cap,
                                               return_lse=True)
  assert o.dtype == q.dtype
  _check_close("o", o, ro, TOL[jnp.dtype(q.dtype).type])
  _check_close("lse", lse, rlse, 1e-5 if q.dtype == jnp.float32 else 1e-3)
  return o


# ------------------------------------------------------------------------------------------------
# Reference and helpers (jnp, fast)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("t", [1, 7])
def test_reference_is_cache_attention_mask_semantics(t):
  """visible_mask == mha.cache_attention_mask without a static mask, and the reference equals
  the attention module's dense path with that mask (random lengths and trees, one jit per T)."""
  from effx.attention.dot_product import dot_product_attention
  from effx.attention.mha import cache_attention_mask
  b, kv_len = 6, 23
  rng = np.random.default_rng(t)
  lengths = jnp.asarray(rng.integers(0, kv_len - t + 1, size=b), jnp.int32).at[0].set(0)
  ntm = _tree_mask(t, b, t)
  q, k, v = _inputs(t, b, t, 4, 2, 8, kv_len, jnp.float32)

  @jax.jit
  def both(lengths, ntm, q, k, v):
    want = cache_attention_mask(lengths, kv_len, ntm, None, lengths[:, None] + jnp.arange(t))
    return (da_ref.visible_mask(lengths, ntm, kv_len), want[:, 0],
            da_ref.decode_attention_reference(q, k, v, lengths, ntm),
            dot_product_attention(q, k, v, want))

  got_mask, want_mask, got, want = both(lengths, ntm, q, k, v)
  np.testing.assert_array_equal(np.asarray(got_mask), np.asarray(want_mask))
  _check_close("ref", got, want, 1e-5)


def test_new_token_bits_round_trip():
  mask = jax.random.bernoulli(jax.random.key(0), 0.5, (2, 64, 64))
  words = np.asarray(da_ref.new_token_bits(mask)).view(np.uint32)       # [b, T, 2]
  bits = (words[..., :, None] >> np.arange(32, dtype=np.uint32)) & 1
  np.testing.assert_array_equal(bits.reshape(2, 64, 64).astype(bool), np.asarray(mask))
  with pytest.raises(ValueError, match="at most 64"):
    da_ref.new_token_bits(jnp.ones((1, 65, 65), bool))


@pytest.mark.parametrize("kv_len,t,bk,splits", [(100, 1, 16, 3), (64, 7, 8, 4), (50, 4, 16, 1)])
def test_kv_schedule_fetches_each_visible_block_once(kv_len, t, bk, splits):
  """The K/V index map (scalar-prefetched length): steps and splits past a row's length repeat
  the previous block index, so the blocks fetched are exactly 0..last visible, each once."""
  st_, n_splits = da_tpu.plan(t, kv_len, BlockSizes(bk, splits), parallel_units=1, head_dim=8)
  assert n_splits * st_.steps >= st_.num_blocks and (n_splits - 1) * st_.steps < st_.num_blocks
  for length in sorted({0, 1, bk - 1, bk, kv_len // 2 + 3, kv_len - t}):
    seq = [int(da_tpu.kv_block_index(s, tt, length, st_))
           for s in range(n_splits) for tt in range(st_.steps)]
    fetched = [seq[0]] + [j for i, j in enumerate(seq[1:]) if j != seq[i]]
    last = (length + t - 1) // bk
    assert fetched == list(range(last + 1)), (length, fetched)


def test_block_sizes_validation_and_defaults():
  with pytest.raises(ValueError, match="block_k"):
    BlockSizes(block_k=12)
  with pytest.raises(ValueError, match="num_splits"):
    BlockSizes(num_splits=0)
  assert BlockSizes.for_device("TPU v5 lite", 128).block_k % 128 == 0
  assert BlockSizes.for_device("NVIDIA H100 80GB HBM3", 128).block_k % 64 == 0
  assert BlockSizes.for_device("cpu", 64) == BlockSizes()


# ------------------------------------------------------------------------------------------------
# TPU kernel (interpret mode, race detection, NaN-poisoned memory)
# ------------------------------------------------------------------------------------------------

_HEADS = st.sampled_from([(4, 2), (2, 2), (4, 1)])     # GQA, MHA, MQA


@hypothesis.settings(max_examples=1, **SETTINGS)
@hypothesis.example(b=2, t=4, heads=(4, 2), d=128, kv_len=70, blocks=(16, 3), tree=True,
                    cap=None, seed=1)
@hypothesis.example(b=2, t=7, heads=(4, 1), d=32, kv_len=45, blocks=(8, 4), tree=True,
                    cap=5.0, seed=2)
@hypothesis.given(b=st.integers(1, 2), t=st.sampled_from([1, 4, 7]), heads=_HEADS,
                  d=st.sampled_from([32, 128]), kv_len=st.integers(20, 70),
                  blocks=st.sampled_from([(8, 4), (16, None), (16, 1), (8, 3)]),
                  tree=st.booleans(), cap=st.sampled_from([None, 5.0]),
                  seed=st.integers(0, 2**16))
def test_tpu_kernel_f32(b, t, heads, d, kv_len, blocks, tree, cap, seed):
  """Lengths not multiples of block_k (nor kv_len), several splits, trees, GQA/MQA; head_dim
  128 reads the cache in place, 32 through the transposed copy."""
  h, hkv = heads
  rng = np.random.default_rng(seed)
  lengths = jnp.asarray(rng.integers(0, kv_len - t + 1, size=b), jnp.int32)
  q, k, v = _inputs(seed, b, t, h, hkv, d, kv_len, jnp.float32)
  ntm = _tree_mask(seed, b, t) if tree else None
  _compare_tpu(q, k, v, lengths, ntm, block_sizes=BlockSizes(*blocks), cap=cap)


@hypothesis.settings(max_examples=1, **SETTINGS)
@hypothesis.given(t=st.sampled_from([7, 1, 4]), kv_len=st.integers(30, 60),
                  seed=st.integers(0, 2**16))
def test_tpu_kernel_bf16(t, kv_len, seed):
  q, k, v = _inputs(seed, 2, t, 8, 2, 64, kv_len, jnp.bfloat16)
  lengths = jnp.asarray([kv_len - t, 3], jnp.int32)
  _compare_tpu(q, k, v, lengths, _tree_mask(seed, 2, t), block_sizes=BlockSizes(16, 2))


def test_tpu_kernel_stale_slots_and_empty_rows():
  """NaN in every slot past the new tokens (stale entries, unvisited splits) does not leak;
  a query that sees nothing (length 0, a row of the new-token mask all False) outputs 0."""
  b, t, kv_len = 2, 4, 45
  q, k, v = _inputs(1, b, t, 4, 2, 32, kv_len, jnp.float32)
  lengths = jnp.asarray([0, 21], jnp.int32)
  ntm = _tree_mask(1, b, t).at[0, 2].set(False)               # row 0, query 2 sees nothing
  stale = jnp.arange(kv_len)[None, :] >= (lengths + t)[:, None]
  nan = jnp.where(stale[:, :, None, None], jnp.nan, 0.0)
  with pltpu.force_tpu_interpret_mode(TPU_INTERPRET):
    o = da_tpu.decode_attention_tpu(q, k + nan, v + nan, lengths, ntm,
                                    block_sizes=BlockSizes(16, 3))
  zero = jnp.where(stale[:, :, None, None], 0.0, 1.0)
  want = da_ref.decode_attention_reference(q, k * zero, v * zero, lengths, ntm)
  _check_close("o", o, want, 1e-5)
  assert float(jnp.abs(o[0, 2]).max()) == 0.0 and float(jnp.abs(o[0, 1]).min()) > 0.0


# ------------------------------------------------------------------------------------------------
# Mosaic GPU kernel in GPU interpret mode
# ------------------------------------------------------------------------------------------------


def test_gpu_kernel_forward():
  """Two compute warpgroups and two row tiles (T=7 x 20 query heads per KV head = 140 rows),
  a tree, soft-cap, max_len not a multiple of block_k (padded), two splits of which row 0's
  second one is past its length (nothing fetched: its partial is empty)."""
  b, t, h, hkv, d, kv_len = 2, 7, 40, 2, 64, 150
  q, k, v = _inputs(11, b, t, h, hkv, d, kv_len, jnp.bfloat16)
  lengths = jnp.asarray([10, kv_len - t], jnp.int32)
  ntm = _tree_mask(11, b, t)
  with plgpu.force_gpu_interpret_mode(GPU_INTERPRET):
    o, lse = da_gpu.decode_attention_gpu(q, k, v, lengths, ntm, logit_soft_cap=5.0,
                                         block_sizes=BlockSizes(64, 2), return_lse=True)
  ro, rlse = da_ref.decode_attention_reference(q, k, v, lengths, ntm, logit_soft_cap=5.0,
                                               return_lse=True)
  _check_close("o", o, ro, 2e-2)
  _check_close("lse", lse, rlse, 1e-3)


# ------------------------------------------------------------------------------------------------
# Entry point and the attention module
# ------------------------------------------------------------------------------------------------


def test_entry_point_dispatch():
  q, k, v = _inputs(3, 2, 3, 4, 2, 32, 40, jnp.float32)
  lengths = jnp.asarray([5, 30], jnp.int32)
  want = da_ref.decode_attention_reference(q, k, v, lengths, logit_soft_cap=4.0)
  for impl in ("auto", "xla"):
    _check_close(impl, da.decode_attention(q, k, v, lengths, impl=impl, logit_soft_cap=4.0),
                 want, 1e-6)
  # impl="pallas" through this entry point: test_mha_cached_call_pallas_equals_xla.
  assert da.resolve("auto") == ("xla", False)            # this suite runs on CPU
  assert da.resolve("pallas", "gpu") == ("gpu", True)
  with pytest.raises(ValueError, match="impl"):
    da.decode_attention(q, k, v, lengths, impl="triton")
  with pytest.raises(ValueError, match="lengths.shape"):
    da.decode_attention(q, k, v, lengths[:1])
  with pytest.raises(ValueError, match="new_token_mask.shape"):
    da.decode_attention(q, k, v, lengths, jnp.ones((2, 3, 4), bool))
  with pytest.raises(ValueError, match="kv_heads"):
    da.decode_attention(q[:, :, :3], k, v, lengths)
  # More than 64 new tokens: documented XLA fallback (warning under "pallas").
  q70, k70, v70 = _inputs(4, 1, 65, 2, 1, 8, 80, jnp.float32)
  l70 = jnp.asarray([10], jnp.int32)
  assert "at most 64" in da.fallback_reason(q70, k70, impl="pallas")
  with pytest.warns(UserWarning, match="does not apply"):
    got = da.decode_attention(q70, k70, v70, l70, impl="pallas")
  _check_close("fallback", got, da_ref.decode_attention_reference(q70, k70, v70, l70), 1e-6)
  # f32 is not a Mosaic GPU dtype: XLA fallback, with a warning under "pallas".
  assert "dtype" in da.fallback_reason(q, k, impl="pallas", backend="gpu")
  with pytest.warns(UserWarning, match="does not apply"):
    got = da.decode_attention(q, k, v, lengths, impl="pallas", backend="gpu",
                              logit_soft_cap=4.0)
  _check_close("gpu-fallback", got, want, 1e-6)
  with pytest.raises(ValueError, match="head_dim"):
    da_gpu.decode_attention_gpu(q.astype(jnp.bfloat16)[..., :16], k.astype(jnp.bfloat16)[..., :16],
                                v.astype(jnp.bfloat16)[..., :16], lengths)


def test_mha_cached_call_pallas_equals_xla():
  """MultiHeadAttention(impl="pallas") with a KV cache (decode-attention kernel, interpreted)
  equals impl="xla": a tree-verification call with positions = length + depth (kernel branch),
  and the same call with positions breaking that convention (the XLA branch of its lax.cond)."""
  from effx.attention.kv_cache import KVCache
  from effx.attention.mha import MultiHeadAttention
  b, t, e, max_len = 2, 4, 32, 40
  ks = jax.random.split(jax.random.key(7), 4)
  x = jax.random.normal(ks[0], (b, t, e))
  lengths = jnp.asarray([9, 23], jnp.int32)
  cache = KVCache(k=jax.random.normal(ks[1], (b, max_len, 2, 8)),
                  v=jax.random.normal(ks[2], (b, max_len, 2, 8)), length=lengths)
  ntm = _tree_mask(3, b, t)
  depth = jnp.sum(ntm, axis=-1).astype(jnp.int32) - 1
  mods = {impl: MultiHeadAttention(num_heads=4, num_kv_heads=2, impl=impl, logit_soft_cap=20.0)
          for impl in ("xla", "pallas")}
  params = mods["xla"].init(ks[3], x, lengths[:, None] + depth)

  @jax.jit
  def run(positions):
    return {impl: m.apply(params, x, positions, cache=cache, new_token_mask=ntm)
            for impl, m in mods.items()}

  for positions in (lengths[:, None] + depth, jnp.broadcast_to(jnp.arange(t), (b, t))):
    with pltpu.force_tpu_interpret_mode(TPU_INTERPRET):
      out = run(positions)
    (y_ref, c_ref), (y, c) = out["xla"], out["pallas"]
    _check_close("y", y, y_ref, 1e-5)
    np.testing.assert_array_equal(np.asarray(c.length), np.asarray(c_ref.length))
    np.testing.assert_array_equal(np.asarray(c.k), np.asarray(c_ref.k))
