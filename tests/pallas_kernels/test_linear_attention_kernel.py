"""Tests for effx/pallas_kernels/linear_attention (kernels vs the XLA chunked/parallel forms).

The TPU kernels run in TPU interpret mode with the race detector on and uninitialised memory
poisoned with NaN. Everything is jitted (interpret mode is ~10x slower eagerly); each distinct
shape costs one compile (~5-10 s on the shared CPU), so the examples are few and tiny.
Tolerances (relative to max(1, max|reference|)): float32 values 1e-5 and gradients 5e-5;
bfloat16 values 3e-2 and gradients 6e-2 (the kernel's matmul operands are bf16, as in the
flash kernels; the reference computes in float32).
"""

from __future__ import annotations

import functools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from effx.attention import feature_maps as fm
from effx.attention import linear as la
from effx.pallas_kernels import linear_attention as lak
from effx.pallas_kernels.linear_attention import tpu as lak_tpu
from effx.pallas_kernels.linear_attention.config import BlockSizes
from _helpers import SETTINGS, TPU_INTERPRET, check_close, linear_segments

TOL = {jnp.float32: (1e-5, 5e-5), jnp.bfloat16: (3e-2, 6e-2)}


def _inputs(seed, b, t, h, dk, dv, kind, dtype=jnp.float32, gate_scale=2.0):
  ks = jax.random.split(jax.random.key(seed), 7)
  q = jax.random.normal(ks[0], (b, t, h, dk), jnp.float32).astype(dtype)
  k = (0.5 * jax.random.normal(ks[1], (b, t, h, dk), jnp.float32)).astype(dtype)
  v = jax.random.normal(ks[2], (b, t, h, dv), jnp.float32).astype(dtype)
  g = None
  if kind == "retnet":
    g = -jax.nn.softplus(jax.random.normal(ks[3], (b, t, h)))
  elif kind == "retnet_heads":
    g = jnp.log1p(-jnp.exp2(-1.0 - jnp.arange(h, dtype=jnp.float32)))
  elif kind == "gla":
    g = -gate_scale * jax.nn.softplus(jax.random.normal(ks[3], (b, t, h, dk)))
  s0 = jax.random.normal(ks[4], (b, h, dk, dv), jnp.float32)
  dy = jax.random.normal(ks[5], (b, t, h, dv), jnp.float32).astype(dtype)
  ds = jax.random.normal(ks[6], (b, h, dk, dv), jnp.float32)
  return q, k, v, g, s0, dy, ds


def _vjp_all(fn, q, k, v, g, s0, dy, ds):
  """(y, state) and the gradients w.r.t. q, k, v, log_decay (if any) and the initial state."""
  (y, s), vjp = jax.vjp(fn, q, k, v, g, s0)
  return y, s, vjp((dy, ds))


@functools.partial(jax.jit, static_argnames=("chunk", "sub", "with_seg", "with_s0"))
def _kernel_run(q, k, v, g, s0, dy, ds, seg, *, chunk, sub, with_seg, with_s0):
  def fn(q, k, v, g, s0):
    return lak_tpu.linear_attention_tpu(
        q, k, v, log_decay=g, segment_ids=seg if with_seg else None,
        initial_state=s0 if with_s0 else None, block_sizes=BlockSizes(chunk, sub))
  return _vjp_all(fn, q, k, v, g, s0, dy, ds)


@functools.partial(jax.jit, static_argnames=("chunk", "with_seg", "with_s0", "form"))
def _xla_run(q, k, v, g, s0, dy, ds, seg, *, chunk, with_seg, with_s0, form="chunked"):
  """effx.attention.linear's forms (the source of truth), computed in float32."""
  f32 = lambda x: None if x is None else x.astype(jnp.float32)
  b, t, h = q.shape[:3]

  def fn(q, k, v, g, s0):
    if g is not None and g.ndim == 1:
      g = jnp.broadcast_to(g, (b, t, h))
    y, s = la.linear_attention(f32(q), f32(k), f32(v), form=form, chunk_size=chunk,
                               log_decay=g, segment_ids=seg if with_seg else None,
                               initial_state=s0 if with_s0 else None)
    return y.astype(v.dtype), s
  return _vjp_all(fn, q, k, v, g, s0, dy, ds)


def _compare(q, k, v, g, s0, dy, ds, seg, *, chunk, sub, with_seg=False, with_s0=False):
  atol, gtol = TOL[jnp.dtype(q.dtype).type]
  kw = dict(chunk=chunk, with_seg=with_seg, with_s0=with_s0)
  with pltpu.force_tpu_interpret_mode(TPU_INTERPRET):
    y, s, grads = _kernel_run(q, k, v, g, s0, dy, ds, seg, sub=sub, **kw)
  ry, rs, rgrads = _xla_run(q, k, v, g, s0, dy, ds, seg, **kw)
  assert y.dtype == v.dtype and s.dtype == jnp.float32
  check_close("y", y, ry, atol)
  check_close("state", s, rs, atol)
  names = ("dq", "dk", "dv", "dlog_decay", "ds0")
  for name, got, want in zip(names, grads, rgrads):
    if want is None:
      assert got is None, name
      continue
    if name == "ds0" and not with_s0:
      continue
    assert got.dtype == want.dtype, name
    check_close(name, got, want, gtol)
  return y, grads


# ------------------------------------------------------------------------------------------------
# The XLA reference of the kernel folder == effx.attention.linear (no kernels: fast)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["none", "retnet_heads", "gla"])
def test_reference_matches_attention_linear(kind):
  """Values (with and without resets) and gradients of the folder's chunked and recurrent
  references == effx.attention.linear's parallel form."""
  b, t, h, dk, dv = 2, 13, 2, 4, 3
  q, k, v, g, s0, dy, ds = _inputs(1, b, t, h, dk, dv, kind)
  seg = linear_segments(2, b, t)
  full = lambda g: g if g is None or g.ndim > 1 else jnp.broadcast_to(g, (b, t, h))  # noqa: E731

  @jax.jit
  def run(q, k, v, g, s0, dy, ds):
    out = []
    for segment_ids in (None, seg):
      fns = (lambda q, k, v, g, s0: la.linear_attention_parallel(
                 q, k, v, log_decay=full(g), initial_state=s0, segment_ids=segment_ids),
             lambda q, k, v, g, s0: lak.linear_attention_reference(
                 q, k, v, log_decay=g, initial_state=s0, segment_ids=segment_ids,
                 chunk_size=4, sub_chunk=2),
             lambda q, k, v, g, s0: lak.linear_attention_recurrent(
                 q, k, v, log_decay=g, initial_state=s0, segment_ids=segment_ids))
      out.append([_vjp_all(fn, q, k, v, g, s0, dy, ds) for fn in fns])
    return out

  names = ("y", "state", ("dq", "dk", "dv", "dg", "ds0"))
  for want, *gots in run(q, k, v, g, s0, dy, ds):
    for got in gots:
      for name, a, r in zip(names, got, want):
        if isinstance(name, tuple):
          for n, aa, rr in zip(name, a, r):
            if rr is not None:
              check_close(n, aa, rr, 5e-5)
        else:
          check_close(name, a, r, 1e-5)


def test_decay_kind_and_input_errors():
  q = jnp.zeros((2, 5, 3, 4))
  v = jnp.zeros((2, 5, 3, 6))
  assert lak.decay_kind(q, None) == "none"
  assert lak.decay_kind(q, jnp.zeros((3,))) == "retnet"
  assert lak.decay_kind(q, jnp.zeros((2, 5, 3))) == "retnet"
  assert lak.decay_kind(q, jnp.zeros((2, 5, 3, 4))) == "gla"
  with pytest.raises(ValueError, match="log_decay shape"):
    lak.linear_attention(q, q, v, log_decay=jnp.zeros((2, 5, 3, 6)))
  with pytest.raises(ValueError, match="v shape"):
    lak.linear_attention(q, q, v[:, :4])
  with pytest.raises(ValueError, match="initial_state"):
    lak.linear_attention(q, q, v, initial_state=jnp.zeros((2, 3, 6, 4)))
  with pytest.raises(ValueError, match="segment_ids"):
    lak.linear_attention(q, q, v, segment_ids=jnp.zeros((2, 4), jnp.int32))
  with pytest.raises(ValueError, match="impl"):
    lak.linear_attention(q, q, v, impl="triton")
  with pytest.raises(ValueError, match="backend"):
    lak.linear_attention(q, q, v, impl="pallas", backend="cuda")


def test_block_sizes_validation_and_defaults():
  with pytest.raises(ValueError, match="chunk_size"):
    BlockSizes(chunk_size=0)
  with pytest.raises(ValueError, match="sub_chunk"):
    BlockSizes(chunk_size=24, sub_chunk=16).sub_for()
  assert BlockSizes(chunk_size=8, sub_chunk=16).sub_for() == 8
  tpu = BlockSizes.for_device("TPU v5 lite", 128)
  assert tpu.chunk_size % 128 == 0 and tpu.chunk_size % tpu.sub_chunk == 0
  assert BlockSizes.for_device("cpu", 64) == BlockSizes()
  assert BlockSizes.for_device("NVIDIA H100 80GB HBM3", 64) == BlockSizes()


# ------------------------------------------------------------------------------------------------
# TPU kernels (interpret mode, race detection, NaN-poisoned memory)
# ------------------------------------------------------------------------------------------------


@hypothesis.settings(max_examples=4, **SETTINGS)
@hypothesis.given(
    b=st.integers(1, 2), t=st.integers(1, 40), h=st.integers(1, 2),
    dims=st.sampled_from([(4, 8), (8, 4), (16, 16)]),
    kind=st.sampled_from(["none", "retnet", "retnet_heads", "gla"]),
    seg=st.booleans(), s0=st.booleans(),
    blocks=st.sampled_from([(8, 8), (16, 8), (16, 4), (32, 8)]), seed=st.integers(0, 2**16))
def test_kernel_f32(b, t, h, dims, kind, seg, s0, blocks, seed):
  dk, dv = dims
  q, k, v, g, s0_, dy, ds = _inputs(seed, b, t, h, dk, dv, kind)
  _compare(q, k, v, g, s0_, dy, ds, linear_segments(seed, b, t), chunk=blocks[0], sub=blocks[1],
           with_seg=seg, with_s0=s0)


def test_kernel_f32_gla_several_chunks_and_resets():
  """Always-run case: 3 chunks of 4 GLA sub-chunks, resets inside and across chunks."""
  q, k, v, g, s0, dy, ds = _inputs(3, 2, 37, 2, 8, 16, "gla")
  _compare(q, k, v, g, s0, dy, ds, linear_segments(4, 2, 37), chunk=16, sub=4, with_seg=True,
           with_s0=True)


@hypothesis.settings(max_examples=2, **SETTINGS)
@hypothesis.given(t=st.integers(1, 40), kind=st.sampled_from(["none", "retnet", "gla"]),
                  seg=st.booleans(), seed=st.integers(0, 2**16))
def test_kernel_bf16(t, kind, seg, seed):
  q, k, v, g, s0, dy, ds = _inputs(seed, 1, t, 2, 16, 16, kind, dtype=jnp.bfloat16)
  _compare(q, k, v, g, s0, dy, ds, linear_segments(seed, 1, t), chunk=16, sub=8, with_seg=seg)


def test_kernel_strong_gates_are_stable():
  """GLA gates down to exp(-60) per token: every exponent in the kernel stays <= 0."""
  q, k, v, g, s0, dy, ds = _inputs(5, 1, 24, 1, 8, 8, "gla", gate_scale=30.0)
  assert float(g.min()) < -50.0
  y, grads = _compare(q, k, v, g, s0, dy, ds, None, chunk=16, sub=8, with_s0=True)
  assert all(np.isfinite(np.asarray(x)).all() for x in grads if x is not None)


def test_kernel_taylor_features():
  """Based: the kernel takes 2nd-order Taylor features (d_φ = 1 + 4 + 16 = 21) as its q/k, and
  the normaliser rides along as an extra column of ones in v."""
  b, t, h, d, dv = 1, 19, 2, 4, 8
  q, k, v, _, _, dy, _ = _inputs(7, b, t, h, d, dv, "none")
  qf, kf = fm.taylor_features(q), fm.taylor_features(k)
  assert qf.shape[-1] == 21
  v1 = jnp.concatenate([v, jnp.ones(v.shape[:-1] + (1,))], -1)
  dy1 = jnp.concatenate([dy, jnp.zeros(dy.shape[:-1] + (1,))], -1)
  s0 = jnp.zeros((b, h, 21, dv + 1))
  y, _ = _compare(qf, kf, v1, None, s0, dy1, jnp.zeros_like(s0), None, chunk=8, sub=8)
  z = y[..., -1]
  assert float(z.min()) > 0.0   # φ(q)ᵀφ(k) = 1 + s + s²/2 > 0: positive normaliser


def test_entry_point_dispatch():
  q, k, v, g, s0, _, _ = _inputs(9, 1, 20, 2, 8, 8, "gla")
  want = jax.jit(functools.partial(la.linear_attention_chunked, chunk_size=8))(
      q, k, v, log_decay=g, initial_state=s0)
  bs = BlockSizes(8, 4)
  for impl in ("auto", "xla"):
    got = jax.jit(functools.partial(lak.linear_attention, block_sizes=bs, impl=impl))(
        q, k, v, log_decay=g, initial_state=s0)
    check_close(impl, got[0], want[0], 1e-5)
  assert lak.resolve("auto") == ("xla", False)        # this suite runs on CPU
  assert lak.resolve("pallas") == ("tpu", True)
  assert lak.fallback_reason("pallas") is None         # (on a GPU: the XLA fallback)
  with pltpu.force_tpu_interpret_mode(TPU_INTERPRET):
    got = jax.jit(functools.partial(lak.linear_attention, block_sizes=bs, impl="pallas"))(
        q, k, v, log_decay=g, initial_state=s0)
  check_close("pallas", got[0], want[0], 1e-5)
  check_close("pallas state", got[1], want[1], 1e-5)


# ------------------------------------------------------------------------------------------------
# LinearAttention(impl="pallas") == impl="xla"
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("feature_map,decay,denominator", [("identity", "gla", False),
                                                           ("elu", "retnet", True)])
def test_module_pallas_equals_xla(feature_map, decay, denominator):
  kw = dict(num_heads=2, head_dim=8, feature_map=feature_map, decay=decay, chunk_size=8,
            use_denominator=denominator, output_norm=not denominator)
  mx = la.LinearAttention(impl="xla", **kw)
  mp = la.LinearAttention(impl="pallas", **kw)
  x = jax.random.normal(jax.random.key(0), (2, 19, 16))
  pos = jnp.broadcast_to(jnp.arange(19), (2, 19))
  seg = jnp.asarray([[1] * 5 + [2] * 14, [1] * 19], jnp.int32)
  variables = mx.init(jax.random.key(1), x, pos)

  def run(module):
    def loss(params, x):
      y, _ = module.apply({**variables, "params": params}, x, pos, segment_ids=seg)
      return jnp.sum(jnp.sin(y)), y
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
        variables["params"], x)

  (_, yx), gx = run(mx)
  with pltpu.force_tpu_interpret_mode(TPU_INTERPRET):
    (_, yp), gp = run(mp)
  check_close("y", yp, yx, 1e-5)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(gp), jax.tree.leaves(gx)):
    check_close(jax.tree_util.keystr(path), a, b, 5e-5)
  if decay == "gla":   # the gates' gradient goes through the kernel's dlog_decay
    assert float(jnp.abs(jax.tree.leaves(gp[0]["gate_up"])[0]).max()) > 0


def test_module_pallas_config_errors():
  with pytest.raises(ValueError, match="impl"):
    la.LinearAttention(num_heads=2, head_dim=8, impl="triton")
  with pytest.raises(ValueError, match="delta"):
    la.LinearAttention(num_heads=2, head_dim=8, feature_map="identity", decay="delta",
                       impl="pallas")


def test_kernels_lower_to_mosaic_for_tpu():
  """Forward and backward lower to Mosaic TPU (jax.export for a TPU target, no device needed)
  at hardware tile sizes (C = 128, GLA sub-chunks of 16, bf16). Mosaic's own compilation to
  the chip happens on a TPU and is not covered here."""
  b, t, h, d = 1, 256, 1, 128
  x = jax.ShapeDtypeStruct((b, t, h, d), jnp.bfloat16)
  seg = jax.ShapeDtypeStruct((b, t), jnp.int32)
  decays = {"none": None, "retnet": jax.ShapeDtypeStruct((b, t, h), jnp.float32),
            "gla": jax.ShapeDtypeStruct((b, t, h, d), jnp.float32)}
  tpu = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=jax.sharding.AbstractDevice(
      device_kind="TPU v5 lite", num_cores=1, platform="tpu"))
  for kind, g in decays.items():
    def grads(q, k, v, g, seg):
      def loss(q, k, v, g):
        y, s = lak_tpu.linear_attention_tpu(q, k, v, log_decay=g, segment_ids=seg,
                                            block_sizes=BlockSizes(128, 16))
        return jnp.sum(y.astype(jnp.float32)) + jnp.sum(s)
      return jax.grad(loss, argnums=(0, 1, 2))(q, k, v, g)
    with jax.sharding.use_abstract_mesh(tpu):
      exported = jax.export.export(jax.jit(grads), platforms=["tpu"])(x, x, x, g, seg)
    text = exported.mlir_module()
    assert "effx_linear_attn_fwd" in text and "effx_linear_attn_bwd" in text, kind
