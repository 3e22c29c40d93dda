"""Tests for effx.attention.blockwise: equals dense masked softmax (values, grads, lse)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effx.attention import masks as M
from effx.attention.blockwise import blockwise_attention, key_tile_lists


def _dense_reference(q, k, v, allowed, scale=None, cap=None):
    """Plain masked softmax; allowed bool broadcastable to [b, h, Tq, Tk]; empty rows -> 0."""
    b, tq, h, d = q.shape
    g = h // k.shape[2]
    kk, vv = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
    s = jnp.einsum("bqhd,bkhd->bhqk", q, kk) * (d ** -0.5 if scale is None else scale)
    if cap is not None:
        s = cap * jnp.tanh(s / cap)
    allowed = jnp.broadcast_to(allowed, s.shape)
    s = jnp.where(allowed, s, -1e30)
    p = jax.nn.softmax(s, axis=-1) * allowed
    lse = jnp.where(allowed.any(-1), jax.nn.logsumexp(s, axis=-1), -jnp.inf)
    return jnp.einsum("bhqk,bkhd->bqhd", p, vv), lse


def _inputs(b=2, tq=21, tk=21, h=4, kvh=2, d=8, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    return (jax.random.normal(ks[0], (b, tq, h, d)), jax.random.normal(ks[1], (b, tk, kvh, d)),
            jax.random.normal(ks[2], (b, tk, kvh, d)))


def _pos(b, t, offset=0):
    return jnp.broadcast_to(jnp.arange(offset, offset + t, dtype=jnp.int32), (b, t))


def _check_values_and_grads(fn, ref_fn, args, atol=2e-5, grads=True):
    """One compiled function per check (compiles dominate the CPU test time)."""

    @jax.jit
    def both(*a):
        out, ref = fn(*a), ref_fn(*a)
        if not grads:
            return out, ref, (), ()
        w = jax.random.normal(jax.random.PRNGKey(9), out.shape)
        got = jax.grad(lambda *x: (fn(*x) * w).sum(), argnums=(0, 1, 2))(*a)
        want = jax.grad(lambda *x: (ref_fn(*x) * w).sum(), argnums=(0, 1, 2))(*a)
        return out, ref, got, want

    out, ref, got, want = both(*args)
    np.testing.assert_allclose(out, ref, atol=atol, rtol=1e-5)
    for g1, g2 in zip(got, want):
        np.testing.assert_allclose(g1, g2, atol=10 * atol, rtol=1e-4)
    return out


MASKS = {
    "none": None,
    "causal": M.CausalMask(),
    "causal&window": M.CausalMask() & M.SlidingWindowMask(5),
    "causal&localglobal": M.CausalMask() & M.LocalGlobalMask(4, 3),
    "causal&strided_per_head": M.CausalMask() & M.StridedMask(3, 4, local_window=2),
    "causal&bigbird": M.CausalMask() & M.BigBirdMask(3, 2, 2, 4, seed=5),
    "blocksparse": M.BlockSparseMask(lambda a, c: (a + c) % 2 == 0, 4),
    "perhead": M.PerHeadMask((M.CausalMask(), M.SlidingWindowMask(3), M.FullMask(),
                              M.GlobalTokensMask(2))),
}


@pytest.mark.parametrize("name", sorted(MASKS))
def test_static_layout_matches_dense_reference(name):
    """Index positions, static tile skipping, GQA (4 heads on 2), lengths 21 vs tiles 8/5."""
    mask = MASKS[name]
    q, k, v = _inputs()
    allowed = True if mask is None else mask.dense(21, 21)[None]
    fn = lambda q, k, v: blockwise_attention(q, k, v, mask=mask, block_q=8, block_k=5)
    _check_values_and_grads(fn, lambda q, k, v: _dense_reference(q, k, v, allowed)[0], (q, k, v))


@pytest.mark.parametrize("name", ["causal&window", "causal&bigbird", "causal&strided_per_head"])
def test_dynamic_positions_decode_view_matches_dense(name):
    """Explicit positions (queries at the end of a longer key range), rectangular tiles."""
    mask = MASKS[name]
    q, k, v = _inputs(tq=6, tk=19)
    qp, kp = _pos(2, 6, 13), _pos(2, 19)
    allowed = mask(qp, kp)
    fn = lambda q, k, v: blockwise_attention(q, k, v, mask=mask, q_pos=qp, kv_pos=kp,
                                             block_q=4, block_k=7)
    _check_values_and_grads(fn, lambda q, k, v: _dense_reference(q, k, v, allowed)[0], (q, k, v),
                            grads=name == "causal&strided_per_head")


def test_segment_ids_with_restarting_positions_and_static_layout():
    """Packed documents: positions restart per doc; static_layout=True is valid for causal."""
    seg = jnp.array([[1] * 7 + [2] * 9 + [0] * 4, [3] * 20], jnp.int32)
    pos = jnp.array([list(range(7)) + list(range(9)) + [0] * 4, list(range(20))], jnp.int32)
    mask = M.CausalMask() & M.SlidingWindowMask(6)
    q, k, v = _inputs(tq=20, tk=20)
    allowed = mask(pos, pos) & M.segment_mask(seg, seg)
    ref = lambda q, k, v: _dense_reference(q, k, v, allowed)[0]
    for static in (False, True):
        fn = lambda q, k, v: blockwise_attention(
            q, k, v, mask=mask, q_pos=pos, kv_pos=pos, segment_ids=seg, block_q=8, block_k=8,
            static_layout=static)
        out = _check_values_and_grads(fn, ref, (q, k, v), grads=static)
        assert (out[0, 16:] == 0).all()  # padding rows attend nothing -> 0


def test_cross_segment_ids_kv_mask_lse_and_soft_cap():
    q, k, v = _inputs(b=2, tq=5, tk=13, h=4, kvh=1)
    q_seg = jnp.array([[1, 1, 2, 2, 2], [1, 1, 1, 1, 1]], jnp.int32)
    kv_seg = jnp.array([[1] * 6 + [2] * 7, [1] * 10 + [0] * 3], jnp.int32)
    kv_mask = jax.random.bernoulli(jax.random.PRNGKey(3), 0.7, (2, 4, 13))  # per query head
    allowed = M.segment_mask(q_seg, kv_seg) & kv_mask[:, :, None, :]
    out, lse = jax.jit(lambda q, k, v: blockwise_attention(
        q, k, v, segment_ids=(q_seg, kv_seg), kv_mask=kv_mask, block_q=2, block_k=4,
        sm_scale=0.7, logit_soft_cap=2.0, return_lse=True))(q, k, v)
    ref, ref_lse = _dense_reference(q, k, v, allowed, scale=0.7, cap=2.0)
    np.testing.assert_allclose(out, ref, atol=2e-5)
    np.testing.assert_allclose(lse, ref_lse, atol=2e-5)
    assert lse.shape == (2, 4, 5)


def test_empty_rows_are_zero_with_finite_grads():
    q, k, v = _inputs(b=1, tq=8, tk=8, h=2, kvh=2)
    mask = M.CausalMask() & M.StridedMask(4, 2, local_window=0)  # head 1 row 0 sees nothing
    f = lambda q, k, v: blockwise_attention(q, k, v, mask=mask, block_q=4, block_k=4)
    out, grads = jax.jit(lambda *a: (f(*a), jax.grad(lambda *x: f(*x).sum(), (0, 1, 2))(*a)))(
        q, k, v)
    assert (out[0, 0, 1] == 0).all() and not (out[0, 0, 0] == 0).all()
    assert all(bool(jnp.isfinite(g).all()) for g in grads)


def test_bf16_within_tolerance():
    q, k, v = _inputs(tq=16, tk=16)
    mask = M.CausalMask()
    ref = _dense_reference(q, k, v, mask.dense(16, 16)[None])[0]
    out = jax.jit(lambda q, k, v: blockwise_attention(q, k, v, mask=mask, block_q=8, block_k=8))(
        q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16))
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.astype(jnp.float32), ref, atol=3e-2)


def test_key_tile_lists_skip_empty_tiles():
    index, valid = key_tile_lists(M.CausalMask(), 64, 64, 16, 16)
    assert valid.sum() == 4 * 5 // 2 and index.shape == (4, 4)
    assert [list(index[i][valid[i]]) for i in range(4)] == [[0], [0, 1], [0, 1, 2], [0, 1, 2, 3]]
    index, valid = key_tile_lists(M.CausalMask() & M.SlidingWindowMask(16), 256, 256, 16, 16)
    assert index.shape == (16, 2) and valid.sum() == 31


@pytest.mark.parametrize("kwargs,match", [
    (dict(block_q=0), "block_q=0"),
    (dict(mask=M.StridedMask(2, 3)), "mask.num_heads=3"),
    (dict(q_pos=jnp.zeros((2, 3), jnp.int32)), "q_pos shape"),
    (dict(kv_mask=jnp.ones((2, 3, 4), bool)), "kv_mask shape"),
])
def test_validation(kwargs, match):
    q, k, v = _inputs(tq=4, tk=4)
    with pytest.raises(ValueError, match=match):
        blockwise_attention(q, k, v, **kwargs)


@pytest.mark.slow
def test_16k_tokens_forward_without_quadratic_memory():
    t = 16384
    q = jax.random.normal(jax.random.PRNGKey(0), (1, t, 1, 16))
    mask = M.CausalMask() & M.SlidingWindowMask(512)
    f = jax.jit(lambda q: blockwise_attention(q, q, q, mask=mask, block_q=256, block_k=256))
    compiled = f.lower(q).compile()
    stats = compiled.memory_analysis()
    if stats is not None:  # a [T, T] float32 score matrix alone would be 1 GiB
        assert stats.temp_size_in_bytes < 64 * 2 ** 20
    out = compiled(q)
    assert out.shape == (1, t, 1, 16) and bool(jnp.isfinite(out).all())
    # Spot-check the last rows against the dense reference on the window they see.
    tail = slice(t - 8, t)
    ref = _dense_reference(q[:, tail], q[:, t - 520:], q[:, t - 520:],
                           mask(_pos(1, 8, t - 8), _pos(1, 520, t - 520)))[0]
    np.testing.assert_allclose(out[:, tail], ref, atol=2e-5)
