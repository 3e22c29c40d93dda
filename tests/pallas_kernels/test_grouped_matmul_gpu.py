"""Tests for the Mosaic GPU grouped matmul (effx/pallas_kernels/grouped_matmul/gpu.py).

``test_cuda_lowering_*`` lower the kernels for CUDA on this CPU machine (Pallas -> Mosaic GPU,
layout inference included; no PTX, nothing runs): this is where a TMA window whose start the
layout inference cannot prove tile-aligned, or a global array the TMA tiling does not divide,
fails, which GPU interpret mode does not check.

The kernels run in GPU interpret mode on CPU with the race detector on and uninitialised memory
poisoned with NaN, and are compared with ``jax.lax.ragged_dot``: values and the gradients
w.r.t. lhs and rhs (the rhs gradient also with the independent segment-sum reference).
Tolerances (absolute, relative to max |reference|, inputs ~N(0, 1)): bfloat16 2e-2, float16
5e-3 (16-bit inputs and outputs, float32 accumulation on both sides: the final rounding plus
summation order). float32 inputs are not a Mosaic GPU dtype: the entry point falls back.
"""

from __future__ import annotations

import re

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu

from effx.pallas_kernels import grouped_matmul as gm
from effx.pallas_kernels.grouped_matmul import gpu as gm_gpu
from effx.pallas_kernels.grouped_matmul.config import BlockSizes
from _helpers import GPU_INTERPRET, SETTINGS, check_close, gmm_inputs

TOL = {jnp.bfloat16: 2e-2, jnp.float16: 5e-3}
SMALL = BlockSizes(64, 64, 64, num_stages=2)


def _races_found() -> bool:
  from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call
  return bool(interpret_pallas_call.get_races().races_found)


def _compare(sizes, m, k, n, dtype, block_sizes=SMALL, seed=0):
  gs = jnp.asarray(sizes, jnp.int32)
  lhs, rhs, dout = gmm_inputs(seed, m, k, n, len(sizes), dtype)
  tol = TOL[jnp.dtype(dtype).type]

  def ker(x, w):
    return gm_gpu.grouped_matmul_gpu(x, w, gs, block_sizes=block_sizes)

  def ref(x, w):
    return gm.grouped_matmul_reference(x, w, gs)

  with plgpu.force_gpu_interpret_mode(GPU_INTERPRET):
    out, vjp = jax.vjp(ker, lhs, rhs)
    dx, dw = vjp(dout)
  assert not _races_found()
  r_out, r_vjp = jax.vjp(ref, lhs, rhs)
  r_dx, r_dw = r_vjp(dout)
  assert out.dtype == dx.dtype == dw.dtype == dtype
  check_close("out", out, r_out, tol)
  check_close("d_lhs", dx, r_dx, tol)
  check_close("d_rhs", dw, r_dw, tol)
  check_close("d_rhs/segment", dw, gm.transposed_grouped_matmul_reference(
      lhs, dout, gs, len(sizes)), tol)
  total = int(np.sum(sizes))
  assert float(jnp.abs(out[total:].astype(jnp.float32)).max(initial=0.0)) == 0.0
  assert float(jnp.abs(dx[total:].astype(jnp.float32)).max(initial=0.0)) == 0.0
  empty = np.asarray(sizes) == 0
  assert float(jnp.abs(dw[empty].astype(jnp.float32)).max(initial=0.0)) == 0.0


# ------------------------------------------------------------------------------------------------
# Schedule (traced jnp, fast)
# ------------------------------------------------------------------------------------------------


@hypothesis.settings(max_examples=20, **SETTINGS)
@hypothesis.given(sizes=st.lists(st.integers(0, 20), min_size=1, max_size=6),
                  m=st.integers(1, 60), tm=st.sampled_from([8, 16]))
def test_schedule_covers_every_row_once(sizes, m, tm):
  """Tile t visits groups first[t]..last[t]: exactly the groups owning its rows, in order."""
  left, clipped = m, []
  for s in sizes:
    clipped.append(min(s, left))
    left -= clipped[-1]
  offsets, first, last = (np.asarray(a) for a in gm_gpu.make_schedule(
      jnp.asarray(clipped, jnp.int32), m, tm))
  np.testing.assert_array_equal(offsets, np.concatenate([[0], np.cumsum(clipped)]))
  owner = np.searchsorted(offsets[1:], np.arange(m), side="right")   # G past the groups
  for t in range(-(-m // tm)):
    rows = owner[t * tm:(t + 1) * tm]
    owned = sorted(set(rows[rows < len(clipped)].tolist()))
    visited = [g for g in range(first[t], last[t] + 1) if clipped[g] > 0]
    assert visited == owned, (t, visited, owned)
    if owned:
      assert clipped[first[t]] > 0


# ------------------------------------------------------------------------------------------------
# Kernels (GPU interpret mode, race detection, NaN-poisoned memory)
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
@hypothesis.settings(max_examples=2, **SETTINGS)
@hypothesis.given(sizes=st.lists(st.sampled_from([0, 1, 37, 64, 70]), min_size=2, max_size=4),
                  extra=st.integers(0, 40), seed=st.integers(0, 2**16))
def test_gpu_kernel_random_groups(sizes, extra, seed):
  """Values and both gradients; drawn group sizes (zeros, 1, straddling tiles), extra rows."""
  _compare(sizes, max(1, sum(sizes) + extra), 128, 128, jnp.bfloat16, seed=seed)


@pytest.mark.parametrize("sizes,m", [
    ([50, 0, 70, 33], 200),    # an empty group, none a tile multiple, rows past the groups
    ([200, 0, 0, 0], 200),     # every row in one group, m not a tile multiple
])
def test_gpu_kernel_bf16(sizes, m):
  _compare(sizes, m, 128, 128, jnp.bfloat16)


def test_gpu_kernel_f16_wide_tiles():
  """float16; 128-row tiles holding three groups; block_n 128 falls back to 64 on N=192."""
  _compare([30, 0, 61, 90, 19], 220, 128, 192, jnp.float16, BlockSizes(128, 64, 128, 3))


@pytest.mark.parametrize("sizes,m", [([0, 0, 0, 0], 130), ([3, 0, 5, 2], 12)])
def test_gpu_kernel_empty_and_tiny(sizes, m):
  """All groups empty (all zeros); fewer rows than one tile (padded to one)."""
  _compare(sizes, m, 128, 128, jnp.bfloat16)


# ------------------------------------------------------------------------------------------------
# Lowering for CUDA (on CPU: what interpret mode does not check)
# ------------------------------------------------------------------------------------------------


def _cuda_lowering_unavailable() -> str | None:
  try:
    import jax.experimental.mosaic.gpu  # noqa: F401
    jax.jit(lambda a: a + 1).trace(jnp.zeros(8)).lower(lowering_platforms=("cuda",))
  except Exception as e:  # noqa: BLE001 -- any failure here means "cannot lower for cuda"
    return f"cannot lower for cuda in this environment ({type(e).__name__}: {e})"
  return None


@pytest.mark.parametrize("m,k,n,g,bs", [
    (1003, 256, 192, 5, BlockSizes.for_device("NVIDIA H200", 1003, 256, 192)),   # M % 8 = 3
    (40, 128, 128, 8, BlockSizes.for_device("NVIDIA H200", 40, 128, 128)),       # decode-sized
    (16347, 2048, 1408, 8, BlockSizes.for_device("NVIDIA H200", 16347, 2048, 1408)),
    (203, 128, 192, 3, BlockSizes(128, 64, 128, 3)),   # the f16 test's tiles
])
def test_cuda_lowering_forward_and_backward(m, k, n, g, bs):
  """Forward and both gradients lower for CUDA: one Mosaic GPU call each (gmm, gmm with the
  weights transposed, tgmm), at M not a multiple of 8 (or below one tile)."""
  reason = _cuda_lowering_unavailable()
  if reason is not None:
    pytest.skip(reason)
  x = jax.ShapeDtypeStruct((m, k), jnp.bfloat16)
  w = jax.ShapeDtypeStruct((g, k, n), jnp.bfloat16)
  gs = jax.ShapeDtypeStruct((g,), jnp.int32)

  def loss(x, w, gs):
    out = gm_gpu.grouped_matmul_gpu(x, w, gs, block_sizes=bs)
    return jnp.sum(out.astype(jnp.float32) ** 2)

  for fn, calls in ((lambda x, w, gs: gm_gpu.grouped_matmul_gpu(x, w, gs, block_sizes=bs), 1),
                    (jax.value_and_grad(loss, argnums=(0, 1)), 3)):
    text = jax.jit(fn).trace(x, w, gs).lower(lowering_platforms=("cuda",)).as_text()
    assert len(re.findall(r"custom_call @mosaic_gpu", text)) == calls


def test_kernels_reject_unaligned_rows():
  gs = jnp.array([3, 4], jnp.int32)
  lhs, rhs, dout = gmm_inputs(0, 130, 64, 64, 2, jnp.bfloat16)
  sched = gm_gpu.make_schedule(gs, 130, 64)
  with pytest.raises(ValueError, match="M=130"):
    gm_gpu.gmm(lhs, rhs, sched, block_sizes=SMALL)
  with pytest.raises(ValueError, match="M=130"):
    gm_gpu.tgmm(lhs, dout, sched[0], 2, block_sizes=SMALL)


# ------------------------------------------------------------------------------------------------
# Entry point
# ------------------------------------------------------------------------------------------------


def test_entry_point_gpu_backend():
  gs = jnp.array([40, 0, 70], jnp.int32)
  lhs, rhs, _ = gmm_inputs(3, 130, 64, 128, 3, jnp.bfloat16)
  want = jax.lax.ragged_dot(lhs, rhs, gs, preferred_element_type=jnp.float32)
  assert gm.resolve("pallas", "gpu") == ("gpu", True)     # this suite runs on CPU
  assert gm.resolve("auto") == ("xla", False)
  assert gm.fallback_reason("pallas", "gpu", lhs=lhs, rhs=rhs) is None
  with plgpu.force_gpu_interpret_mode(GPU_INTERPRET):
    got = gm.grouped_matmul(lhs, rhs, gs, impl="pallas", backend="gpu",
                            preferred_element_type=jnp.float32)
  assert got.dtype == jnp.float32
  check_close("pallas/gpu", got, want, 1e-5)
  # float32 is not a Mosaic GPU dtype: documented fallback, with a warning under "pallas".
  x32, w32 = lhs.astype(jnp.float32), rhs.astype(jnp.float32)
  assert "dtype" in gm.fallback_reason("pallas", "gpu", lhs=x32, rhs=w32)
  with pytest.warns(UserWarning, match="ragged_dot"):
    got = gm.grouped_matmul(x32, w32, gs, impl="pallas", backend="gpu")
  check_close("gpu-fallback", got, jax.lax.ragged_dot(x32, w32, gs), 1e-6)
  assert "K=" in gm.fallback_reason("pallas", "gpu", lhs=lhs[:, :40], rhs=rhs[:, :40])
  assert "block_k" in gm_gpu.supported(lhs, rhs, block_sizes=BlockSizes(64, 32, 64))
  with pytest.raises(ValueError, match="does not support"):
    gm_gpu.grouped_matmul_gpu(x32, w32, gs)
  with pytest.raises(ValueError, match="num_stages"):
    BlockSizes(num_stages=0)
  assert BlockSizes.for_device("NVIDIA H200", 4096, 2048, 1408) == BlockSizes(128, 64, 128, 5)
