"""Tests for effx/pallas_kernels/flash_attention (kernels vs the pure-jnp reference).

TPU kernels run in TPU interpret mode with the race detector on and uninitialised memory
poisoned with NaN; the Mosaic GPU forward runs in GPU interpret mode (same settings).
Tolerances: float32 values 1e-5 and gradients 5e-5 (absolute, inputs ~N(0, 1)); bfloat16
values 2e-2 and gradients 6e-2 (bf16 has 8 mantissa bits; P and dS are cast to bf16 before
their matmuls, as in every flash kernel).
"""

from __future__ import annotations

import functools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax.experimental.pallas import tpu as pltpu

from effx.pallas_kernels import flash_attention as fa
from effx.pallas_kernels.flash_attention import gpu as fa_gpu
from effx.pallas_kernels.flash_attention import layout as fa_layout
from effx.pallas_kernels.flash_attention import tpu as fa_tpu
from effx.pallas_kernels.flash_attention.config import BlockSizes
from effx.pallas_kernels.flash_attention.reference import attention_reference
from _helpers import (GPU_INTERPRET, SETTINGS, TPU_INTERPRET, attention_inputs, check_close,
                      segments)

TOL = {jnp.float32: (1e-5, 5e-5), jnp.bfloat16: (2e-2, 6e-2)}


def _random_dense_mask(seed, heads, lq, lk, bq, bk, density=0.5):
  """A block-sparse pattern (random tiles of bq x bk) with some ragged partial tiles."""
  rng = np.random.default_rng(seed)
  nq, nk = -(-lq // bq), -(-lk // bk)
  tiles = rng.random((heads, nq, nk)) < density
  dense = np.repeat(np.repeat(tiles, bq, 1), bk, 2)[:, :lq, :lk]
  # Make a few tiles partial: random elements off inside a random tile per head.
  for hh in range(heads):   # below the diagonal, so that causal masks keep it
    i = rng.integers(nq)
    j = rng.integers(min(i * bq // bk, nk - 1) + 1)
    r = slice(i * bq, (i + 1) * bq)
    c = slice(j * bk, (j + 1) * bk)
    dense[hh, r, c] = rng.random(dense[hh, r, c].shape) < 0.6
  return dense


def _compare_tpu(q, k, v, do, *, block_sizes, grads=True, **kw):
  ref = functools.partial(attention_reference, **kw)
  ker = functools.partial(fa_tpu.flash_attention_tpu, block_sizes=block_sizes, **kw)
  atol, gtol = TOL[jnp.dtype(q.dtype).type]
  with pltpu.force_tpu_interpret_mode(TPU_INTERPRET):
    if grads:
      o, vjp = jax.vjp(ker, q, k, v)
      dq, dk, dv = vjp(do)
    else:
      o = ker(q, k, v)
  ro, rvjp = jax.vjp(ref, q, k, v)
  check_close("o", o, ro, atol)
  assert o.dtype == q.dtype and o.shape == q.shape
  if grads:
    for name, g, r in zip(("dq", "dk", "dv"), (dq, dk, dv), rvjp(do)):
      assert g.shape == r.shape and g.dtype == r.dtype, name
      check_close(name, g, r, gtol)
  return o


# ------------------------------------------------------------------------------------------------
# Layout (numpy, fast)
# ------------------------------------------------------------------------------------------------


@hypothesis.settings(max_examples=25, **SETTINGS)
@hypothesis.given(lq=st.integers(1, 40), lk=st.integers(1, 40), bq=st.sampled_from([4, 8, 16]),
                  bk=st.sampled_from([4, 8, 16]), causal=st.booleans(),
                  window=st.one_of(st.none(), st.integers(1, 30)))
def test_analytic_layout_matches_dense(lq, lk, bq, bk, causal, window):
  qi, kj = np.arange(lq)[:, None], np.arange(lk)[None, :]
  dense = np.ones((lq, lk), bool)
  if causal:
    dense &= kj <= qi
  if window is not None:
    dense &= qi - kj < window
  got = fa_layout.analytic_layout(lq, lk, bq, bk, causal=causal, window=window)
  want = fa_layout.dense_layout(dense[None], bq, bk)[0]
  # Tiles straddling the key padding are partial in the analytic layout even when full.
  straddle = np.zeros_like(want, bool)
  if lk % bk:
    straddle[:, -1] = True
  np.testing.assert_array_equal(got[~straddle], want[~straddle])
  np.testing.assert_array_equal(got[straddle] == 0, want[straddle] == 0)


def test_compact_lists_and_tiles():
  classes = np.array([[[2, 0, 1], [0, 0, 0], [1, 2, 2]]], np.int8)
  lists = fa_layout.compact(classes, None, transpose=False)
  np.testing.assert_array_equal(lists.cnt, [[2, 0, 3]])
  np.testing.assert_array_equal(lists.idx, [[[0, 2, 2], [0, 0, 0], [0, 1, 2]]])
  np.testing.assert_array_equal(lists.cls, [[[2, 1, 0], [0, 0, 0], [1, 2, 2]]])
  cols = fa_layout.compact(classes, None, transpose=True)
  np.testing.assert_array_equal(cols.cnt, [[2, 1, 2]])
  np.testing.assert_array_equal(cols.idx[0, 1], [2, 2, 2][:cols.max_steps])
  dense = np.zeros((1, 6, 6), bool)
  dense[0, :2, :2] = True          # full tile
  dense[0, 4, 5] = True            # partial tile
  dense[0, 2:4, 2:4] = np.eye(2)   # another partial tile
  lay = fa_layout.make_layout(6, 6, 2, 2, causal=False, window=None, dense_mask=dense)
  np.testing.assert_array_equal(lay.classes[0], [[2, 0, 0], [0, 1, 0], [0, 0, 1]])
  assert lay.has_dense_partial and lay.tiles.shape == (3, 2, 2)
  assert (lay.tiles[0] == 1).all()
  with pytest.raises(ValueError, match="block_mask does not match"):
    fa_layout.make_layout(6, 6, 2, 2, causal=False, window=None, dense_mask=dense,
                          block_mask=np.full((1, 3, 3), 2, np.int8))
  with pytest.raises(ValueError, match="needs the dense_mask"):
    fa_layout.make_layout(6, 6, 2, 2, causal=False, window=None,
                          block_mask=np.full((1, 3, 3), 2, np.int8))


def test_block_sizes_validation_and_defaults():
  with pytest.raises(ValueError, match="block_q"):
    BlockSizes(block_q=12)
  with pytest.raises(ValueError, match="num_stages"):
    BlockSizes(num_stages=1)
  assert BlockSizes(block_q=64, block_k_bwd=32).bwd == (64, 32)
  h100 = BlockSizes.for_device("NVIDIA H100 80GB HBM3", 128)
  assert h100.block_q == 128 and h100.block_k % 64 == 0
  assert BlockSizes.for_device("NVIDIA H200", 256).block_k == 64
  assert BlockSizes.for_device("TPU v5 lite", 128).block_k % 128 == 0
  assert BlockSizes.for_device("cpu", 64) == BlockSizes()


# ------------------------------------------------------------------------------------------------
# Reference sanity
# ------------------------------------------------------------------------------------------------


def test_reference_matches_jax_nn_and_empty_rows():
  q, k, v, _ = attention_inputs(0, 2, 9, 9, 4, 2, 16, jnp.float32)
  want = jax.nn.dot_product_attention(q, k, v, is_causal=True)
  check_close("causal", attention_reference(q, k, v, causal=True), want, 1e-5)
  # Rows whose segment has no key at or before them output exactly 0.
  seg_q = jnp.array([[1] * 9, [2] * 9], jnp.int32)
  seg_k = jnp.array([[1] * 9, [3] * 9], jnp.int32)
  o = attention_reference(q, k, v, segment_ids=(seg_q, seg_k), causal=True)
  assert float(jnp.abs(o[1]).max()) == 0.0 and float(jnp.abs(o[0]).max()) > 0.0
  g = jax.grad(lambda q: attention_reference(q, k, v, segment_ids=(seg_q, seg_k)).sum())(q)
  assert np.isfinite(np.asarray(g)).all()


# ------------------------------------------------------------------------------------------------
# TPU kernels (interpret mode, race detection, NaN-poisoned memory)
# ------------------------------------------------------------------------------------------------

_HEADS = st.sampled_from([(2, 2), (4, 2), (2, 1)])


@hypothesis.settings(max_examples=5, **SETTINGS)
@hypothesis.given(
    b=st.integers(1, 2), lq=st.integers(1, 40), lk=st.integers(1, 40), heads=_HEADS,
    causal=st.booleans(), window=st.one_of(st.none(), st.integers(1, 24)),
    seg=st.booleans(), cap=st.sampled_from([None, 4.0]),
    blocks=st.sampled_from([(8, 16, 16, 8), (16, 16, 8, 16), (16, 16, 16, 16)]),
    seed=st.integers(0, 2**16))
def test_tpu_kernel_f32(b, lq, lk, heads, causal, window, seg, cap, blocks, seed):
  h, hkv = heads
  q, k, v, do = attention_inputs(seed, b, lq, lk, h, hkv, 32, jnp.float32)
  segment_ids = (segments(seed, b, lq, 2), segments(seed + 1, b, lk, 2)) if seg else None
  bq, bk, bqb, bkb = blocks
  _compare_tpu(q, k, v, do, block_sizes=BlockSizes(bq, bk, bqb, bkb), causal=causal,
               window=window, segment_ids=segment_ids, logit_soft_cap=cap)


@hypothesis.settings(max_examples=2, **SETTINGS)
@hypothesis.given(lq=st.integers(1, 40), lk=st.integers(1, 40), heads=_HEADS,
                  causal=st.booleans(), window=st.one_of(st.none(), st.integers(1, 24)),
                  seed=st.integers(0, 2**16))
def test_tpu_kernel_bf16(lq, lk, heads, causal, window, seed):
  h, hkv = heads
  q, k, v, do = attention_inputs(seed, 1, lq, lk, h, hkv, 64, jnp.bfloat16)
  _compare_tpu(q, k, v, do, block_sizes=BlockSizes(16, 16), causal=causal, window=window)


@pytest.mark.parametrize("per_head,causal", [(True, False), (False, True)])
def test_tpu_kernel_block_sparse(per_head, causal):
  h, lq, lk = 2, 37, 45
  dense = _random_dense_mask(3 + per_head, h if per_head else 1, lq, lk, 8, 16)
  lay = fa_layout.make_layout(lq, lk, 8, 16, causal=causal, window=None, dense_mask=dense)
  assert lay.has_dense_partial and 0 < lay.density < 1
  q, k, v, do = attention_inputs(5, 1, lq, lk, h, 1, 32, jnp.float32)
  block_mask = fa_layout.dense_layout(dense, 8, 16)   # what mask.block_layout() returns
  _compare_tpu(q, k, v, do, block_sizes=BlockSizes(8, 16), causal=causal, dense_mask=dense,
               block_mask=block_mask, logit_soft_cap=6.0)


def test_tpu_kernel_empty_rows_and_blocks():
  """Rows that see no key output 0 with finite gradients; empty tiles are skipped."""
  q, k, v, do = attention_inputs(7, 2, 24, 24, 2, 2, 32, jnp.float32)
  seg_q = jnp.array([[1] * 24, [1] * 8 + [2] * 16], jnp.int32)
  seg_k = jnp.array([[1] * 24, [1] * 8 + [3] * 16], jnp.int32)
  dense = np.zeros((1, 24, 24), bool)
  dense[0, :, :8] = True    # keys 8.. are never visible: whole key tiles are empty
  o = _compare_tpu(q, k, v, do, block_sizes=BlockSizes(8, 8), causal=True, window=6,
                   segment_ids=(seg_q, seg_k), dense_mask=dense)
  assert float(jnp.abs(o[1, 8:]).max()) == 0.0      # segment 2 has no keys
  assert float(jnp.abs(o[0, 13:]).max()) == 0.0      # window 6 reaches no key < 8
  assert float(jnp.abs(o[0, :8]).min()) > 0.0
  lay = fa_layout.make_layout(24, 24, 8, 8, causal=True, window=6, dense_mask=dense)
  assert (lay.rows.cnt < 3).all() and (lay.cols.cnt[0, 1:] == 0).all()   # tiles skipped


# ------------------------------------------------------------------------------------------------
# Mosaic GPU kernel (forward) in GPU interpret mode
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", [
    dict(b=1, lq=100, lk=100, h=2, hkv=1, bq=128, bk=64, causal=True),
    dict(b=2, lq=70, lk=150, h=2, hkv=2, bq=64, bk=64, causal=False, window=40, cap=5.0,
         seg=True),
])
def test_gpu_kernel_forward(case):
  c = dict(window=None, cap=None, seg=False) | case
  q, k, v, _ = attention_inputs(11, c["b"], c["lq"], c["lk"], c["h"], c["hkv"], 64, jnp.bfloat16)
  seg = None
  if c["seg"]:
    seg = (segments(1, c["b"], c["lq"], 2), segments(2, c["b"], c["lk"], 2))
  kw = dict(causal=c["causal"], window=c["window"], logit_soft_cap=c["cap"], segment_ids=seg)
  with plgpu.force_gpu_interpret_mode(GPU_INTERPRET):
    o, lse = fa_gpu.flash_attention_gpu(q, k, v, block_sizes=BlockSizes(c["bq"], c["bk"]),
                                        return_lse=True, **kw)
  ro, rlse = attention_reference(q, k, v, return_lse=True, **kw)
  check_close("o", o, ro, 2e-2)
  finite = np.isfinite(np.asarray(rlse))
  np.testing.assert_array_equal(np.isfinite(np.asarray(lse)), finite)
  np.testing.assert_allclose(np.asarray(lse)[finite], np.asarray(rlse)[finite], atol=2e-3)


def test_gpu_kernel_block_sparse_and_grad():
  """A block-aligned sparse layout through the public entry point, plus its XLA gradient."""
  h, lq, lk = 2, 128, 192
  dense = _random_dense_mask(9, h, lq, lk, 64, 64)
  dense = np.repeat(np.repeat(dense[:, ::64, ::64], 64, 1), 64, 2)[:, :lq, :lk]  # aligned
  dense[:, :, :64] = True    # every row sees the first key tile
  q, k, v, do = attention_inputs(13, 1, lq, lk, h, 1, 64, jnp.bfloat16)
  bs = BlockSizes(64, 64)
  assert fa.fallback_reason(q, k, causal=False, dense_mask=dense, block_sizes=bs,
                            impl="pallas", backend="gpu") is None
  f = functools.partial(fa.flash_attention, causal=False, dense_mask=dense, block_sizes=bs,
                        impl="pallas", backend="gpu")
  with plgpu.force_gpu_interpret_mode(GPU_INTERPRET):
    o, vjp = jax.vjp(f, q, k, v)
    grads = vjp(do)
  ref = functools.partial(attention_reference, causal=False, dense_mask=dense)
  ro, rvjp = jax.vjp(ref, q, k, v)
  check_close("o", o, ro, 2e-2)
  for name, g, r in zip(("dq", "dk", "dv"), grads, rvjp(do)):
    check_close(name, g, r, 2e-2)   # Mosaic GPU backward kernels (bf16 P and dS)


# ------------------------------------------------------------------------------------------------
# Entry point
# ------------------------------------------------------------------------------------------------


def test_entry_point_dispatch():
  q, k, v, _ = attention_inputs(17, 1, 20, 20, 2, 1, 32, jnp.float32)
  want = attention_reference(q, k, v, causal=True, window=5)
  for impl in ("auto", "xla"):
    got = fa.flash_attention(q, k, v, window=5, impl=impl)
    check_close(impl, got, want, 1e-6)
  with pltpu.force_tpu_interpret_mode(TPU_INTERPRET):
    got = fa.flash_attention(q, k, v, window=5, impl="pallas",
                             block_sizes=BlockSizes(8, 8))
  check_close("pallas-tpu", got, want, 1e-5)
  assert fa.resolve("auto") == ("xla", False)            # this suite runs on CPU
  assert fa.resolve("pallas", "gpu") == ("gpu", True)
  with pytest.raises(ValueError, match="impl"):
    fa.flash_attention(q, k, v, impl="triton")
  with pytest.raises(ValueError, match="window"):
    fa.flash_attention(q, k, v, window=0)
  with pytest.raises(ValueError, match="kv_heads"):
    fa.flash_attention(q, k[:, :, :1].repeat(3, 2), v[:, :, :1].repeat(3, 2))
  # f32 is not a Mosaic GPU dtype: documented XLA fallback, with a warning under "pallas".
  assert "dtype" in fa.fallback_reason(q, k, impl="pallas", backend="gpu")
  with pytest.warns(UserWarning, match="does not apply"):
    got = fa.flash_attention(q, k, v, window=5, impl="pallas", backend="gpu")
  check_close("gpu-fallback", got, want, 1e-6)
