"""Tests for effx.attention.kv_policies: budgets, hand-computed cases, compact == masked."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effx.attention import kv_policies as P
from effx.attention import masks as M
from effx.attention.blockwise import blockwise_attention

B, H, KVH, D = 2, 4, 2, 8


def _rand(key, shape):
    return jax.random.normal(jax.random.PRNGKey(key), shape)


def _kept_sets(cache):
    pos = np.asarray(cache.pos)
    return [[set(pos[b, h][pos[b, h] >= 0].tolist()) for h in range(pos.shape[1])]
            for b in range(pos.shape[0])]


def _mask_sets(keep):
    keep = np.asarray(keep)
    return [[set(np.flatnonzero(keep[b, h]).tolist()) for h in range(keep.shape[1])]
            for b in range(keep.shape[0])]


def test_streaming_keep_mask_hand_case():
    keep = P.streaming_keep_mask(jnp.array([10, 3]), 12, num_sinks=2, window=3)
    assert keep.shape == (2, 1, 12)
    assert _mask_sets(keep) == [[{0, 1, 7, 8, 9}], [{0, 1, 2}]]


def test_h2o_keep_mask_hand_case():
    scores = jnp.array([[[5.0, 1.0, 3.0, 0.5, 2.0, 9.0, 0.0, 0.0],
                         [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.0, 0.0]]])
    cand = jnp.ones((1, 2, 8), bool).at[0, 1, 3].set(False)  # slot 3 of head 1 was evicted
    keep = P.h2o_keep_mask(scores, cand, jnp.array([6]), num_heavy=2, num_recent=2)
    assert _mask_sets(keep) == [[{0, 2, 4, 5}, {1, 2, 4, 5}]]


def test_h2o_update_hand_case():
    cache = P.CompactKVCache.create(1, 3, 1, 2)
    cache = cache.replace(pos=jnp.array([[[0, 1, 2]]]), score=jnp.array([[[4.0, 1.0, 2.0]]]),
                          k=jnp.arange(6.0).reshape(1, 3, 1, 2), length=jnp.array([3]))
    k_new = jnp.full((1, 1, 1, 2), 7.0)
    # Mass this step: slot0 +0.1, slot1 +0.5 (-> 1.5 < slot2's 2.0), new token 0.4.
    new = P.h2o_update(cache, k_new, k_new, jnp.array([[[0.1, 0.5, 0.0]]]),
                       jnp.array([[[0.4]]]), num_heavy=2, num_recent=1)
    assert _kept_sets(new) == [[{0, 2, 3}]]  # recent {3}, heavy {0 (4.1), 2 (2.0)}
    order = np.asarray(new.pos[0, 0]).tolist()
    np.testing.assert_allclose(new.score[0, 0], [{0: 4.1, 2: 2.0, 3: 0.4}[p] for p in order])
    np.testing.assert_allclose(new.k[0, :, 0, 0], [{0: 0.0, 2: 4.0, 3: 7.0}[p] for p in order])
    assert int(new.length[0]) == 4


def test_double_sparsity_hand_case():
    q_calib = jnp.array([[[0.1, 5.0, 0.2, 3.0]], [[-0.1, -4.0, 0.1, -3.0]]])  # [N=2, h=1, d=4]
    k_calib = jnp.array([[[1.0, 1.0, 9.0, 1.0]], [[1.0, -1.0, 0.0, 1.0]]])
    # mean|q| = [.1, 4.5, .15, 3], mean|k| = [1, 1, 4.5, 1] -> products [.1, 4.5, .675, 3].
    channels = P.double_sparsity_channels(q_calib, k_calib, 2)
    np.testing.assert_array_equal(channels, [[1, 3]])
    q = jnp.array([[[100.0, 1.0, 100.0, 2.0]]])  # [b=1, h=1, d]
    k = jnp.array([[[1.0, 1.0, 1.0, 0.0]], [[0.0, 0.0, 0.0, 3.0]], [[9.0, 2.0, 9.0, 2.0]],
                   [[0.0, 5.0, 0.0, 5.0]], [[0.0, 9.0, 0.0, 9.0]]])[None]  # [1, L=5, 1, 4]
    scores = P.double_sparsity_scores(q, k, channels)
    np.testing.assert_allclose(scores, [[[1.0, 6.0, 6.0, 15.0, 27.0]]])
    keep = P.double_sparsity_keep_mask(q, k, jnp.array([4]), channels, top_k=2)
    assert _mask_sets(keep) == [[{1, 3}]] or _mask_sets(keep) == [[{2, 3}]]
    assert int(keep.sum()) == 2  # exactly the budget; slot 4 (>= length) never kept
    keep = P.double_sparsity_keep_mask(q, k, jnp.array([1]), channels, top_k=2)
    assert _mask_sets(keep) == [[{0}]]


def test_double_sparsity_gqa_shapes_and_budget():
    q, k = _rand(0, (B, H, D)), _rand(1, (B, 16, KVH, D))
    channels = P.double_sparsity_channels(_rand(2, (32, H, D)), _rand(3, (32, KVH, D)), 3)
    assert channels.shape == (H, 3)
    keep = P.double_sparsity_keep_mask(q, k, jnp.array([16, 9]), channels, top_k=5)
    assert keep.shape == (B, H, 16)
    np.testing.assert_array_equal(keep.sum(-1), 5)
    assert not keep[1, :, 9:].any()
    # Top-k by the approximate scores of each query head's KV head.
    exact = jnp.einsum("bhr,blhr->bhl",
                       jnp.take_along_axis(q, channels[None].repeat(B, 0), -1),
                       jnp.take_along_axis(jnp.repeat(k, 2, 2),
                                           jnp.broadcast_to(channels, (B, 16, H, 3)), -1))
    np.testing.assert_allclose(P.double_sparsity_scores(q, k, channels), exact, rtol=1e-6)


def test_duo_keep_mask_matches_static_duo_mask():
    retrieval = (True, False)
    keep = P.duo_keep_mask(jnp.array([12, 5]), 16, jnp.array(retrieval), num_sinks=2, window=3)
    assert keep.shape == (2, 2, 16)
    assert _mask_sets(keep) == [[set(range(12)), {0, 1, 9, 10, 11}], [set(range(5)), set(range(5))]]
    static = P.duo_attention_mask(retrieval, num_sinks=2, window=3, group_size=2)
    dense = static.dense(12, 12)  # [4 query heads, 12, 12]; last row = the decode view
    for h in range(4):
        np.testing.assert_array_equal(dense[h, 11], keep[0, h // 2, :12])


def test_kept_attention_equals_blockwise_with_kv_mask():
    q, k, v = _rand(0, (B, 1, H, D)), _rand(1, (B, 20, KVH, D)), _rand(2, (B, 20, KVH, D))
    keep = jax.random.bernoulli(jax.random.PRNGKey(4), 0.5, (B, H, 20))
    out, mass = jax.jit(P.kept_attention)(q, k, v, keep)
    ref = jax.jit(lambda q, k, v, m: blockwise_attention(q, k, v, kv_mask=m, block_k=8))(
        q, k, v, keep)
    np.testing.assert_allclose(out, ref, atol=1e-5)
    assert mass.shape == (B, KVH, 20)
    np.testing.assert_allclose(mass.sum(-1), 2.0, rtol=1e-5)  # 2 query heads per KV head
    assert (np.asarray(mass)[np.asarray(~keep.reshape(B, KVH, 2, 20).any(2))] == 0).all()
    shared = P.streaming_keep_mask(jnp.array([20, 13]), 20, num_sinks=2, window=5)  # [B, 1, L]
    out, _ = jax.jit(P.kept_attention)(q, k, v, shared)
    ref = jax.jit(lambda q, k, v, m: blockwise_attention(q, k, v, kv_mask=m, block_k=8))(
        q, k, v, shared)
    np.testing.assert_allclose(out, ref, atol=1e-5)


def _full_cache_write(kc, vc, k_new, v_new, length):
    rows = jnp.arange(kc.shape[0])
    return kc.at[rows, length].set(k_new[:, 0]), vc.at[rows, length].set(v_new[:, 0])


@pytest.mark.parametrize("policy", ["streaming", "h2o"])
def test_compacting_cache_equals_masked_full_cache_over_decode(policy):
    """The compacting cache keeps exactly the budget and reproduces the keep-mask decode."""
    steps, max_len = 14, 16
    sinks, window, heavy, recent = 2, 3, 3, 2
    budget = sinks + window if policy == "streaming" else heavy + recent

    @jax.jit
    def compact_step(cache, q, kn, vn):
        out, mc, mn = P.compact_attention(q, kn, vn, cache)
        if policy == "streaming":
            cache = P.streaming_update(cache, kn, vn, num_sinks=sinks, window=window)
        else:
            cache = P.h2o_update(cache, kn, vn, mc, mn, num_heavy=heavy, num_recent=recent)
        return out, cache

    @jax.jit
    def masked_step(state, q, kn, vn):
        kc, vc, length, scores, keep_prev = state
        kc, vc = _full_cache_write(kc, vc, kn, vn, length)
        new_len = length + 1
        slots = jnp.arange(max_len)
        if policy == "streaming":
            attend = jnp.broadcast_to(
                P.streaming_keep_mask(length, max_len, num_sinks=sinks, window=window)
                | (slots == length[:, None])[:, None], (B, KVH, max_len))
        else:
            attend = keep_prev | (slots == length[:, None])[:, None]
        out, mass = P.kept_attention(q, kc, vc, attend)
        scores = P.accumulate_mass(scores, mass)
        if policy == "streaming":
            keep = jnp.broadcast_to(P.streaming_keep_mask(new_len, max_len, num_sinks=sinks,
                                                          window=window), attend.shape)
        else:
            keep = P.h2o_keep_mask(scores, attend, new_len, num_heavy=heavy, num_recent=recent)
        return out, (kc, vc, new_len, scores, keep)

    cache = P.CompactKVCache.create(B, budget, KVH, D)
    state = (jnp.zeros((B, max_len, KVH, D)), jnp.zeros((B, max_len, KVH, D)),
             jnp.zeros((B,), jnp.int32), jnp.zeros((B, KVH, max_len)),
             jnp.zeros((B, KVH, max_len), bool))
    for step in range(steps):
        q, kn, vn = _rand(3 * step, (B, 1, H, D)), _rand(3 * step + 1, (B, 1, KVH, D)), \
            _rand(3 * step + 2, (B, 1, KVH, D))
        out_c, cache = compact_step(cache, q, kn, vn)
        out_m, state = masked_step(state, q, kn, vn)
        np.testing.assert_allclose(out_c, out_m, atol=1e-5, err_msg=f"step {step}")
        kept = _kept_sets(cache)
        assert kept == _mask_sets(state[4]), f"step {step}"
        assert all(len(s) == min(step + 1, budget) for row in kept for s in row)
        assert cache.k.shape[1] == budget
    if policy == "streaming":
        assert kept[0][0] == {0, 1, steps - 3, steps - 2, steps - 1}
    else:  # H2O heads disagree on the heavy hitters somewhere: per-head selection
        assert any(row[0] != row[1] for row in kept)


def test_streaming_prefill_chunk_is_exact_streaming_llm():
    """A chunk of T > window new tokens: attend-then-evict with the streaming rule as the
    mask equals the static mask causal & (window | sinks) over the whole sequence."""
    sinks, window, t1, t2 = 2, 4, 7, 9
    rule = M.SlidingWindowMask(window) | M.GlobalTokensMask(sinks)
    q, k, v = _rand(0, (B, t1 + t2, H, D)), _rand(1, (B, t1 + t2, KVH, D)), \
        _rand(2, (B, t1 + t2, KVH, D))

    @jax.jit
    def run(q, k, v):
        cache = P.CompactKVCache.create(B, sinks + window, KVH, D)
        outs = []
        for lo, hi in ((0, t1), (t1, t1 + t2)):
            out, _, _ = P.compact_attention(q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], cache,
                                            mask=rule)
            cache = P.streaming_update(cache, k[:, lo:hi], v[:, lo:hi], num_sinks=sinks,
                                       window=window)
            outs.append(out)
        return jnp.concatenate(outs, axis=1), cache

    out, cache = run(q, k, v)
    ref = blockwise_attention(q, k, v, mask=M.CausalMask() & rule, block_q=8, block_k=8)
    np.testing.assert_allclose(out, ref, atol=1e-5)
    assert _kept_sets(cache)[0][0] == {0, 1, 12, 13, 14, 15}


@pytest.mark.parametrize("make,match", [
    (lambda: P.streaming_keep_mask(jnp.array([3]), 8, num_sinks=-1, window=2), "num_sinks=-1"),
    (lambda: P.streaming_keep_mask(jnp.array([3]), 8, num_sinks=1, window=0), "window=0"),
    (lambda: P.h2o_keep_mask(jnp.zeros((1, 1, 4)), jnp.ones((1, 1, 4), bool), jnp.array([2]),
                             num_heavy=-2, num_recent=1), "num_heavy=-2"),
    (lambda: P.streaming_update(P.CompactKVCache.create(1, 4, 1, 2), jnp.zeros((1, 1, 1, 2)),
                                jnp.zeros((1, 1, 1, 2)), num_sinks=1, window=2), "budget 4"),
    (lambda: P.h2o_update(P.CompactKVCache.create(1, 4, 1, 2), jnp.zeros((1, 1, 1, 2)),
                          jnp.zeros((1, 1, 1, 2)), jnp.zeros((1, 1, 4)), jnp.zeros((1, 1, 1)),
                          num_heavy=1, num_recent=1), "budget 4"),
    (lambda: P.double_sparsity_channels(jnp.ones((2, 2, 4)), jnp.ones((2, 1, 4)), 5),
     "num_channels=5"),
    (lambda: P.CompactKVCache.create(1, 0, 1, 2), "budget=0"),
])
def test_validation(make, match):
    with pytest.raises(ValueError, match=match):
        make()
