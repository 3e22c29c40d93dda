"""Tests for effx/pallas_kernels/moh_attention (head-sparse kernels vs the dense reference).

The TPU kernels run in TPU interpret mode with the race detector on and uninitialised memory
poisoned with NaN, under jit (one compile per shape). Tolerances as the flash-attention tests:
float32 values 1e-5 and gradients 5e-5, bfloat16 values 2e-2 and gradients 6e-2 (relative to
max(1, max|reference|)).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from effx.attention.moh import MixtureOfHeadsAttention
from effx.attention.moh import route_heads
from effx.pallas_kernels import moh_attention as mk
from effx.pallas_kernels.flash_attention.reference import attention_reference
from effx.pallas_kernels.moh_attention import tpu as mk_tpu
from effx.pallas_kernels.moh_attention.config import BlockSizes
from _helpers import SETTINGS, TPU_INTERPRET, check_close, moh_inputs, segments, value_and_vjp

TOL = {jnp.float32: (1e-5, 5e-5), jnp.bfloat16: (2e-2, 6e-2)}


def _compare(q, k, v, gates, active, dy, *, block_sizes, segment_ids=None, cap=None,
             q_for_kernel=None):
  kw = dict(active=active, segment_ids=segment_ids, logit_soft_cap=cap)
  ker = functools.partial(mk_tpu.moh_attention_tpu, block_sizes=block_sizes, **kw)
  ref = functools.partial(mk.moh_attention_reference, block_q=block_sizes.block_q, **kw)
  atol, gtol = TOL[jnp.dtype(q.dtype).type]
  with pltpu.force_tpu_interpret_mode(TPU_INTERPRET):
    y, grads = value_and_vjp(ker, q if q_for_kernel is None else q_for_kernel, k, v, gates, dy)
  ry, rgrads = value_and_vjp(ref, q, k, v, gates, dy)
  assert y.dtype == q.dtype and y.shape == q.shape
  check_close("y", y, ry, atol)
  for name, g, r in zip(("dq", "dk", "dv", "dgates"), grads, rgrads):
    assert g.shape == r.shape and g.dtype == r.dtype, name
    check_close(name, g, r, gtol)
  return y, grads


# ------------------------------------------------------------------------------------------------
# Reference, activity map and fetch tables (no kernels)
# ------------------------------------------------------------------------------------------------


def test_reference_is_dense_attention_times_gates():
  q, k, v, gates, active, _ = moh_inputs(0, 2, 13, 4, 2, 16, 4, 0.5)
  dense = attention_reference(q, k, v, causal=True)
  # With the activity map of the gates (what MoH routing gives): dense attention, then gates.
  assert (mk.activity_map(gates, 4) <= active).all()
  want = dense * gates[..., None]
  check_close("derived", mk.moh_attention_reference(q, k, v, gates, block_q=4), want, 1e-6)
  check_close("given", mk.moh_attention_reference(q, k, v, gates, active=active, block_q=4),
               want, 1e-6)
  # Pairs outside the map output 0 whatever the gates.
  ones = jnp.ones_like(gates)
  got = mk.moh_attention_reference(q, k, v, ones, active=active, block_q=4)
  tok = np.repeat(np.asarray(active), 4, axis=1)[:, :13]
  assert float(jnp.abs(got)[~tok].max()) == 0.0
  check_close("inside", np.asarray(got)[tok], np.asarray(dense)[tok], 1e-6)


def test_activity_map_and_fetch_tables():
  gates = np.zeros((1, 10, 2), np.float32)
  gates[0, 1, 0] = 1.0       # block 0, head 0
  gates[0, 9, 1] = 0.5       # block 2 (padded), head 1
  act = np.asarray(mk.activity_map(jnp.asarray(gates), 4))
  np.testing.assert_array_equal(act[0], [[True, False], [False, False], [False, True]])
  # Kernel order (b, h, i): head 0 -> [1, 0, 0], head 1 -> [0, 0, 1].
  flat, src, nxt = mk_tpu._fetch_tables(jnp.asarray(act.transpose(0, 2, 1), jnp.int32), 1)
  np.testing.assert_array_equal(flat, [1, 0, 0, 0, 0, 1])
  np.testing.assert_array_equal(src, [0, 0, 0, 0, 0, 5])    # inactive rows reuse row 0's blocks
  np.testing.assert_array_equal(nxt, [0, 5, 5, 5, 5, 5])    # the sweep's next active step
  # No active pair at all: every row/step points at itself.
  flat, src, nxt = mk_tpu._fetch_tables(jnp.zeros((1, 2, 3), jnp.int32), 2)
  np.testing.assert_array_equal(src, np.arange(6))
  np.testing.assert_array_equal(nxt, [0, 1, 2, 0, 1, 2])


def test_block_sizes_and_errors():
  with pytest.raises(ValueError, match="block_q"):
    BlockSizes(block_q=12)
  assert BlockSizes.for_device("TPU v5 lite", 128).block_k % 128 == 0
  assert BlockSizes.for_device("cpu", 64) == BlockSizes()
  q, k, v, gates, active, _ = moh_inputs(1, 1, 9, 2, 1, 8, 8, 1.0)
  with pytest.raises(ValueError, match="active shape"):
    mk.moh_attention(q, k, v, gates, active=active[:, :, :1], block_sizes=BlockSizes(8, 8))
  with pytest.raises(ValueError, match="gates shape"):
    mk.moh_attention(q, k, v, gates[:, :, :1])
  with pytest.raises(ValueError, match="impl"):
    mk.moh_attention(q, k, v, gates, impl="triton")


# ------------------------------------------------------------------------------------------------
# TPU kernels (interpret mode, race detection, NaN-poisoned memory)
# ------------------------------------------------------------------------------------------------

_HEADS = st.sampled_from([(2, 2), (4, 2), (2, 1)])


@hypothesis.settings(max_examples=4, **SETTINGS)
@hypothesis.given(
    b=st.integers(1, 2), t=st.integers(1, 40), heads=_HEADS,
    density=st.sampled_from([0.0, 0.3, 0.6, 1.0]), seg=st.booleans(),
    cap=st.sampled_from([None, 4.0]), blocks=st.sampled_from([(8, 16), (16, 8), (8, 8)]),
    seed=st.integers(0, 2**16))
def test_kernel_f32(b, t, heads, density, seg, cap, blocks, seed):
  h, hkv = heads
  bs = BlockSizes(*blocks)
  q, k, v, gates, active, dy = moh_inputs(seed, b, t, h, hkv, 32, bs.block_q, density)
  _compare(q, k, v, gates, active, dy, block_sizes=bs, cap=cap,
           segment_ids=segments(seed, b, t) if seg else None)


@hypothesis.settings(max_examples=2, **SETTINGS)
@hypothesis.given(t=st.integers(1, 40), heads=_HEADS, seed=st.integers(0, 2**16))
def test_kernel_bf16(t, heads, seed):
  h, hkv = heads
  q, k, v, gates, active, dy = moh_inputs(seed, 1, t, h, hkv, 64, 8, 0.5, jnp.bfloat16)
  _compare(q, k, v, gates, active, dy, block_sizes=BlockSizes(8, 16))


def test_kernel_never_reads_skipped_pairs():
  """NaN queries in every inactive (block, head) pair: the kernels never touch them, so values
  and all gradients stay finite and equal the reference computed with clean queries."""
  bs = BlockSizes(8, 16)
  q, k, v, gates, active, dy = moh_inputs(3, 1, 37, 4, 2, 32, 8, 0.4)
  assert 0 < float(active.mean()) < 1
  inactive = ~jnp.repeat(active, 8, axis=1)[:, :37]
  q_nan = jnp.where(inactive[..., None], jnp.nan, q)
  y, grads = _compare(q, k, v, gates, active, dy, block_sizes=bs,
                      segment_ids=segments(4, 1, 37), q_for_kernel=q_nan)
  assert float(jnp.abs(y)[inactive].max()) == 0.0
  assert float(jnp.abs(grads[0])[inactive].max()) == 0.0     # dq
  assert float(jnp.abs(grads[3])[inactive].max()) == 0.0     # dgates


def test_entry_point_dispatch():
  bs = BlockSizes(8, 8)
  q, k, v, gates, active, _ = moh_inputs(5, 1, 20, 2, 1, 16, 8, 0.5)
  want = mk.moh_attention_reference(q, k, v, gates, active=active, block_q=8)
  for impl in ("auto", "xla"):
    got = mk.moh_attention(q, k, v, gates, active=active, block_sizes=bs, impl=impl)
    check_close(impl, got, want, 1e-6)
  assert mk.resolve("auto") == ("xla", False)       # this suite runs on CPU
  assert mk.resolve("pallas") == ("tpu", True)
  assert mk.fallback_reason("pallas") is None
  with pltpu.force_tpu_interpret_mode(TPU_INTERPRET):
    got = jax.jit(functools.partial(mk.moh_attention, block_sizes=bs, impl="pallas"))(
        q, k, v, gates, active=active)
  check_close("pallas", got, want, 1e-5)


# ------------------------------------------------------------------------------------------------
# MixtureOfHeadsAttention(impl="pallas") == "xla" == "head_sparse"
# ------------------------------------------------------------------------------------------------


def test_module_pallas_equals_xla_and_head_sparse():
  kw = dict(num_heads=4, num_kv_heads=2, num_shared_heads=1, top_k=1, use_qkv_bias=True,
            block_q=8)
  b, t, embed = 2, 24, 16
  x = jax.random.normal(jax.random.key(0), (b, t, embed))
  x = x.at[:, :8].set(x[:, :1])   # block 0: every token routes alike -> 2 routed heads idle
  pos = jnp.asarray(np.concatenate([np.arange(10), np.arange(14)])[None].repeat(b, 0))
  seg = jnp.asarray([[1] * 10 + [2] * 14, [1] * 10 + [2] * 14], jnp.int32)
  modules = {impl: MixtureOfHeadsAttention(**kw, impl=impl)
             for impl in ("xla", "head_sparse", "pallas")}
  params = nn.unbox(modules["xla"].init(jax.random.key(1), x, pos)["params"])

  def run(module):
    def loss(params, x):
      (y, _), _ = module.apply({"params": params}, x, pos, segment_ids=seg,
                               mutable=["aux_loss", "metrics"])
      return jnp.sum(jnp.sin(y)), y
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)

  (_, y_ref), g_ref = run(modules["xla"])
  with pltpu.force_tpu_interpret_mode(TPU_INTERPRET):
    (_, y_ker), g_ker = run(modules["pallas"])
  (_, y_hs), g_hs = run(modules["head_sparse"])
  check_close("y", y_ker, y_ref, 1e-5)
  check_close("y head_sparse", y_ker, y_hs, 1e-5)
  for (path, a), r, s in zip(jax.tree_util.tree_leaves_with_path(g_ker), jax.tree.leaves(g_ref),
                             jax.tree.leaves(g_hs)):
    check_close(jax.tree_util.keystr(path), a, r, 5e-5)
    check_close(jax.tree_util.keystr(path) + " (head_sparse)", a, s, 5e-5)
  # 1 shared + top-1 of 3 routed heads: the kernel really skipped some (block, head) pairs.
  routing = route_heads(x, None, params["router_routed"], params["router_groups"], top_k=1,
                        num_shared=1)
  active = mk.activity_map(routing.dense_gates(4), 8)
  assert 0 < int((~active).sum()) and bool(active[:, :, 0].all())


def test_module_pallas_config_errors():
  with pytest.raises(ValueError, match="multiple of 8"):
    MixtureOfHeadsAttention(num_heads=4, top_k=1, impl="pallas", block_q=4)


def test_kernels_lower_to_mosaic_for_tpu():
  """Forward, dQ and dK/dV lower to Mosaic TPU (jax.export for a TPU target, no device needed)
  at hardware tile sizes (bf16, 128 x 128, GQA, segments). Mosaic's own compilation to the chip
  happens on a TPU and is not covered here."""
  b, t, d = 1, 256, 128
  q = jax.ShapeDtypeStruct((b, t, 4, d), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((b, t, 2, d), jnp.bfloat16)
  gates = jax.ShapeDtypeStruct((b, t, 4), jnp.float32)
  seg = jax.ShapeDtypeStruct((b, t), jnp.int32)
  tpu = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=jax.sharding.AbstractDevice(
      device_kind="TPU v5 lite", num_cores=1, platform="tpu"))

  def grads(q, k, v, gates, seg):
    def loss(q, k, v, gates):
      y = mk_tpu.moh_attention_tpu(q, k, v, gates, segment_ids=seg, logit_soft_cap=30.0,
                                   block_sizes=BlockSizes(128, 128))
      return jnp.sum(y.astype(jnp.float32))
    return jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, gates)

  with jax.sharding.use_abstract_mesh(tpu):
    text = jax.export.export(jax.jit(grads), platforms=["tpu"])(q, kv, kv, gates, seg
                                                                 ).mlir_module()
  for name in ("effx_moh_fwd", "effx_moh_dq", "effx_moh_dkv"):
    assert name in text, name
