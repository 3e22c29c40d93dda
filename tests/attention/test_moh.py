"""Tests of effx.attention.moh (mixture-of-head attention; CPU, tiny shapes, float32)."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effx.attention import masks
from effx.attention import moh
from effx.attention.mha import MultiHeadAttention
from effx.attention.moh import MixtureOfHeadsAttention

ATOL = 2e-5
RTOL = 2e-4
B, T, EMBED, H = 2, 8, 24, 6
SEGMENTS = np.array([[1, 1, 1, 2, 2, 2, 2, 0], [3, 3, 3, 3, 3, 3, 3, 3]], np.int32)
POSITIONS = np.array([[0, 1, 2, 0, 1, 2, 3, 0], list(range(T))], np.int32)
COLLECTIONS = ["aux_loss", "metrics"]


def _close(a, b, atol=ATOL, rtol=RTOL, what=""):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                               atol=atol, rtol=rtol, err_msg=what)


def _tree_close(a, b, atol=ATOL, rtol=RTOL):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        _close(x, y, atol, rtol, what=jax.tree_util.keystr(path))


def _x(seed=1, t=T, dtype=jnp.float32):
    return jax.random.normal(jax.random.PRNGKey(seed), (B, t, EMBED), dtype)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _init(module, seed):
    variables = module.init(jax.random.PRNGKey(seed), _x(), jnp.asarray(POSITIONS))
    return nn.unbox(variables["params"])


def _params(module, seed=0):
    return _init(module, seed)


@functools.partial(jax.jit, static_argnums=0)
def _run(module, params, x, pos, kw):
    (y, cache), state = module.apply({"params": params}, x, pos, mutable=COLLECTIONS, **kw)
    return y, cache, state


def _apply(module, params, x, pos, **kw):
    """(y, cache, sown state) under jit (compiled once per module, shapes and kwargs)."""
    return _run(module, params, x, jnp.asarray(pos, jnp.int32), kw)


MOH = dict(num_heads=H, num_kv_heads=2, num_shared_heads=2, top_k=2, use_qkv_bias=True)  # 4/6


# ---------------------------------------------------------------------------------------------
# Router math.
# ---------------------------------------------------------------------------------------------

def test_uniform_router_gives_unit_gates():
    """Zero router weights (uniform logits): every active head has gate exactly 1."""
    x = _x()
    z = lambda n: jnp.zeros((EMBED, n))  # noqa: E731
    r = moh.route_heads(x, z(2), z(4), z(2), top_k=2)
    _close(r.head_gates, np.ones((B, T, 4)), atol=1e-6)
    assert r.heads.shape == (B, T, 4)
    np.testing.assert_array_equal(np.asarray(r.heads[..., :2]), np.broadcast_to([0, 1], (B, T, 2)))
    r = moh.route_heads(x, None, z(4), None, top_k=3, router_fn="sigmoid")
    _close(r.head_gates, np.ones((B, T, 3)), atol=1e-6)


@pytest.mark.parametrize("router_fn", ["softmax", "sigmoid"])
def test_gates_match_numpy(router_fn):
    ks = jax.random.split(jax.random.PRNGKey(3), 3)
    w_s, w_r, w_h = (jax.random.normal(k, (EMBED, n)) for k, n in zip(ks, (2, 5, 2)))
    x = _x()
    r = moh.route_heads(x, w_s, w_r, w_h, top_k=2, router_fn=router_fn)
    xs, ws, wr, wh = (np.asarray(a, np.float64) for a in (x, w_s, w_r, w_h))

    def softmax(z):
        e = np.exp(z - z.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    alpha = 2 * softmax(xs @ wh)
    logits = xs @ wr
    p = softmax(logits) if router_fn == "softmax" else 1 / (1 + np.exp(-logits))
    top = np.argsort(-logits, axis=-1)[..., :2]
    picked = np.take_along_axis(p, top, -1)
    want_routed = alpha[..., 1:] * 2 * picked / picked.sum(-1, keepdims=True)
    want_shared = alpha[..., :1] * 2 * softmax(xs @ ws)
    _close(r.head_gates, np.concatenate([want_shared, want_routed], -1), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(r.heads), np.concatenate(
        [np.broadcast_to([0, 1], (B, T, 2)), 2 + top], -1))
    dense = np.asarray(r.dense_gates(7))
    assert np.count_nonzero(dense, axis=-1).max() == 4
    _close(dense.sum(-1), r.head_gates.sum(-1), atol=1e-5)


def test_balance_loss_hand_computed():
    # token 0 picks head 0 (p = .5 .3 .2), token 1 picks head 1 (p = .1 .6 .3):
    # f = [.5, .5, 0], P = [.3, .45, .25] -> 3 * (.15 + .225) = 1.125.
    probs = jnp.array([[[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]]])
    picked = jnp.array([[[True, False, False], [False, True, False]]])
    _close(moh.balance_loss(probs, picked), 1.125, atol=1e-6)
    # Token 1 is padding: f = [1, 0, 0], P = [.5, .3, .2] -> 3 * .5.
    _close(moh.balance_loss(probs, picked, jnp.array([[1.0, 0.0]])), 1.5, atol=1e-6)
    # Scores are normalised for P (sigmoid scores need not sum to 1): scaling them changes nothing.
    _close(moh.balance_loss(2 * probs, picked), 1.125, atol=1e-6)
    # Perfect balance gives K.
    _close(moh.balance_loss(jnp.full((1, 3, 3), 1 / 3),
                            jnp.eye(3, dtype=bool)[None]), 1.0, atol=1e-6)


def test_sown_balance_loss_and_metrics():
    """The module sows coef * E * sum f P from its own router, padding excluded."""
    module = MixtureOfHeadsAttention(**MOH, balance_coef=0.5)
    params = _params(module)
    x = _x()
    _, _, state = _apply(module, params, x, POSITIONS, segment_ids=jnp.asarray(SEGMENTS))
    xs = np.asarray(x, np.float64)
    logits = xs @ np.asarray(params["router_routed"], np.float64)  # [B, T, 4]
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    top = np.argsort(-logits, -1)[..., :2]
    sel = np.zeros_like(p)
    np.put_along_axis(sel, top, 1.0, -1)
    valid = SEGMENTS > 0
    f, pm = sel[valid].mean(0), p[valid].mean(0)
    (loss,) = state["aux_loss"]["moh_balance"]
    _close(loss, 0.5 * 4 * np.sum(f * pm), atol=1e-6)
    (frac,) = state["metrics"]["active_head_fraction"]
    (load,) = state["metrics"]["head_load"]
    _close(frac, (2 + 2) / H, atol=1e-6)
    _close(load, np.concatenate([[1.0, 1.0], f]), atol=1e-6)


@pytest.mark.parametrize("shared,top_k", [(0, 1), (1, 3), (H, None)])
def test_active_head_fraction(shared, top_k):
    module = MixtureOfHeadsAttention(num_heads=H, num_shared_heads=shared, top_k=top_k)
    _, _, state = _apply(module, _params(module), _x(), POSITIONS)
    k = module.resolved_top_k
    (frac,) = state["metrics"]["active_head_fraction"]
    (load,) = state["metrics"]["head_load"]
    _close(frac, (shared + k) / H, atol=1e-6)
    _close(load[:shared], np.ones(shared), atol=1e-6)
    _close(np.sum(load), shared + k, atol=1e-5)
    assert ("aux_loss" in state) == (shared < H)


# ---------------------------------------------------------------------------------------------
# Head-sparse layout.
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("block", [1, 3, 8])
def test_pair_blocks_layout(block):
    heads = jax.random.randint(jax.random.PRNGKey(0), (B, T, 3), 0, H)
    lay = moh.pair_blocks(heads, H, block)
    n = B * T * 3
    nb = lay.block_head.shape[0]
    assert nb == moh.num_pair_blocks(n, B * H, block)
    row_pair = np.asarray(lay.row_pair)
    valid = np.asarray(lay.row_valid)
    # Every pair exactly once, and pair_row points back at it.
    np.testing.assert_array_equal(np.sort(row_pair[valid]), np.arange(n))
    np.testing.assert_array_equal(row_pair[np.asarray(lay.pair_row)], np.arange(n))
    # Each row's pair has its block's (batch, head), tokens ascending within a block.
    hp = np.asarray(heads).reshape(n)
    blk = np.repeat(np.arange(nb), block)[valid]
    pairs = row_pair[valid]
    np.testing.assert_array_equal(hp[pairs], np.asarray(lay.block_head)[blk])
    np.testing.assert_array_equal(pairs // (T * 3), np.asarray(lay.block_batch)[blk])
    for j in range(nb):
        p = row_pair[j * block:(j + 1) * block]
        p = p[p < n]
        assert np.all(np.diff(p) > 0)
    # Rows actually used: the valid pairs plus at most one padded block per (row, head).
    assert valid.sum() == n


# ---------------------------------------------------------------------------------------------
# Reduction to MultiHeadAttention.
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", ["xla", "head_sparse"])
def test_reduces_to_mha_routing_all(impl):
    kw = dict(num_heads=H, num_kv_heads=2, use_qkv_bias=True, logit_soft_cap=5.0)
    mha = MultiHeadAttention(**kw)
    module = MixtureOfHeadsAttention(**kw, routing="all", impl=impl, block_q=3)
    params = _params(module)
    assert jax.tree.structure(params) == jax.tree.structure(_params(mha))
    # Same key, same parameter order: the attention weights are MultiHeadAttention's own.
    _tree_close(params, _params(mha), atol=0, rtol=0)
    x, seg = _x(), jnp.asarray(SEGMENTS)
    y, _, state = _apply(module, params, x, POSITIONS, segment_ids=seg)
    want, _, _ = _apply(mha, params, x, POSITIONS, segment_ids=seg)
    _close(y, want, atol=0 if impl == "xla" else ATOL, rtol=0 if impl == "xla" else RTOL)
    assert "aux_loss" not in state
    if impl == "xla":
        return  # the dense path with a cache is MultiHeadAttention's own _attend_cache
    # head_sparse with a cache (prefill 5 + decode 3).
    cache = module.init_cache(B, 12, EMBED)
    y1, c1, _ = _apply(module, params, x[:, :5], POSITIONS[:, :5] * 0 + np.arange(5), cache=cache)
    m1, d1, _ = _apply(mha, params, x[:, :5], POSITIONS[:, :5] * 0 + np.arange(5), cache=cache)
    y2, c2, _ = _apply(module, params, x[:, 5:], np.broadcast_to(np.arange(5, 8), (B, 3)),
                       cache=c1)
    m2, d2, _ = _apply(mha, params, x[:, 5:], np.broadcast_to(np.arange(5, 8), (B, 3)), cache=d1)
    _close(jnp.concatenate([y1, y2], 1), jnp.concatenate([m1, m2], 1))
    _tree_close(c2, d2)


@pytest.mark.parametrize("impl", ["xla", "head_sparse"])
def test_reduces_to_mha_all_shared_uniform_router(impl):
    """num_shared_heads = num_heads with a zero W_s: gates h_s * softmax(0) = 1."""
    module = MixtureOfHeadsAttention(num_heads=H, num_shared_heads=H, impl=impl)
    params = _params(module)
    assert set(params) == {"query_kernel", "key_kernel", "value_kernel", "out_kernel",
                           "router_shared"}  # no W_r, W_h: one group
    params = {**params, "router_shared": jnp.zeros_like(params["router_shared"])}
    mha_params = {k: v for k, v in params.items() if not k.startswith("router")}
    x = _x()
    y, _, _ = _apply(module, params, x, POSITIONS, segment_ids=jnp.asarray(SEGMENTS))
    want, _, _ = _apply(MultiHeadAttention(num_heads=H), mha_params, x, POSITIONS,
                        segment_ids=jnp.asarray(SEGMENTS))
    _close(y, want)


# ---------------------------------------------------------------------------------------------
# head_sparse == xla (values and gradients).
# ---------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _loss_fn(module, x_shape):
    w = jnp.cos(jnp.arange(np.prod(x_shape), dtype=jnp.float32)).reshape(x_shape)

    def loss(params, x, pos, seg):
        (y, _), state = module.apply({"params": params}, x, pos, segment_ids=seg,
                                     mutable=COLLECTIONS)
        aux = sum(jax.tree.leaves(state.get("aux_loss", {})))
        return jnp.sum(y.astype(jnp.float32) * w) + aux, y
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))


@pytest.mark.parametrize("extra", [
    # "loop" blocks stopping at key lengths 3, 6, 8 (lax.switch), per-head mask; no balance
    # loss, so the router gradients come from the gates alone.
    dict(router_fn="softmax", block_q=3, sparse_schedule="loop", sparse_key_block=3,
         mask=masks.CausalMask() & masks.StridedMask(2, H), balance_coef=0.0),
    # "batched" in causal chunks of 3 tokens (the later keys are skipped).
    dict(router_fn="sigmoid", block_q=64, num_shared_heads=0, top_k=1, logit_soft_cap=4.0,
         mask=masks.CausalMask() & masks.SlidingWindowMask(3), num_kv_heads=1,
         sparse_schedule="batched", query_chunk=3),
    # Not causal: "batched" chunks must read the later keys (the other lax.cond branch).
    dict(mask=masks.FullMask(), block_q=4, sparse_schedule="batched", query_chunk=4),
])
def test_head_sparse_matches_xla_values_and_grads(extra):
    kw = {**MOH, **extra}
    dense = MixtureOfHeadsAttention(**kw, impl="xla")
    sparse = MixtureOfHeadsAttention(**kw, impl="head_sparse")
    params = _params(dense)
    _tree_close(params, _params(sparse), atol=0, rtol=0)
    x, pos, seg = _x(), jnp.asarray(POSITIONS), jnp.asarray(SEGMENTS)
    (l_d, y_d), (gp_d, gx_d) = _loss_fn(dense, x.shape)(params, x, pos, seg)
    (l_s, y_s), (gp_s, gx_s) = _loss_fn(sparse, x.shape)(params, x, pos, seg)
    _close(y_s, y_d)
    _close(l_s, l_d)
    _tree_close(gp_s, gp_d)
    _close(gx_s, gx_d)
    # Router gradients are real (through the gates and, with K = 1, the balance loss alone).
    for name in ("router_shared", "router_routed", "router_groups"):
        if name in gp_d:
            assert float(jnp.abs(gp_d[name]).max()) > 1e-4, name
            assert float(jnp.abs(gp_s[name]).max()) > 1e-4, name


def test_bfloat16_head_sparse_close_to_float32():
    module = MixtureOfHeadsAttention(**MOH, impl="head_sparse", dtype=jnp.bfloat16, block_q=4)
    params = _params(module)
    x = _x()
    y16, _, _ = _apply(module, params, x.astype(jnp.bfloat16), POSITIONS)
    y32, _, _ = _apply(module.clone(dtype=jnp.float32, impl="xla"), params, x, POSITIONS)
    assert y16.dtype == jnp.bfloat16
    _close(y16, y32, atol=5e-2, rtol=5e-2)


# ---------------------------------------------------------------------------------------------
# The three call patterns.
# ---------------------------------------------------------------------------------------------

def test_packed_segments_do_not_interact():
    """head_sparse (the dense path's segment handling is MultiHeadAttention's)."""
    module = MixtureOfHeadsAttention(**MOH, impl="head_sparse", block_q=2)
    params = _params(module)
    x = _x()
    y, _, _ = _apply(module, params, x, POSITIONS, segment_ids=jnp.asarray(SEGMENTS))
    # Each document alone (row 0: tokens 0..2 and 3..6), positions from 0.
    for lo, hi in ((0, 3), (3, 7)):
        alone, _, _ = _apply(module, params, x[:1, lo:hi], np.arange(hi - lo)[None])
        _close(y[0, lo:hi], alone[0], what=f"doc {lo}:{hi}")
    # Changing document 2 changes nothing in document 1.
    x2 = x.at[0, 3:].set(-x[0, 3:])
    y2, _, _ = _apply(module, params, x2, POSITIONS, segment_ids=jnp.asarray(SEGMENTS))
    _close(y2[0, :3], y[0, :3], atol=0, rtol=0)


@pytest.mark.parametrize("impl", ["xla", "head_sparse"])
def test_decode_matches_full_forward(impl):
    module = MixtureOfHeadsAttention(**MOH, impl=impl, block_q=4, sparse_key_block=4)
    params = _params(module)
    x = _x()
    pos = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T))
    full, _, _ = _apply(module, params, x, pos)
    cache = module.init_cache(B, T + 2, EMBED)
    y0, cache, _ = _apply(module, params, x[:, :3], pos[:, :3], cache=cache)
    outs = [y0]
    for i in range(3, T):
        yi, cache, _ = _apply(module, params, x[:, i:i + 1], pos[:, i:i + 1], cache=cache)
        outs.append(yi)
    _close(jnp.concatenate(outs, 1), full)
    np.testing.assert_array_equal(np.asarray(cache.length), [T, T])


def _tree():
    parents = [-1, 0, 0, 1, 2, 2]
    depth = [0, 1, 1, 2, 2, 2]
    n = len(parents)
    anc = np.zeros((n, n), bool)
    for i in range(n):
        j = i
        while j >= 0:
            anc[i, j] = True
            j = parents[j]
    return parents, np.array(depth, np.int32), anc


def test_tree_verification_matches_per_path_decode():
    """head_sparse "loop" (the "batched" and dense paths are compared with it below)."""
    module = MixtureOfHeadsAttention(**MOH, impl="head_sparse", block_q=2, sparse_key_block=3)
    params = _params(module)
    parents, depth, anc = _tree()
    n = len(parents)
    prefix = _x(seed=5, t=4)
    cache = module.init_cache(B, 12, EMBED)
    _, cache, _ = _apply(module, params, prefix, np.broadcast_to(np.arange(4), (B, 4)),
                         cache=cache)
    cache = cache.replace(length=jnp.array([4, 3], jnp.int32))  # rows of different lengths
    lengths = np.array([4, 3])
    x_tree = _x(seed=6, t=n)
    pos_tree = (lengths[:, None] + depth[None]).astype(np.int32)
    y_tree, c_tree, _ = _apply(module, params, x_tree, pos_tree, cache=cache,
                               new_token_mask=jnp.asarray(np.broadcast_to(anc, (B, n, n))))
    np.testing.assert_array_equal(np.asarray(c_tree.length), lengths + n)
    for i in range(n):
        path = [j for j in range(n) if anc[i, j]]  # root-to-leaf (parents precede children)
        c = cache
        for d, j in enumerate(path):
            y, c, _ = _apply(module, params, x_tree[:, j:j + 1], lengths[:, None] + d, cache=c)
        _close(y[:, 0], y_tree[:, i], what=f"node {i}")


def test_head_sparse_cache_matches_xla_cache():
    """Tree verification with a per-head mask, "batched" schedule: both impls agree."""
    kw = {**MOH, "mask": masks.CausalMask() & masks.StridedMask(2, H)}
    dense = MixtureOfHeadsAttention(**kw, impl="xla")
    sparse = MixtureOfHeadsAttention(**kw, impl="head_sparse", block_q=2,
                                     sparse_schedule="batched")
    params = _params(dense)
    _, _, anc = _tree()
    n = anc.shape[0]
    cache = dense.init_cache(B, 12, EMBED)
    _, cache, _ = _apply(dense, params, _x(seed=5, t=4), np.broadcast_to(np.arange(4), (B, 4)),
                         cache=cache)
    x_tree = _x(seed=6, t=n)
    pos = np.broadcast_to(4 + _tree()[1], (B, n))
    mask = jnp.asarray(np.broadcast_to(anc, (B, n, n)))
    y_d, c_d, _ = _apply(dense, params, x_tree, pos, cache=cache, new_token_mask=mask)
    y_s, c_s, _ = _apply(sparse, params, x_tree, pos, cache=cache, new_token_mask=mask)
    _close(y_s, y_d)
    _tree_close(c_s, c_d, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------
# Config validation.
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw,field", [
    (dict(num_shared_heads=7), "num_shared_heads"),
    (dict(num_shared_heads=-1), "num_shared_heads"),
    (dict(num_shared_heads=1, top_k=6), "top_k"),
    (dict(num_shared_heads=1, top_k=0), "top_k"),
    (dict(num_shared_heads=H, top_k=1), "top_k"),
    (dict(routing="dense"), "routing"),
    (dict(router_fn="relu"), "router_fn"),
    (dict(impl="sparse"), "impl"),
    (dict(block_q=0), "block_q"),
    (dict(sparse_schedule="gpu"), "sparse_schedule"),
    (dict(sparse_key_block=0), "sparse_key_block"),
    (dict(query_chunk=0), "query_chunk"),
    (dict(balance_coef=-0.1), "balance_coef"),
    (dict(num_kv_heads=4), "num_kv_heads"),
])
def test_config_errors(kw, field):
    with pytest.raises(ValueError, match=field) as err:
        MixtureOfHeadsAttention(num_heads=H, **kw)
    assert "\n" not in str(err.value)
    value = str(next(iter(v for k, v in kw.items() if k == field)))
    assert value.strip("'") in str(err.value)


def test_key_lengths():
    assert moh._key_lengths(8, 2) == [2, 4, 6, 8]
    assert moh._key_lengths(8, 128) == [8]
    assert moh._key_lengths(4096, 128) == [512 * j for j in range(1, 9)]  # at most 8
    assert moh._key_lengths(1000, 300) == [300, 600, 900, 1000]


def test_defaults():
    m = MixtureOfHeadsAttention(num_heads=8, num_shared_heads=2)
    assert (m.num_routed_heads, m.resolved_top_k, m.active_heads) == (6, 3, 5)
    assert MixtureOfHeadsAttention(num_heads=8, routing="all").active_heads == 8
    assert MixtureOfHeadsAttention(num_heads=4, num_shared_heads=4).resolved_top_k == 0
    assert MixtureOfHeadsAttention(num_heads=4).resolved_schedule == (
        "loop" if jax.default_backend() == "cpu" else "batched")
