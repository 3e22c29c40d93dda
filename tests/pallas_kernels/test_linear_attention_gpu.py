"""Tests for the Mosaic GPU linear-attention kernels (effx/pallas_kernels/linear_attention/gpu.py).

The kernels run in GPU interpret mode on CPU (race detector on, uninitialised shared memory
poisoned with NaN) and are compared with the XLA chunked reference: y, the final state and the
gradients in q, k, v, log_decay and the initial state. Everything is jitted; each distinct shape
costs one interpreted compile of the forward and backward kernels (~5-10 s on the shared CPU).
Tolerances (relative to max(1, max|reference|)): bfloat16/float16 values 2e-2 and gradients
4e-2 (the kernel's matmul operands, including the carried state, are 16-bit; the reference
computes in float32). The kernel takes no float32 inputs (XLA fallback, tested).
"""

from __future__ import annotations

import functools

import hypothesis
import hypothesis.strategies as hst
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effx.attention.feature_maps import taylor_features
from effx.pallas_kernels import linear_attention as lak
from effx.pallas_kernels.linear_attention import gpu as lak_gpu
from effx.pallas_kernels.linear_attention.config import BlockSizes

from _helpers import GPU_INTERPRET, SETTINGS, check_close, linear_segments

VAL_TOL, GRAD_TOL = 2e-2, 4e-2


def _inputs(seed, b, t, h, dk, dv, kind, dtype=jnp.bfloat16):
  """q, k, v, log_decay (None / [h] / [b, t, h]), s0, dy, dS (cotangents)."""
  ks = jax.random.split(jax.random.key(seed), 7)
  q = jax.random.normal(ks[0], (b, t, h, dk), jnp.float32).astype(dtype)
  k = (0.5 * jax.random.normal(ks[1], (b, t, h, dk), jnp.float32)).astype(dtype)
  v = jax.random.normal(ks[2], (b, t, h, dv), jnp.float32).astype(dtype)
  g = None
  if kind == "retnet":          # weak enough that earlier chunks and s0 still matter
    g = -0.1 * jax.nn.softplus(jax.random.normal(ks[3], (b, t, h)))
  elif kind == "retnet_heads":
    g = jnp.log1p(-jnp.exp2(-4.0 - jnp.arange(h, dtype=jnp.float32)))
  elif kind == "gla":
    g = -0.1 * jax.nn.softplus(jax.random.normal(ks[3], (b, t, h, dk)))
  elif kind == "gla_strong":    # e^{G} spans far beyond float32 within one chunk
    g = -3.0 * jax.nn.softplus(2.0 * jax.random.normal(ks[3], (b, t, h, dk)))
  s0 = jax.random.normal(ks[4], (b, h, dk, dv), jnp.float32)
  dy = jax.random.normal(ks[5], (b, t, h, dv), jnp.float32).astype(dtype)
  ds = jax.random.normal(ks[6], (b, h, dk, dv), jnp.float32)
  return q, k, v, g, s0, dy, ds


def _value_and_grads(fn, q, k, v, g, s0, dy, ds, seg):
  """(y, state) and the VJP of (dy, ds) w.r.t. q, k, v, log_decay, s0 (None where absent)."""
  def f(q, k, v, g, s0):
    return fn(q, k, v, log_decay=g, segment_ids=seg, initial_state=s0)

  out, vjp = jax.vjp(f, q, k, v, g, s0)
  return out, vjp((dy, ds))


def _compare(q, k, v, g, s0, dy, ds, seg):
  kernel = functools.partial(lak_gpu.linear_attention_gpu, interpret=GPU_INTERPRET)
  got = jax.jit(functools.partial(_value_and_grads, kernel))(q, k, v, g, s0, dy, ds, seg)
  want = jax.jit(functools.partial(_value_and_grads, lak.linear_attention_reference))(
      q, k, v, g, s0, dy, ds, seg)
  (y, st), grads = got
  (ry, rst), rgrads = want
  check_close("y", y, ry, VAL_TOL)
  check_close("state", st, rst, VAL_TOL)
  assert y.dtype == v.dtype and st.dtype == jnp.float32
  for name, a, r in zip(("dq", "dk", "dv", "dlog_decay", "ds0"), grads, rgrads):
    assert (a is None) == (r is None), name
    if r is not None:
      assert a.shape == r.shape and a.dtype == r.dtype, name
      check_close(name, a, r, GRAD_TOL)


# ------------------------------------------------------------------------------------------------
# Kernel vs reference
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", [
    # no decay, T not a chunk multiple (2 chunks), no segments / initial state
    dict(t=100, kind="none"),
    # per-token RetNet decay, segments, initial state, 3 chunks
    dict(t=150, kind="retnet", seg=True, s0=True),
    # per-head decay, d_k = 16 (Taylor-size features, padded to 64), d_v = 48 (padded), f16
    dict(t=70, kind="retnet_heads", dk=16, dv=48, s0=True, dtype=jnp.float16),
    # segments without decay, one chunk shorter than C
    dict(t=40, kind="none", seg=True, b=2),
    # GLA per-channel gates (inter-chunk kernel + XLA sub-chunk intra part), segments, s0
    dict(t=100, kind="gla", seg=True, s0=True),
    # strong GLA gates (the exponents must stay <= 0), d_k = 73 (padded to 128), f16
    dict(t=70, kind="gla_strong", dk=73, s0=True, dtype=jnp.float16),
])
def test_kernel_matches_reference(case):
  c = dict(b=1, h=2, dk=64, dv=64, seg=False, s0=False, dtype=jnp.bfloat16) | case
  q, k, v, g, s0, dy, ds = _inputs(3, c["b"], c["t"], c["h"], c["dk"], c["dv"], c["kind"],
                                   c["dtype"])
  seg = linear_segments(5, c["b"], c["t"]) if c["seg"] else None
  _compare(q, k, v, g, s0 if c["s0"] else None, dy, ds, seg)


@pytest.mark.parametrize("case", [
    # f = 8: d_k = 73 (padded to 128, one d_k tile), no decay, one chunk and a bit
    dict(f=8, t=70, kind="none", s0=False, seg=False),
    # f = 16: d_k = 273 (padded to 320: five 64-row d_k tiles, partial y / dv summed),
    # per-token RetNet decay, segments, initial state
    dict(f=16, t=100, kind="retnet", s0=True, seg=True),
])
def test_kernel_based_taylor_features(case):
  """Based's 2nd-order Taylor feature map, d_k = 1 + f + f² > 64."""
  f, t, h = case["f"], case["t"], 2
  _, _, v, g, _, dy, _ = _inputs(11, 1, t, h, 1, 64, case["kind"])
  kq, kk, ks = jax.random.split(jax.random.key(f), 3)
  q = taylor_features(jax.random.normal(kq, (1, t, h, f))).astype(jnp.bfloat16)
  k = taylor_features(0.5 * jax.random.normal(kk, (1, t, h, f))).astype(jnp.bfloat16)
  dk = 1 + f + f * f
  assert q.shape[-1] == dk
  s0 = jax.random.normal(ks, (1, h, dk, 64)) if case["s0"] else None
  ds = jax.random.normal(jax.random.fold_in(ks, 1), (1, h, dk, 64))
  _compare(q, k, v, g, s0, dy, ds, linear_segments(4, 1, t) if case["seg"] else None)


@pytest.mark.slow
def test_kernel_wide_k_tiles():
  """d_k = 256: two 128-row d_k tiles, d_v = 128: two d_v tiles (4 CTAs per head)."""
  q, k, v, g, s0, dy, ds = _inputs(9, 1, 90, 2, 256, 128, "retnet_heads")
  _compare(q, k, v, g, s0, dy, ds, None)


@pytest.mark.slow
def test_kernel_wide_heads():
  """d_k = d_v = 128: two d_v tiles per head (dq/dk partial sums) and two state row blocks."""
  q, k, v, g, s0, dy, ds = _inputs(7, 1, 130, 2, 128, 128, "retnet")
  _compare(q, k, v, g, s0, dy, ds, linear_segments(8, 1, 130))


@pytest.mark.slow
@hypothesis.settings(max_examples=3, **SETTINGS)
@hypothesis.given(t=hst.integers(1, 200), kind=hst.sampled_from(["none", "retnet"]),
                  seg=hst.booleans(), s0=hst.booleans())
def test_kernel_random_shapes(t, kind, seg, s0):
  q, k, v, g, s0_, dy, ds = _inputs(t, 1, t, 2, 64, 64, kind)
  _compare(q, k, v, g, s0_ if s0 else None, dy, ds, linear_segments(t, 1, t) if seg else None)


# ------------------------------------------------------------------------------------------------
# Hardware lowering (no GPU needed)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", [
    dict(kind="none"),
    dict(kind="retnet", seg=True, s0=True),
    dict(kind="none", seg=True),
    dict(kind="retnet", dk=128, dv=128, s0=True),
    dict(kind="retnet", dk=273, dv=64, seg=True, s0=True),     # Based f = 16: 5 d_k tiles
    dict(kind="none", dk=256, dv=128),                          # 2 d_k tiles of 128
    dict(kind="gla", dk=64, dv=64, seg=True, s0=True),          # GLA: inter-chunk kernel
    dict(kind="gla", dk=273, dv=128),                           # GLA with 5 d_k tiles
])
def test_lowers_for_cuda(case):
  """Forward and backward go through the real Pallas -> Mosaic GPU lowering (layout inference,
  dialect lowering; interpret mode skips both) for the cuda platform, on this CPU machine.
  A layout-inference dead end shows up here (after minutes of search, then a ValueError)."""
  c = dict(seg=False, s0=False, dk=64, dv=64) | case
  b, t, h = 1, 130, 2
  sds = jax.ShapeDtypeStruct
  q = sds((b, t, h, c["dk"]), jnp.bfloat16)
  v = sds((b, t, h, c["dv"]), jnp.bfloat16)
  g = {"retnet": sds((h,), jnp.float32), "gla": sds((b, t, h, c["dk"]), jnp.float32),
       "none": None}[c["kind"]]
  s0 = sds((b, h, c["dk"], c["dv"]), jnp.float32) if c["s0"] else None
  seg = sds((b, t), jnp.int32) if c["seg"] else None

  def fwd(q, k, v, g, s0, seg):
    return lak_gpu.linear_attention_gpu(q, k, v, log_decay=g, initial_state=s0, segment_ids=seg)

  def loss(q, k, v, g, s0, seg):
    y, state = fwd(q, k, v, g, s0, seg)
    return jnp.sum(y.astype(jnp.float32)) + jnp.sum(state)

  for fn in (fwd, jax.grad(loss, argnums=(0, 1, 2))):
    lowered = jax.jit(fn).trace(q, q, v, g, s0, seg).lower(lowering_platforms=("cuda",))
    assert "mosaic_gpu" in lowered.as_text()


# ------------------------------------------------------------------------------------------------
# Entry point and fallbacks
# ------------------------------------------------------------------------------------------------


def test_supported_reasons():
  q, k, v, g, _, _, _ = _inputs(1, 1, 8, 2, 64, 64, "gla")
  assert lak_gpu.supported(q, k, v, g) is None
  assert lak_gpu.supported(q, k, v, g[..., 0]) is None
  assert "dtype" in lak_gpu.supported(q.astype(jnp.float32), k, v)
  assert "mixed" in lak_gpu.supported(q, k.astype(jnp.float16), v)
  assert lak_gpu.supported(jnp.zeros((1, 8, 2, 273), jnp.bfloat16),
                           jnp.zeros((1, 8, 2, 273), jnp.bfloat16), v) is None
  wide = jnp.zeros((1, 8, 2, lak_gpu.MAX_DK + 1), jnp.bfloat16)
  assert "d_k" in lak_gpu.supported(wide, wide, v)
  assert "chunk_size" in lak_gpu.supported(q, k, v, block_sizes=BlockSizes(chunk_size=128))
  with pytest.raises(ValueError, match="dtype"):
    lak_gpu.linear_attention_gpu(q.astype(jnp.float32), k, v, log_decay=g)


def test_entry_point_gpu_dispatch():
  q, k, v, g, s0, _, _ = _inputs(13, 1, 80, 2, 64, 64, "retnet")
  seg = linear_segments(2, 1, 80)
  kw = dict(log_decay=g, segment_ids=seg, initial_state=s0)
  want = lak.linear_attention_reference(q, k, v, **kw)
  assert lak.resolve("pallas", "gpu") == ("gpu", True)
  assert lak.resolve("auto", "gpu") == ("xla", False)       # this suite runs on CPU
  assert lak.fallback_reason("pallas", "gpu", q=q, k=k, v=v, log_decay=g) is None
  got = jax.jit(functools.partial(lak.linear_attention, impl="pallas", backend="gpu"))(
      q, k, v, **kw)
  check_close("pallas-gpu y", got[0], want[0], VAL_TOL)
  check_close("pallas-gpu state", got[1], want[1], VAL_TOL)


def test_entry_point_gpu_fallbacks():
  """float32 inputs (with or without GLA gates) run the XLA reference under impl="pallas",
  with a warning."""
  q, k, v, g, s0, _, _ = _inputs(17, 1, 30, 2, 16, 16, "gla", jnp.float32)
  assert "dtype" in lak.fallback_reason("pallas", "gpu", q=q, k=k, v=v, log_decay=g)
  assert "dtype" in lak.fallback_reason("pallas", "gpu", q=q, k=k, v=v)
  for log_decay in (g, None):
    want = jax.jit(lak.linear_attention_reference)(q, k, v, log_decay=log_decay,
                                                   initial_state=s0)
    with pytest.warns(UserWarning, match="does not apply"):
      got = jax.jit(functools.partial(lak.linear_attention, impl="pallas", backend="gpu"))(
          q, k, v, log_decay=log_decay, initial_state=s0)
    check_close("fallback y", got[0], want[0], 1e-6)
    check_close("fallback state", got[1], want[1], 1e-6)
