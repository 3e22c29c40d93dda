"""Tests for effx.attention.masks: dense == __call__ == hand-built numpy, exact block layouts."""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from effx.attention import masks as M

_SEG_IDS = np.array([1, 1, 1, 2, 2, 0, 3, 3, 3, 3, 3, 4, 0, 0, 5, 5, 5, 5, 5, 6, 6, 6, 6])
_LAYOUT3 = np.array([[[1, 0, 1, 1], [0, 1, 0, 0], [1, 1, 1, 0]],
                     [[0, 0, 0, 1], [1, 1, 1, 1], [0, 1, 0, 1]]], bool)


def _seg(ids, p):
    return ids[p] if 0 <= p < ids.size else 0


# name -> (mask, hand-built reference ref(head, q, k) -> bool)
CASES = {
    "full": (M.FullMask(), lambda h, q, k: True),
    "causal": (M.CausalMask(), lambda h, q, k: k <= q),
    "window": (M.SlidingWindowMask(3), lambda h, q, k: 0 <= q - k < 3),
    "causal&window": (M.CausalMask() & M.SlidingWindowMask(4), lambda h, q, k: 0 <= q - k < 4),
    "global": (M.GlobalTokensMask(2), lambda h, q, k: q < 2 or k < 2),
    "causal&localglobal": (M.CausalMask() & M.LocalGlobalMask(3, 2),
                           lambda h, q, k: k <= q and (q - k < 3 or k < 2)),
    "strided": (M.StridedMask(3, 4, local_window=2),
                lambda h, q, k: (q - k) % 3 == h % 3 or 0 <= q - k < 2),
    "causal&strided": (M.CausalMask() & M.StridedMask(2, 3, local_window=0),
                       lambda h, q, k: k <= q and (q - k) % 2 == h % 2),
    "blocksparse_fn": (M.BlockSparseMask(lambda a, b: (a + b) % 3 == 0, 3),
                       lambda h, q, k: (q // 3 + k // 3) % 3 == 0),
    "blocksparse_arr": (M.BlockSparseMask(_LAYOUT3[0], 4),
                        lambda h, q, k: q // 4 < 3 and k // 4 < 4 and _LAYOUT3[0][q // 4, k // 4]),
    "blocksparse_heads": (M.BlockSparseMask(_LAYOUT3, 5),
                          lambda h, q, k: q // 5 < 3 and k // 5 < 4
                          and _LAYOUT3[h][q // 5, k // 5]),
    "perhead": (M.PerHeadMask((M.CausalMask(), M.SlidingWindowMask(2), M.StridedMask(2, 2))),
                lambda h, q, k: [k <= q, 0 <= q - k < 2, (q - k) % 2 == 0 or q == k,
                                 (q - k) % 2 == 1 or q == k][h]),
    "segment": (M.SegmentMask(_SEG_IDS),
                lambda h, q, k: _seg(_SEG_IDS, q) == _seg(_SEG_IDS, k) != 0),
    "causal&segment|global": (M.CausalMask() & (M.SegmentMask(_SEG_IDS) | M.GlobalTokensMask(3)),
                              lambda h, q, k: k <= q and (q < 3 or k < 3 or
                                                          _seg(_SEG_IDS, q) == _seg(_SEG_IDS, k) != 0)),
    "not_window": (~M.SlidingWindowMask(5), lambda h, q, k: not 0 <= q - k < 5),
    "strided|global": (M.StridedMask(4, 4, 0) | M.GlobalTokensMask(1),
                       lambda h, q, k: (q - k) % 4 == h or q < 1 or k < 1),
    "causal&bigbird_noglobal_norandom": (M.CausalMask() & M.BigBirdMask(3, 0, 0, 4),
                                         lambda h, q, k: 0 <= q - k < 3),
}


def _hand(mask, ref, q_positions, k_positions):
    heads = mask.num_heads or 1
    return np.array([[[bool(ref(h, int(q), int(k))) for k in k_positions] for q in q_positions]
                     for h in range(heads)], bool)


def _layout_from_dense(dense, bq, bk):
    h, ql, kl = dense.shape
    nq, nk = -(-ql // bq), -(-kl // bk)
    out = np.zeros((h, nq, nk), np.int8)
    for i in range(nq):
        for j in range(nk):
            tile = dense[:, i * bq:(i + 1) * bq, j * bk:(j + 1) * bk]
            out[:, i, j] = np.where(tile.all(axis=(1, 2)), 2, np.where(tile.any(axis=(1, 2)), 1, 0))
    return out


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("q_len,kv_len", [(17, 17), (9, 23), (23, 9)])
def test_dense_matches_hand_built(name, q_len, kv_len):
    mask, ref = CASES[name]
    dense = mask.dense(q_len, kv_len)
    assert dense.dtype == bool and dense.shape == (mask.num_heads or 1, q_len, kv_len)
    np.testing.assert_array_equal(dense, _hand(mask, ref, range(q_len), range(kv_len)))


@pytest.mark.parametrize("name", sorted(CASES))
def test_call_matches_hand_built_at_arbitrary_positions(name):
    mask, ref = CASES[name]
    q_pos = np.array([[0, 3, 4, 9, 15], [20, 21, 22, 5, 1]], np.int32)
    kv_pos = np.array([[0, 1, 2, 3, 4, 5, 8, 9, 14, 15, 30],
                       [19, 20, 21, 22, 0, 1, 2, 5, 6, 7, 8]], np.int32)
    got = jax.jit(mask.__call__)(q_pos, kv_pos)
    assert got.dtype == jnp.bool_ and got.shape == (2, mask.num_heads or 1, 5, 11)
    for b in range(2):
        np.testing.assert_array_equal(np.asarray(got[b]), _hand(mask, ref, q_pos[b], kv_pos[b]))


@pytest.mark.parametrize("name", sorted(CASES))
def test_call_equals_dense_on_default_positions(name):
    mask, _ = CASES[name]
    q = jnp.arange(13, dtype=jnp.int32)[None]
    k = jnp.arange(19, dtype=jnp.int32)[None]
    np.testing.assert_array_equal(np.asarray(mask(q, k))[0], mask.dense(13, 19))


_BIGBIRD = M.CausalMask() & M.BigBirdMask(window=3, num_global=2, num_random_blocks=2,
                                          block_size=4, seed=7)


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(sorted(CASES) + ["bigbird"]),
       q_len=st.integers(1, 40), kv_len=st.integers(1, 40),
       bq=st.integers(1, 11), bk=st.integers(1, 11))
def test_block_layout_consistent_with_dense(name, q_len, kv_len, bq, bk):
    mask = _BIGBIRD if name == "bigbird" else CASES[name][0]
    layout = mask.block_layout(q_len, kv_len, bq, bk)
    assert layout.dtype == np.int8
    np.testing.assert_array_equal(layout, _layout_from_dense(mask.dense(q_len, kv_len), bq, bk))


def test_algebra():
    a = M.CausalMask()
    b = M.StridedMask(2, 3)
    c = M.GlobalTokensMask(2)
    da, db, dc = a.dense(12, 14), b.dense(12, 14), c.dense(12, 14)
    np.testing.assert_array_equal((a & b).dense(12, 14), da & db)
    np.testing.assert_array_equal((a | b).dense(12, 14), da | db)
    np.testing.assert_array_equal((~a | c).dense(12, 14), ~da | dc)
    np.testing.assert_array_equal(((a | c) & b).dense(12, 14), (da | dc) & db)
    assert (a & b).num_heads == 3 and (a | c).num_heads is None
    assert (a & b).block_layout(12, 14, 4, 4).shape == (3, 3, 4)
    assert (a & M.SlidingWindowMask(3)) == (M.CausalMask() & M.SlidingWindowMask(3))
    assert hash(a & M.SlidingWindowMask(3)) == hash(M.CausalMask() & M.SlidingWindowMask(3))
    with pytest.raises(ValueError, match="num_heads"):
        _ = M.StridedMask(2, 3) & M.StridedMask(2, 4)
    assert (a & M.SlidingWindowMask(3) | ~b).is_relative
    assert not (a & c).is_relative and not M.SegmentMask([1, 1]).is_relative
    assert not M.BigBirdMask(2, 0, 1, 4).is_relative and M.BigBirdMask(2, 0, 0, 4).is_relative


def test_masks_are_static_jit_arguments():
    f = jax.jit(lambda m, q, k: m(q, k), static_argnums=0)
    q = jnp.arange(6, dtype=jnp.int32)[None]
    for mask in (M.CausalMask() & M.SlidingWindowMask(2), M.SegmentMask([1, 1, 2, 2, 2, 0]),
                 M.BlockSparseMask(np.eye(2, dtype=bool), 3), _BIGBIRD):
        np.testing.assert_array_equal(np.asarray(f(mask, q, q))[0], mask.dense(6, 6))
    assert M.SegmentMask([1, 2]) == M.SegmentMask(np.array([1, 2]))
    assert M.BlockSparseMask(np.eye(2), 3) != M.BlockSparseMask(np.eye(2), 2)


@pytest.mark.parametrize("stride,heads", [(1, 1), (3, 3), (4, 6)])
def test_strided_union_covers_causal_context(stride, heads):
    mask = M.CausalMask() & M.StridedMask(stride, heads, local_window=0)
    dense = mask.dense(40, 40)
    np.testing.assert_array_equal(dense.any(axis=0), M.CausalMask().dense(40, 40)[0])
    # Each head is a disjoint residue class when heads == stride.
    if heads == stride:
        assert dense.sum(axis=0).max() == 1
    # Fewer heads than the stride leave holes.
    assert not (M.CausalMask() & M.StridedMask(3, 2, 0)).dense(10, 10).any(axis=0)[5, 3]


def test_bigbird_deterministic_per_seed_and_block_structure():
    def bb(seed):
        return M.BigBirdMask(window=2, num_global=1, num_random_blocks=2, block_size=4, seed=seed)

    d1 = bb(3).dense(64, 64)
    np.testing.assert_array_equal(d1, bb(3).dense(64, 64))
    assert not np.array_equal(d1, bb(4).dense(64, 64))
    # BigBird = window | global | random blocks; the random part is block-constant, with at
    # most 2 distinct key blocks per query block, drawn from blocks 0..query block.
    rand = M._RandomBlocksMask(2, 4, 3).dense(64, 64)[0]
    base = (M.SlidingWindowMask(2) | M.GlobalTokensMask(1)).dense(64, 64)[0]
    np.testing.assert_array_equal(d1[0], base | rand)
    coarse = rand.reshape(16, 4, 16, 4)
    assert (coarse.all(axis=(1, 3)) == coarse.any(axis=(1, 3))).all()
    coarse = coarse.any(axis=(1, 3))
    assert (coarse.sum(axis=1) >= 1).all() and (coarse.sum(axis=1) <= 2).all()
    assert (coarse.sum(axis=1) == 2).any()
    assert not np.triu(coarse, 1).any()
    # Same answer at large positions under jit as in numpy (length-independent draws).
    q = jnp.arange(4000, 4064, dtype=jnp.int32)[None]
    k = jnp.arange(0, 4064, 8, dtype=jnp.int32)[None]
    got = np.asarray(jax.jit(bb(3).__call__)(q, k))[0, 0]
    np.testing.assert_array_equal(got, bb(3).dense(4064, 4064)[0][4000:, ::8])


def test_segment_mask_function_matches_segment_mask_object():
    ids = np.array([[1, 1, 2, 2, 2, 0], [3, 3, 3, 0, 0, 0]], np.int32)
    got = np.asarray(jax.jit(M.segment_mask)(ids, ids))
    assert got.shape == (2, 1, 6, 6)
    for b in range(2):
        np.testing.assert_array_equal(got[b], M.SegmentMask(ids[b]).dense(6, 6))
    assert not got[0, 0, 5].any() and not got[0, 0, :, 5].any()  # padding is isolated


def test_block_sparse_array_out_of_range_is_forbidden():
    mask = M.BlockSparseMask(np.ones((2, 2), bool), 4)
    d = mask.dense(12, 12)[0]
    assert d[:8, :8].all() and not d[8:].any() and not d[:, 8:].any()


@pytest.mark.parametrize("make,match", [
    (lambda: M.SlidingWindowMask(0), "SlidingWindowMask.window=0"),
    (lambda: M.SlidingWindowMask(-3), "window=-3"),
    (lambda: M.StridedMask(0, 4), "StridedMask.stride=0"),
    (lambda: M.StridedMask(2, 0), "StridedMask.num_heads=0"),
    (lambda: M.StridedMask(2, 2, local_window=-1), "local_window=-1"),
    (lambda: M.GlobalTokensMask(0), "num_global=0"),
    (lambda: M.LocalGlobalMask(0, 2), "LocalGlobalMask.window=0"),
    (lambda: M.BigBirdMask(2, 1, -1, 4), "num_random_blocks=-1"),
    (lambda: M.BigBirdMask(2, 1, 1, 0), "block_size=0"),
    (lambda: M.BlockSparseMask(np.ones(3), 2), "BlockSparseMask.layout"),
    (lambda: M.BlockSparseMask(np.ones((2, 2)), 0), "block_size=0"),
    (lambda: M.PerHeadMask(()), "PerHeadMask.masks"),
    (lambda: M.SegmentMask(np.ones((2, 3))), "SegmentMask.q_segment_ids"),
    (lambda: M.CausalMask().block_layout(8, 8, 0, 2), "block_q=0"),
    (lambda: M.SlidingWindowMask(2.5), "window=2.5"),
])
def test_validation_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_block_layouts_at_16k_are_cheap_and_exact():
    n, b = 16384, 128
    nq = n // b
    start = time.perf_counter()
    causal = M.CausalMask().block_layout(n, n, b, b)[0]
    assert (causal == 2).sum() == nq * (nq - 1) // 2 and (causal == 1).sum() == nq
    window = (M.CausalMask() & M.SlidingWindowMask(1000)).block_layout(n, n, b, b)[0]
    assert ((window > 0).sum(axis=1) <= 1000 // b + 2).all()
    strided = (M.CausalMask() & M.StridedMask(4, 8)).block_layout(n, n, b, b)
    assert strided.shape == (8, nq, nq)
    bigbird = (M.CausalMask() & M.BigBirdMask(256, 128, 3, 64, seed=1)).block_layout(n, n, b, b)[0]
    assert (bigbird[1:, 0] == 2).all() and (bigbird > 0).sum() < nq * nq // 4
    # A composition with ambiguous tiles is refined tile by tile.
    seg_ids = np.repeat(np.arange(1, 17), n // 16)
    seg = (M.CausalMask() & M.SegmentMask(seg_ids)).block_layout(n, n, b, b)[0]
    assert (seg > 0).sum() == 16 * (8 * 9 // 2)
    ids = np.arange(n) // 1000 + 1  # document edges inside tiles -> ambiguous tiles refined
    mask = M.CausalMask() & M.SegmentMask(ids)
    layout = mask.block_layout(n, n, b, b)[0]
    rng = np.random.default_rng(0)
    for i, j in zip(rng.integers(0, nq, 40).tolist() + list(range(nq)),
                    rng.integers(0, nq, 40).tolist() + list(range(nq))):
        q, k = np.arange(i * b, (i + 1) * b), np.arange(j * b, (j + 1) * b)
        tile = (q[:, None] >= k[None, :]) & (ids[q][:, None] == ids[k][None, :])
        assert layout[i, j] == (2 if tile.all() else 1 if tile.any() else 0), (i, j)
    assert time.perf_counter() - start < 30
