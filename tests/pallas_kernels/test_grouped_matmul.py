"""Tests for effx/pallas_kernels/grouped_matmul (kernels vs jax.lax.ragged_dot).

The TPU kernels run in TPU interpret mode with the race detector on and uninitialised memory
poisoned with NaN (a tile that were never written, or read before written, shows up as NaN).
Tolerances (absolute, relative to max |reference|, inputs ~N(0, 1)): float32 values and
gradients 1e-5; bfloat16 2e-2 (inputs and outputs are bf16, accumulation float32 on both sides,
so the difference is the final rounding plus summation order).
"""

from __future__ import annotations

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from effx.pallas_kernels import grouped_matmul as gm
from effx.pallas_kernels.grouped_matmul import tpu as gm_tpu
from effx.pallas_kernels.grouped_matmul.config import BlockSizes
from _helpers import SETTINGS, TPU_INTERPRET, check_close, gmm_inputs

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def _compare(sizes, m, k, n, dtype, block_sizes, seed=0, grads=True):
  gs = jnp.asarray(sizes, jnp.int32)
  lhs, rhs, dout = gmm_inputs(seed, m, k, n, len(sizes), dtype)
  tol = TOL[jnp.dtype(dtype).type]

  def ker(x, w):
    return gm_tpu.grouped_matmul_tpu(x, w, gs, block_sizes=block_sizes)

  def ref(x, w):
    return gm.grouped_matmul_reference(x, w, gs)

  with pltpu.force_tpu_interpret_mode(TPU_INTERPRET):
    if grads:
      out, vjp = jax.vjp(ker, lhs, rhs)
      dx, dw = vjp(dout)
    else:
      out = ker(lhs, rhs)
  r_out, r_vjp = jax.vjp(ref, lhs, rhs)
  assert out.dtype == dtype
  check_close("out", out, r_out, tol)
  total = int(np.sum(sizes))
  assert float(jnp.abs(out[total:].astype(jnp.float32)).max(initial=0.0)) == 0.0
  if grads:
    r_dx, r_dw = r_vjp(dout)
    assert dx.dtype == lhs.dtype and dw.dtype == rhs.dtype
    check_close("d_lhs", dx, r_dx, tol)
    check_close("d_rhs", dw, r_dw, tol)
    # Independent check of d_rhs (the reference's own gradient is also ragged_dot's).
    check_close("d_rhs/segment", dw, gm.transposed_grouped_matmul_reference(
        lhs, dout, gs, len(sizes)), tol)
    empty = np.asarray(sizes) == 0
    assert float(jnp.abs(dw[empty].astype(jnp.float32)).max(initial=0.0)) == 0.0


def _group_sizes(draw_sizes, m):
  """Clip a drawn list so that its sum is at most m."""
  out, left = [], m
  for s in draw_sizes:
    s = min(s, left)
    out.append(s)
    left -= s
  return out


# ------------------------------------------------------------------------------------------------
# Work list (traced jnp, fast)
# ------------------------------------------------------------------------------------------------


@hypothesis.settings(max_examples=20, **SETTINGS)
@hypothesis.given(sizes=st.lists(st.integers(0, 20), min_size=1, max_size=6),
                  m=st.integers(1, 60), tm=st.sampled_from([8, 16]))
def test_work_list_invariants(sizes, m, tm):
  sizes = _group_sizes(sizes, m)
  offsets, grp, tile, num = (np.asarray(a) for a in gm_tpu.make_work(
      jnp.asarray(sizes, jnp.int32), m, tm))
  tiles_m, g = -(-m // tm), len(sizes)
  n = int(num[0])
  assert grp.shape == tile.shape == (tiles_m + g,) and 1 <= n <= tiles_m + g
  np.testing.assert_array_equal(offsets, np.concatenate([[0], np.cumsum(sizes)]))
  # Non-decreasing (output tiles / groups are revisited consecutively); padding repeats.
  assert (np.diff(tile) >= 0).all() and (np.diff(grp) >= 0).all()
  assert (tile[n:] == tile[n - 1]).all() and (grp[n:] == grp[n - 1]).all()
  assert (0 <= tile).all() and (tile < tiles_m).all()
  items = set(zip(grp[:n].tolist(), tile[:n].tolist()))
  used = -(-sum(sizes) // tm)
  real = [(gi, t) for gi, t in zip(grp[:n].tolist(), tile[:n].tolist()) if t < used]
  assert len(set(real)) == len(real), "an item is listed twice"
  # Every (tile, group) pair sharing a row is an item; every tile and every group appears.
  for gi, s in enumerate(sizes):
    if s:
      for t in range(offsets[gi] // tm, (offsets[gi + 1] - 1) // tm + 1):
        assert (gi, t) in items
    assert gi in grp[:n]
  assert set(range(tiles_m)) <= set(tile[:n].tolist())


# ------------------------------------------------------------------------------------------------
# TPU kernels (interpret mode, race detection, NaN-poisoned memory)
# ------------------------------------------------------------------------------------------------


@hypothesis.settings(max_examples=2, **SETTINGS)
@hypothesis.example(sizes=[5, 0, 13, 8, 3], extra=7, kn=(24, 8), blocks=(8, 16, 16), seed=1)
@hypothesis.given(sizes=st.lists(st.sampled_from([5, 0, 13, 1, 8, 3]), min_size=2, max_size=5),
                  extra=st.integers(0, 9), kn=st.sampled_from([(16, 32), (32, 16), (24, 8)]),
                  blocks=st.sampled_from([(8, 16, 16), (16, 8, 8), (8, 128, 128)]),
                  seed=st.integers(0, 2**16))
def test_tpu_kernel_f32(sizes, extra, kn, blocks, seed):
  """Values and both gradients; zero and non-tile-multiple groups, rows past the groups."""
  m = max(1, sum(sizes) + extra)
  _compare(sizes, m, *kn, jnp.float32, BlockSizes(*blocks), seed=seed)


@hypothesis.settings(max_examples=1, **SETTINGS)
@hypothesis.given(sizes=st.lists(st.sampled_from([7, 11, 2]), min_size=2, max_size=4),
                  seed=st.integers(0, 2**16))
def test_tpu_kernel_bf16(sizes, seed):
  sizes = sizes[:1] + [0] + sizes[1:]     # an empty group between two straddling ones
  _compare(sizes, sum(sizes) + 3, 32, 16, jnp.bfloat16, BlockSizes(8, 16, 16), seed=seed)


@pytest.mark.parametrize("sizes,m", [([0, 0, 0], 10), ([21], 21)])
def test_tpu_kernel_edge_groups(sizes, m):
  """All groups empty (output and weight gradient all 0); one group filling every row."""
  _compare(sizes, m, 16, 16, jnp.float32, BlockSizes(8, 16, 16))


# ------------------------------------------------------------------------------------------------
# Entry point, and the MoE dropless path through effx.moe
# ------------------------------------------------------------------------------------------------


def test_entry_point_dispatch():
  gs = jnp.array([3, 0, 6], jnp.int32)
  lhs, rhs, _ = gmm_inputs(3, 12, 16, 8, 3, jnp.float32)
  want = jax.lax.ragged_dot(lhs, rhs, gs)
  for impl in ("auto", "xla"):
    check_close(impl, gm.grouped_matmul(lhs, rhs, gs, impl=impl), want, 1e-6)
  with pltpu.force_tpu_interpret_mode(TPU_INTERPRET):
    got = gm.grouped_matmul(lhs, rhs, gs, impl="pallas", block_sizes=BlockSizes(8, 8, 8),
                            preferred_element_type=jnp.bfloat16)
  assert got.dtype == jnp.bfloat16
  check_close("pallas", got, want, 1e-2)
  assert gm.resolve("auto") == ("xla", False)          # this suite runs on CPU
  assert gm.resolve("pallas") == ("tpu", True)
  assert "dtype" in gm.fallback_reason("pallas", "gpu", lhs=lhs, rhs=rhs)
  with pytest.warns(UserWarning, match="ragged_dot"):
    got = gm.grouped_matmul(lhs, rhs, gs, impl="pallas", backend="gpu")
  check_close("gpu-fallback", got, want, 1e-6)
  with pytest.raises(ValueError, match="impl"):
    gm.grouped_matmul(lhs, rhs, gs, impl="triton")
  with pytest.raises(ValueError, match="agree on K"):
    gm.grouped_matmul(lhs[:, :4], rhs, gs)
  with pytest.raises(ValueError, match="group_sizes.shape"):
    gm.grouped_matmul(lhs, rhs, gs[:2])
  with pytest.raises(ValueError, match="block_m"):
    BlockSizes(block_m=12)
  assert BlockSizes.for_device("TPU v5 lite", 4096, 1024, 768).block_n == 256
  assert BlockSizes.for_device("cpu", 64, 64, 64) == BlockSizes()


def test_moe_dropless_pallas_matches_ragged_and_blocked():
  """effx.moe's dropless execution with impl="pallas" (this kernel, interpreted) equals
  "ragged" and "blocked": outputs and gradients w.r.t. the tokens and both expert weights."""
  from effx.moe import dispatch, routers
  t, d, e, f, k = 9, 16, 4, 8, 2
  ks = jax.random.split(jax.random.key(5), 4)
  x = jax.random.normal(ks[0], (t, d))
  logits = jax.random.normal(ks[1], (t, e)) * 3.0      # uneven loads, likely an empty expert
  wi = jax.random.normal(ks[2], (e, d, 2, f)) / np.sqrt(d)
  wo = jax.random.normal(ks[3], (e, f, d)) / np.sqrt(f)
  routing = routers.top_k_routing(logits, k)

  def loss(x, wi, wo, impl):
    y, _ = dispatch.moe_forward(x, routing, wi, wo, jax.nn.silu, execution="dropless",
                                impl=impl, block_size=4)
    return jnp.sum(y * jnp.cos(jnp.arange(d, dtype=jnp.float32))), y

  grad = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)
  with pltpu.force_tpu_interpret_mode(TPU_INTERPRET):
    g_pallas, y_pallas = grad(x, wi, wo, "pallas")
  for impl in ("ragged", "blocked"):
    g_ref, y_ref = grad(x, wi, wo, impl)
    check_close(f"y vs {impl}", y_pallas, y_ref, 1e-5)
    for name, a, b in zip(("dx", "dwi", "dwo"), g_pallas, g_ref):
      check_close(f"{name} vs {impl}", a, b, 1e-5)
  assert float(jnp.abs(y_pallas).max()) > 0
