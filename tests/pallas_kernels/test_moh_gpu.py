"""Tests for the Mosaic GPU head-sparse (MoH) attention kernels, in GPU interpret mode on CPU.

Kernels run under ``plgpu.force_gpu_interpret_mode`` with the race detector on and
uninitialised memory poisoned with NaN, against the pure-jnp reference (values and the
gradients in q, k, v and gates). The kernels take bf16/f16 only; tolerances relative to
max(1, max|reference|): values 2e-2, gradients 6e-2 (P and dS are cast to bf16 before their
matmuls, as in every flash kernel).
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

from effx.pallas_kernels import moh_attention as mk
from effx.pallas_kernels.moh_attention import gpu as mk_gpu
from effx.pallas_kernels.moh_attention.config import BlockSizes
from _helpers import GPU_INTERPRET, SETTINGS, check_close, moh_inputs, segments, value_and_vjp

ATOL, GTOL = 2e-2, 6e-2
_inputs = functools.partial(moh_inputs, dtype=jnp.bfloat16)   # the kernels take bf16/f16


def _compare(q, k, v, gates, active, dy, *, block_sizes, segment_ids=None, cap=None,
             grads=True):
  kw = dict(active=active, segment_ids=segment_ids, logit_soft_cap=cap)
  ker = functools.partial(mk_gpu.moh_attention_gpu, block_sizes=block_sizes, **kw)
  ref = functools.partial(mk.moh_attention_reference, block_q=block_sizes.block_q, **kw)
  if not grads:
    with plgpu.force_gpu_interpret_mode(GPU_INTERPRET):
      y = jax.jit(ker)(q, k, v, gates)
    check_close("y", y, ref(q, k, v, gates), ATOL)
    return y
  with plgpu.force_gpu_interpret_mode(GPU_INTERPRET):
    y, got = value_and_vjp(ker, q, k, v, gates, dy)
  ry, want = value_and_vjp(ref, q, k, v, gates, dy)
  assert y.dtype == q.dtype and y.shape == q.shape
  check_close("y", y, ry, ATOL)
  for name, g, r in zip(("dq", "dk", "dv", "dgates"), got, want):
    assert g.shape == r.shape and g.dtype == r.dtype, name
    check_close(name, g, r, GTOL)
  return y


# ------------------------------------------------------------------------------------------------
# Forward
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", [
    dict(t=200, h=4, hkv=2, bq=64, bk=64, density=0.5),                 # GQA, ragged length
    dict(t=150, h=4, hkv=4, bq=128, bk=64, density=0.6, seg=True, cap=5.0),
    dict(t=128, h=4, hkv=1, bq=64, bk=128, density=1.0),                # MQA, all active
])
def test_forward_matches_reference(case):
  c = dict(seg=False, cap=None) | case
  q, k, v, gates, active, dy = _inputs(1, 1, c["t"], c["h"], c["hkv"], 64, c["bq"],
                                       c["density"])
  seg = segments(2, 1, c["t"]) if c["seg"] else None
  _compare(q, k, v, gates, active, dy, block_sizes=BlockSizes(c["bq"], c["bk"]),
           segment_ids=seg, cap=c["cap"], grads=False)


def test_forward_skips_inactive_pairs():
  """With all gates 1 the output is plain attention on active pairs and exactly 0 elsewhere,
  so zeros can only come from the kernel's skip (not from the gating)."""
  q, k, v, _, active, _ = _inputs(3, 2, 130, 4, 2, 64, 64, 0.5)
  ones = jnp.ones(q.shape[:3], jnp.float32)
  active = active.at[0].set(False)        # batch 0: every pair inactive
  bs = BlockSizes(64, 64)
  y = _compare(q, k, v, ones, active, None, block_sizes=bs, grads=False)
  tok = np.repeat(np.asarray(active), 64, axis=1)[:, :130]
  y = np.asarray(y, np.float32)
  assert np.abs(y[~tok]).max() == 0.0
  assert np.abs(y[tok]).min(axis=-1).max() > 0.0


def test_forward_lse():
  """The saved log-sum-exp is the reference's on active pairs and +inf on inactive ones."""
  q, k, v, _, active, _ = _inputs(4, 1, 128, 4, 4, 64, 64, 0.5)
  bs = BlockSizes(64, 64)
  st = mk_gpu._Static(cap=None, scale=0.125, block_q=64, block_k=64, num_stages=2, groups=1,
                      tp=128, has_seg=False, interpreting=True)
  act = jnp.swapaxes(active.astype(jnp.int32), 1, 2)
  with plgpu.force_gpu_interpret_mode(GPU_INTERPRET):
    _, lse = mk_gpu._fwd_call(q, k, v, None, act, st, None)
  s = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32)) * 0.125
  s = jnp.where(jnp.tril(jnp.ones((128, 128), bool)), s, -jnp.inf)
  want = jax.nn.logsumexp(s, axis=-1)
  tok = np.repeat(np.asarray(act), bs.block_q, axis=2)
  lse = np.asarray(lse)
  assert np.isinf(lse[tok == 0]).all()
  np.testing.assert_allclose(lse[tok != 0], np.asarray(want)[tok != 0], atol=2e-3)


# ------------------------------------------------------------------------------------------------
# Backward (dQ and dK/dV kernels)
# ------------------------------------------------------------------------------------------------


def test_dkv_tables():
  """Visit lists: active (head of the group, 64-row tile) pairs sorted by tile; start[j] is
  the first entry a 128-key block j sees causally."""
  act = np.zeros((1, 2, 2), np.int32)     # [B, H, nq] with block_q = 128: tiles 0-1, 2-3
  act[0, 0, 1] = 1                        # head 0: tiles 2, 3
  act[0, 1, 0] = act[0, 1, 1] = 1         # head 1: tiles 0, 1, 2, 3
  lst, start, cnt = mk_gpu._dkv_tables(jnp.asarray(act), 2, 128)
  nt = 4
  decoded = [(int(e) // nt, int(e) % nt) for e in np.asarray(lst)[0, 0, :int(cnt[0, 0])]]
  assert decoded == [(1, 0), (1, 1), (0, 2), (1, 2), (0, 3), (1, 3)]
  np.testing.assert_array_equal(start, [[[0, 2]]])   # key block 1 sees tiles >= 2
  np.testing.assert_array_equal(cnt, [[6]])
  _, start, cnt = mk_gpu._dkv_tables(jnp.zeros((1, 2, 2), jnp.int32), 1, 128)
  np.testing.assert_array_equal(cnt, [[0, 0]])
  np.testing.assert_array_equal(start, np.zeros((1, 2, 2)))


@pytest.mark.slow
@pytest.mark.parametrize("case", [
    dict(t=200, h=4, hkv=2, bq=64, bk=64, density=0.5),                 # GQA, ragged length
    dict(t=150, h=4, hkv=4, bq=128, bk=64, density=0.6, seg=True, cap=5.0),
    dict(b=2, t=130, h=4, hkv=1, bq=128, bk=128, density=1.0, none_b0=True),  # MQA
])
def test_gradients_match_reference(case):
  """Values and gradients in q, k, v, gates; the last case has every pair of batch 0 inactive
  and every pair of batch 1 active."""
  c = dict(b=1, seg=False, cap=None, none_b0=False) | case
  q, k, v, gates, active, dy = _inputs(6, c["b"], c["t"], c["h"], c["hkv"], 64, c["bq"],
                                       c["density"])
  if c["none_b0"]:
    active = active.at[0].set(False)
    gates = gates.at[0].set(0.0)
  seg = segments(7, c["b"], c["t"]) if c["seg"] else None
  _compare(q, k, v, gates, active, dy, block_sizes=BlockSizes(c["bq"], c["bk"]),
           segment_ids=seg, cap=c["cap"])


@pytest.mark.slow
@hypothesis.settings(max_examples=2, **SETTINGS)
@hypothesis.given(t=st.integers(100, 200), hkv=st.sampled_from([1, 2, 4]),
                  bq=st.sampled_from([64, 128]), density=st.sampled_from([0.0, 0.3, 0.7]),
                  seg=st.booleans(), seed=st.integers(0, 100))
def test_gradients_random(t, hkv, bq, density, seg, seed):
  q, k, v, gates, active, dy = _inputs(seed, 1, t, 4, hkv, 64, bq, density)
  _compare(q, k, v, gates, active, dy, block_sizes=BlockSizes(bq, 64),
           segment_ids=segments(seed, 1, t) if seg else None)


def test_gradients_skip_inactive_pairs():
  """With all gates 1, dQ is exactly 0 on inactive pairs (the dQ kernel skipped them) and
  dK/dV get nothing from them: equal to the gradients with those rows' cotangent zeroed."""
  q, k, v, _, active, dy = _inputs(8, 1, 128, 4, 2, 64, 64, 0.5)
  ones = jnp.ones(q.shape[:3], jnp.float32)
  bs = BlockSizes(64, 64)
  ker = functools.partial(mk_gpu.moh_attention_gpu, active=active, block_sizes=bs)
  with plgpu.force_gpu_interpret_mode(GPU_INTERPRET):
    _, (dq, dk, dv, _) = value_and_vjp(ker, q, k, v, ones, dy)
  tok = np.repeat(np.asarray(active), 64, axis=1)
  assert np.abs(np.asarray(dq, np.float32)[~tok]).max() == 0.0
  ref = functools.partial(mk.moh_attention_reference, active=active, block_q=64)
  dy_active = jnp.where(jnp.asarray(tok)[..., None], dy, 0).astype(dy.dtype)
  _, (_, rdk, rdv, _) = value_and_vjp(ref, q, k, v, ones, dy_active)
  check_close("dk", dk, rdk, GTOL)
  check_close("dv", dv, rdv, GTOL)


def test_head_dim_256_forward_kernel_xla_gradient():
  """head_dim 256: the forward kernel runs; the gradient is the XLA reference's."""
  q, k, v, gates, active, dy = _inputs(9, 1, 64, 2, 1, 256, 64, 0.7)
  _compare(q, k, v, gates, active, dy, block_sizes=BlockSizes(64, 64))


# ------------------------------------------------------------------------------------------------
# Entry point
# ------------------------------------------------------------------------------------------------


def test_entry_point_dispatch_and_fallback():
  q, k, v, gates, active, _ = _inputs(5, 1, 70, 2, 1, 64, 64, 0.7)
  assert mk.resolve("pallas", "gpu") == ("gpu", True)
  assert mk.resolve("auto") == ("xla", False)              # this suite runs on CPU
  assert mk.fallback_reason("pallas", "gpu", q=q, k=k, block_sizes=BlockSizes(64, 64)) is None
  want = mk.moh_attention_reference(q, k, v, gates, active=active, block_q=64)
  with plgpu.force_gpu_interpret_mode(GPU_INTERPRET):
    got = mk.moh_attention(q, k, v, gates, active=active, block_sizes=BlockSizes(64, 64),
                           impl="pallas", backend="gpu")
  check_close("pallas-gpu", got, want, ATOL)
  # f32 and odd head_dim / tiles are not Mosaic GPU inputs: XLA with a warning and a reason.
  q32, k32, v32 = (x.astype(jnp.float32) for x in (q, k, v))
  assert "dtype" in mk.fallback_reason("pallas", "gpu", q=q32, k=k32)
  with pytest.warns(UserWarning, match="does not apply"):
    got = mk.moh_attention(q32, k32, v32, gates, impl="pallas", backend="gpu")
  check_close("f32-fallback", got, mk.moh_attention_reference(q32, k32, v32, gates), 1e-6)
  assert "head_dim" in mk.fallback_reason("pallas", "gpu", q=q[..., :48], k=k[..., :48])
  assert "block_q" in mk.fallback_reason("pallas", "gpu", q=q, block_sizes=BlockSizes(32, 64))
  big = jnp.zeros((1, 8, 1, 256), jnp.bfloat16)
  assert "shared memory" in mk.fallback_reason("pallas", "gpu", q=big,
                                               block_sizes=BlockSizes(128, 256))
  assert mk.fallback_reason("pallas", "gpu", q=big, block_sizes=BlockSizes.for_device(
      "NVIDIA H100 80GB HBM3", 256)) is None
  with pytest.raises(ValueError, match="num_stages"):
    BlockSizes(num_stages=1)
  assert BlockSizes.for_device("NVIDIA H200", 256).block_k == 64
  assert mk_gpu.backward_supported(jnp.zeros((1, 8, 1, 256), jnp.bfloat16)) is not None
