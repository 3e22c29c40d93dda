"""Tests for the Mosaic GPU flash-attention backward (flash_attention/gpu_backward.py).

The kernels run in GPU interpret mode on CPU with the race detector on and uninitialised
memory poisoned with NaN; dq, dk, dv are compared with ``jax.grad`` of the XLA reference.
Tolerance: absolute, relative to ``max(1, max |reference|)``: bfloat16 2e-2, float16 1e-2
(inputs ~N(0, 1); P and dS are cast to the input dtype before their WGMMAs, as in every flash
kernel; observed errors are ~5x smaller).
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

from effx.pallas_kernels import flash_attention as fa
from effx.pallas_kernels.flash_attention import gpu as fa_gpu
from effx.pallas_kernels.flash_attention import gpu_backward as fa_bwd
from effx.pallas_kernels.flash_attention import layout as fa_layout
from effx.pallas_kernels.flash_attention.config import BlockSizes
from effx.pallas_kernels.flash_attention.reference import attention_reference
from _helpers import GPU_INTERPRET, SETTINGS, attention_inputs, check_close, segments

GTOL = {jnp.bfloat16: 2e-2, jnp.float16: 1e-2}


def _compare(q, k, v, do, *, block_sizes, expect_kernel=True, tol=None, entry=False, **kw):
  """Gradients of the Mosaic GPU path (``flash_attention_gpu``, or the public entry point if
  ``entry``) vs the reference; returns the kernel path's (dq, dk, dv)."""
  assert (fa_gpu.backward_reason(q, k, block_sizes=block_sizes, causal=kw.get("causal", True),
                                 window=kw.get("window"), dense_mask=kw.get("dense_mask"))
          is None) == expect_kernel
  if entry:
    ker = functools.partial(fa.flash_attention, block_sizes=block_sizes, impl="pallas",
                            backend="gpu", **kw)
  else:
    ker = functools.partial(fa_gpu.flash_attention_gpu, block_sizes=block_sizes, **kw)
  with plgpu.force_gpu_interpret_mode(GPU_INTERPRET):
    _, vjp = jax.vjp(ker, q, k, v)
    grads = vjp(do)
  _, rvjp = jax.vjp(functools.partial(attention_reference, **kw), q, k, v)
  tol = tol or GTOL[jnp.dtype(q.dtype).type]
  for name, g, r in zip(("dq", "dk", "dv"), grads, rvjp(do)):
    assert g.shape == r.shape and g.dtype == r.dtype, name
    check_close(name, g, r, tol)
  return grads


# ------------------------------------------------------------------------------------------------
# Static lists (numpy, fast)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("per_head", [False, True])
def test_group_lists_enumerate_every_visible_tile(per_head):
  h, hkv, lq, lk = 4, 2, 200, 260
  rng = np.random.default_rng(per_head)
  dense = rng.random((h if per_head else 1, lq, lk)) < 0.3
  dense[..., 64:128, :] = False    # a whole query block is empty
  lay = fa_layout.make_layout(lq, lk, 64, 128, causal=True, window=120, dense_mask=dense)
  head, blk, cls, cnt = fa_bwd.group_lists(lay.cols, h, hkv, lay.per_head)
  g = h // hkv
  for kvh in range(hkv):
    for j in range(lay.classes.shape[2]):
      want = [(gg, i, int(lay.classes[kvh * g + gg if per_head else 0, i, j]))
              for gg in range(g) for i in range(lay.classes.shape[1])
              if lay.classes[kvh * g + gg if per_head else 0, i, j] != fa_layout.EMPTY]
      n = cnt[kvh, j]
      got = list(zip(head[kvh, j, :n].tolist(), blk[kvh, j, :n].tolist(),
                     cls[kvh, j, :n].tolist()))
      assert got == want, (kvh, j)
  assert (cnt < g * lay.classes.shape[1]).any()   # something was skipped


def test_backward_reasons():
  q = jnp.zeros((1, 256, 2, 64), jnp.bfloat16)
  bs = BlockSizes(64, 64)
  assert fa_gpu.backward_reason(q, q, block_sizes=bs, causal=True, window=None) is None
  q256 = jnp.zeros((1, 256, 2, 256), jnp.bfloat16)
  assert "head_dim" in fa_gpu.backward_reason(q256, q256, block_sizes=bs, causal=True,
                                              window=None)
  assert "block_q_bwd" in fa_gpu.backward_reason(
      q, q, block_sizes=BlockSizes(64, 64, block_q_bwd=192), causal=True, window=None)
  aligned64 = np.kron(np.eye(4, dtype=bool), np.ones((64, 64), bool))[None]
  assert fa_gpu.backward_reason(q, q, block_sizes=bs, causal=False, window=None,
                                dense_mask=aligned64) is None
  # Aligned at 64 x 64 (the forward) but not at the dQ tiling 128 x 64.
  assert "dense_mask" in fa_gpu.backward_reason(
      q, q, block_sizes=BlockSizes(64, 64, block_q_bwd=128), causal=False, window=None,
      dense_mask=aligned64)


# ------------------------------------------------------------------------------------------------
# Kernels in GPU interpret mode
# ------------------------------------------------------------------------------------------------


def test_causal_bf16_through_entry_point():
  """``flash_attention(impl="pallas", backend="gpu")`` differentiates through the kernels."""
  q, k, v, do = attention_inputs(0, 1, 128, 128, 2, 2, 64, jnp.bfloat16)
  grads = _compare(q, k, v, do, block_sizes=BlockSizes(64, 64), causal=True, entry=True)
  _, rvjp = jax.vjp(functools.partial(attention_reference, causal=True), q, k, v)
  # Not the reference gradient itself (that one would match to ~1e-7).
  assert max(float(jnp.abs(g.astype(jnp.float32) - r.astype(jnp.float32)).max())
             for g, r in zip(grads, rvjp(do))) > 1e-4


def test_causal_f16_ragged_two_warpgroups():
  """Lengths that are not tile multiples; 128-row CTAs (two compute warpgroups) in both."""
  q, k, v, do = attention_inputs(1, 1, 100, 100, 1, 1, 64, jnp.float16)
  _compare(q, k, v, do, block_sizes=BlockSizes(128, 128), causal=True)


def test_window_segments_soft_cap_mqa():
  lq, lk = 130, 190
  q, k, v, do = attention_inputs(2, 1, lq, lk, 2, 1, 64, jnp.bfloat16)
  seg = (segments(3, 1, lq, 3), segments(4, 1, lk, 3))
  _compare(q, k, v, do, block_sizes=BlockSizes(64, 128), causal=True, window=50,
           logit_soft_cap=3.0, segment_ids=seg)


@pytest.mark.slow
def test_gqa_non_causal_ragged():
  q, k, v, do = attention_inputs(5, 1, 150, 200, 4, 2, 64, jnp.bfloat16)
  _compare(q, k, v, do, block_sizes=BlockSizes(128, 128), causal=False)


def test_block_sparse_per_head_with_empty_rows():
  """Per-head block-aligned layout with skipped tiles, empty query rows (segment 3 has no
  key) and a key block no query sees."""
  h, lq, lk = 2, 128, 192
  rng = np.random.default_rng(7)
  tiles = rng.random((h, 2, 3)) < 0.5
  tiles[:, :, 0] = True
  tiles[:, :, 2] = False                   # keys 128.. are seen by nobody: dk = dv = 0
  dense = np.repeat(np.repeat(tiles, 64, 1), 64, 2)
  seg_q = jnp.asarray(np.r_[np.ones(100), np.full(28, 3)][None], jnp.int32)
  seg_k = jnp.asarray(np.r_[np.ones(150), np.full(42, 2)][None], jnp.int32)
  q, k, v, do = attention_inputs(6, 1, lq, lk, h, 1, 64, jnp.bfloat16)
  dq, dk, dv = _compare(q, k, v, do, block_sizes=BlockSizes(64, 64), causal=False,
                        dense_mask=dense, segment_ids=(seg_q, seg_k))
  assert float(jnp.abs(dq[0, 100:]).max()) == 0.0
  assert float(jnp.abs(dk[0, 128:]).max()) == 0.0 and float(jnp.abs(dv[0, 128:]).max()) == 0.0
  assert float(jnp.abs(dv[0, :64]).max()) > 0.0


def test_misaligned_dense_mask_keeps_reference_gradient():
  """Aligned for the forward (64 x 64) but not for the dQ tiling (128 x 64): exact XLA grad."""
  dense = np.kron(np.eye(2, dtype=bool), np.ones((64, 64), bool))[None]
  dense[:, :, :64] = True
  q, k, v, do = attention_inputs(8, 1, 128, 128, 1, 1, 64, jnp.bfloat16)
  _compare(q, k, v, do, block_sizes=BlockSizes(64, 64, block_q_bwd=128), causal=False,
           dense_mask=dense, expect_kernel=False, tol=1e-6)


@pytest.mark.slow
@hypothesis.settings(max_examples=3, **SETTINGS)
@hypothesis.given(lq=st.integers(60, 160), lk=st.integers(60, 160), hkv=st.sampled_from([1, 2]),
                  causal=st.booleans(), window=st.sampled_from([None, 40]),
                  cap=st.sampled_from([None, 10.0]), seg=st.booleans(),
                  blocks=st.sampled_from([(64, 64), (128, 64), (64, 128)]),
                  seed=st.integers(0, 99))
def test_random_configs(lq, lk, hkv, causal, window, cap, seg, blocks, seed):
  q, k, v, do = attention_inputs(seed, 1, lq, lk, 2, hkv, 64, jnp.bfloat16)
  segment_ids = (segments(seed, 1, lq, 2), segments(seed + 1, 1, lk, 2)) if seg else None
  _compare(q, k, v, do, block_sizes=BlockSizes(64, 64, block_q_bwd=blocks[0],
                                                block_k_bwd=blocks[1]),
           causal=causal, window=window, logit_soft_cap=cap, segment_ids=segment_ids)
