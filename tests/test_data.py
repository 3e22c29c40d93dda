"""Tests for effx/data.py (byte-level grain pipeline)."""

from __future__ import annotations

import os
import time

import grain
import hypothesis
import hypothesis.strategies as st
import numpy as np
import pytest

from effx import data

TOK = data.ByteTokenizer()
KEYS = ("inputs", "targets", "segment_ids", "positions", "weights")


# --------------------------------------------------------------------------- #
# Helpers / fixtures
# --------------------------------------------------------------------------- #


def _write_corpus(root, n_files: int = 7, seed: int = 0) -> list[str]:
    """Writes small random text files (some unicode, one empty); returns their texts in sorted-path order."""
    rng = np.random.default_rng(seed)
    alphabet = list("abcdefghijklmnopqrstuvwxyz \n{}()=:") + ["é", "✓", "🐍"]
    texts = {}
    for i in range(n_files):
        n = 0 if i == 3 else int(rng.integers(20, 120))
        texts[f"doc_{i:02d}.txt"] = "".join(rng.choice(alphabet, size=n))
    os.makedirs(root / "sub", exist_ok=True)
    texts["sub/extra.md"] = "nested file ✓!\n" * 3  # 17 bytes: rows of 16 never repeat
    for name, text in texts.items():
        (root / name).write_text(text, encoding="utf-8")
    return [texts[k] for k in sorted(texts)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    texts = _write_corpus(root)
    pattern = f"{root}/*.txt,{root}/sub/*.md"
    return pattern, texts


def _tiny_cfg(pattern: str, **kw) -> data.DataConfig:
    base = dict(paths=pattern, seq_len=16, batch_size=4, eval_fraction=0.0, eval_batches=2)
    base.update(kw)
    return data.DataConfig(**base)


def _row_keys(batch: dict[str, np.ndarray]) -> list[bytes]:
    return [
        batch["inputs"][i].tobytes() + batch["targets"][i].tobytes() + batch["positions"][i].tobytes()
        for i in range(batch["inputs"].shape[0])
    ]


def _check_batch(batch: dict[str, np.ndarray], batch_size: int, seq_len: int) -> None:
    """All packing invariants of the module docstring."""
    assert set(batch) == set(KEYS)
    for k in KEYS:
        assert batch[k].shape == (batch_size, seq_len), k
        assert batch[k].dtype == (np.float32 if k == "weights" else np.int32), k
    inp, tgt, seg, pos, w = (batch[k] for k in KEYS)
    real = seg > 0
    assert np.all((inp >= 0) & (inp < TOK.vocab_size)) and np.all((tgt >= 0) & (tgt < TOK.vocab_size))
    # targets are the inputs shifted by one.
    np.testing.assert_array_equal(tgt[:, :-1], inp[:, 1:])
    # weights: 1 exactly for real tokens that are not a document's EOS.
    np.testing.assert_array_equal(w, (real & (inp != TOK.EOS_ID)).astype(np.float32))
    assert np.all(w[tgt == TOK.BOS_ID] == 0)  # never predict across documents
    assert np.all(w[tgt == TOK.PAD_ID] == 0)
    # padding only at the tail, with PAD inputs and position 0.
    assert np.all(inp[~real] == TOK.PAD_ID) and np.all(pos[~real] == 0)
    for b in range(batch_size):
        s = seg[b][real[b]]
        assert s[0] == 1 and np.all(np.diff(s) >= 0) and np.all(np.diff(s) <= 1)
        assert not np.any(np.diff(real[b].astype(int)) > 0)  # no real token after padding
        p, x = pos[b], inp[b]
        assert p[0] == 0
        same = seg[b][1:] == seg[b][:-1]
        new_doc = ~same & real[b][1:]
        np.testing.assert_array_equal(p[1:][same & real[b][1:]], p[:-1][same & real[b][1:]] + 1)
        # a new segment inside a row is a new document: starts with BOS at position 0.
        assert np.all(p[1:][new_doc] == 0) and np.all(x[1:][new_doc] == TOK.BOS_ID)
        # every BOS starts a segment at position 0; segments change only after an EOS.
        assert np.all(p[x == TOK.BOS_ID] == 0)
        assert np.all(x[:-1][new_doc] == TOK.EOS_ID)


# --------------------------------------------------------------------------- #
# Tokenizer
# --------------------------------------------------------------------------- #


def test_tokenizer_round_trip_and_specials():
    text = "def f(x):\n    return 'héllo ✓ 🐍'\n"
    ids = TOK.encode(text)
    assert ids.dtype == np.int32 and ids.shape == (len(text.encode()),)
    assert ids.min() >= 3 and ids.max() < 259 and TOK.vocab_size == 259
    assert TOK.decode(ids) == text
    doc = TOK.encode_document(text)
    assert doc.dtype == np.int32 and doc[0] == TOK.BOS_ID and doc[-1] == TOK.EOS_ID
    np.testing.assert_array_equal(doc[1:-1], ids)
    assert TOK.decode(np.concatenate([[0, 1], doc, [2, 0]])) == text
    assert TOK.encode("").shape == (0,) and TOK.decode([]) == ""
    assert TOK.decode([0xFF + 3, ord("a") + 3]) == "\ufffda"  # invalid utf-8 is replaced
    with pytest.raises(ValueError, match="259"):
        TOK.decode([259])


@hypothesis.settings(max_examples=30, deadline=None)
@hypothesis.given(st.text(max_size=40))
def test_tokenizer_round_trip_property(text):
    assert TOK.decode(TOK.encode_document(text)) == text


# --------------------------------------------------------------------------- #
# Config validation and bad paths
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    "field,value",
    [
        ("seq_len", 0),
        ("seq_len", True),
        ("batch_size", -2),
        ("eval_fraction", 1.0),
        ("eval_fraction", -0.1),
        ("seed", -1),
        ("seed", 2**32),
        ("shuffle", "yes"),
        ("eval_batches", 0),
        ("read_threads", -1),
        ("paths", ""),
        ("paths", 3),
    ],
)
def test_config_validation(field, value):
    with pytest.raises(ValueError, match=f"DataConfig.{field}="):
        data.DataConfig(**{field: value})


def test_bad_paths_name_the_field(tmp_path):
    missing = str(tmp_path / "nope.txt")
    with pytest.raises(ValueError, match="paths") as e:
        data.make_train_iterator(data.DataConfig(paths=missing, seq_len=8, batch_size=2))
    assert missing in str(e.value)
    with pytest.raises(ValueError, match="paths.*matches no file"):
        data.make_train_iterator(data.DataConfig(paths=f"{tmp_path}/*.none", seq_len=8, batch_size=2))
    (tmp_path / "a.txt").write_text("")
    (tmp_path / "b.txt").write_text("")
    with pytest.raises(ValueError, match="paths.*empty"):
        data.make_train_iterator(data.DataConfig(paths=f"{tmp_path}/*.txt", seq_len=8, batch_size=2, eval_fraction=0.0))


def test_process_arguments_validated(tiny):
    cfg = _tiny_cfg(tiny[0], batch_size=3)
    with pytest.raises(ValueError, match="batch_size=3.*process_count=2"):
        data.make_train_iterator(cfg, process_index=0, process_count=2)
    with pytest.raises(ValueError, match="process_index=2"):
        data.make_eval_batches(_tiny_cfg(tiny[0]), process_index=2, process_count=2)


# --------------------------------------------------------------------------- #
# Corpus split
# --------------------------------------------------------------------------- #


def test_stdlib_split_deterministic_and_disjoint():
    split = data.corpus_split(None, 0.02)
    again = data.corpus_split(None, 0.02)
    assert split == again
    assert split.eval and split.train
    assert not set(split.train) & set(split.eval)
    assert list(split.train) == sorted(split.train) and list(split.eval) == sorted(split.eval)
    everything = split.train + split.eval
    assert all(p.endswith(".py") for p in everything)
    assert not any("site-packages" in p or "dist-packages" in p for p in everything)
    assert "os.py" in split.train
    # the split hash is sha256 of the relative path: pinned, independent of PYTHONHASHSEED / machine.
    assert data._hash_fraction("os.py") == pytest.approx(0.850948727781281, abs=1e-12)
    assert data._hash_fraction("chunk.py") < 0.02
    assert 0.005 < len(split.eval) / len(everything) < 0.05
    assert all(os.path.isfile(f) for f in split.files("eval"))


def test_user_split_independent_of_location(tmp_path):
    for d in ("x", "y"):
        (tmp_path / d).mkdir()
        for i in range(40):
            (tmp_path / d / f"f{i}.txt").write_text(f"file {i}")
    sx = data.corpus_split(f"{tmp_path}/x/*.txt", 0.2)
    sy = data.corpus_split(f"{tmp_path}/y/*.txt", 0.2)
    assert (sx.train, sx.eval) == (sy.train, sy.eval) and sx.root != sy.root
    assert sx.eval and not set(sx.train) & set(sx.eval)
    # few files: eval still gets one file, train keeps the rest.
    s2 = data.corpus_split(f"{tmp_path}/x/f1.txt,{tmp_path}/x/f2.txt", 0.01)
    assert len(s2.eval) == 1 and len(s2.train) == 1


# --------------------------------------------------------------------------- #
# Batches from the stdlib corpus
# --------------------------------------------------------------------------- #


def test_stdlib_train_batches_and_state_restore():
    cfg = data.DataConfig(seq_len=64, batch_size=4, seed=3)
    t0 = time.perf_counter()
    it = data.make_train_iterator(cfg)
    first = next(it)
    assert time.perf_counter() - t0 < 30  # a few seconds in practice (reads ~30 MB once)
    assert isinstance(it, grain.DatasetIterator)
    _check_batch(first, 4, 64)
    for _ in range(2):
        _check_batch(next(it), 4, 64)
    state = it.get_state()
    expected = [next(it) for _ in range(4)]
    for b in expected:
        _check_batch(b, 4, 64)
    it2 = data.make_train_iterator(cfg)
    it2.set_state(state)
    for want in expected:
        got = next(it2)
        for k in KEYS:
            np.testing.assert_array_equal(got[k], want[k])
    # a different seed gives a different stream.
    other = next(data.make_train_iterator(data.DataConfig(seq_len=64, batch_size=4, seed=4)))
    assert not np.array_equal(other["inputs"], first["inputs"])


def test_stdlib_eval_batches_deterministic():
    cfg = data.DataConfig(seq_len=64, batch_size=4, eval_batches=3)
    a = data.make_eval_batches(cfg)
    b = data.make_eval_batches(data.DataConfig(seq_len=64, batch_size=4, eval_batches=3, seed=9))
    assert len(a) == 3
    for x, y in zip(a, b):
        _check_batch(x, 4, 64)
        for k in KEYS:
            np.testing.assert_array_equal(x[k], y[k])
    # eval rows come from eval files only: the eval stream is a different one.
    rows = data.make_packed_rows(cfg, "eval")
    assert rows.num_docs == len(data.corpus_split(None, 0.02).eval)


# --------------------------------------------------------------------------- #
# Tiny user corpus: exact packing, epochs, shards, eval, orbax
# --------------------------------------------------------------------------- #


def test_user_corpus_packing_reconstructs_documents(tiny):
    pattern, texts = tiny
    cfg = _tiny_cfg(pattern, shuffle=False, batch_size=1)
    rows = data.make_packed_rows(cfg, "train")
    stream = np.concatenate([TOK.encode_document(t) for t in texts])
    assert rows.num_tokens == len(stream) and rows.num_docs == len(texts)
    all_rows = [rows[r] for r in range(len(rows))]
    inputs = np.concatenate([r["inputs"] for r in all_rows])
    targets = np.concatenate([r["targets"] for r in all_rows])
    np.testing.assert_array_equal(inputs[: len(stream)], stream)
    np.testing.assert_array_equal(targets[: len(stream) - 1], stream[1:])
    assert np.all(inputs[len(stream) :] == TOK.PAD_ID)
    # The corpus is built so that the last row is padded: padding is marked.
    assert (rows.num_tokens - 1) % cfg.seq_len != 0
    last = all_rows[-1]
    assert last["segment_ids"][-1] == 0 and last["weights"][-1] == 0
    # Every real next-token pair inside a document has weight 1, exactly once.
    weights = np.concatenate([r["weights"] for r in all_rows])
    assert weights.sum() == sum(len(t.encode()) + 1 for t in texts)
    # The unshuffled iterator yields the rows in order.
    it = data.make_train_iterator(cfg)
    for r in all_rows:
        b = next(it)
        _check_batch(b, 1, cfg.seq_len)
        np.testing.assert_array_equal(b["inputs"][0], r["inputs"])
        np.testing.assert_array_equal(b["positions"][0], r["positions"])
    # A long document continued in the next row restarts at position 0.
    cont = [r for r in all_rows[1:] if r["inputs"][0] != TOK.BOS_ID]
    assert cont and all(r["positions"][0] == 0 for r in cont)


def test_epochs_reshuffle_and_restore_across_epoch(tiny):
    pattern, _ = tiny
    cfg = _tiny_cfg(pattern, batch_size=1, seed=11)
    n = len(data.make_packed_rows(cfg, "train"))
    it = data.make_train_iterator(cfg)
    epoch1 = [_row_keys(next(it))[0] for _ in range(n)]
    state = it.get_state()
    epoch2 = [_row_keys(next(it))[0] for _ in range(n)]
    assert len(set(epoch1)) == n and set(epoch1) == set(epoch2)
    assert epoch1 != epoch2  # reshuffled per epoch
    it2 = data.make_train_iterator(cfg)
    it2.set_state(state)
    assert [_row_keys(next(it2))[0] for _ in range(n)] == epoch2


def test_process_shards_disjoint_and_cover_global_batch(tiny):
    pattern, _ = tiny
    cfg = _tiny_cfg(pattern, batch_size=4, seed=5)
    n = len(data.make_packed_rows(cfg, "train"))
    steps = n // 4
    one = data.make_train_iterator(cfg)
    p0 = data.make_train_iterator(cfg, process_index=0, process_count=2)
    p1 = data.make_train_iterator(cfg, process_index=1, process_count=2)
    seen0, seen1 = set(), set()
    for _ in range(steps):
        b0, b1, g = next(p0), next(p1), next(one)
        _check_batch(b0, 2, cfg.seq_len)
        k0, k1 = _row_keys(b0), _row_keys(b1)
        assert sorted(k0 + k1) == sorted(_row_keys(g))
        seen0.update(k0)
        seen1.update(k1)
    assert len(seen0) == len(seen1) == 2 * steps
    assert not seen0 & seen1


def test_user_eval_batches(tiny, tmp_path):
    pattern, _ = tiny
    cfg = _tiny_cfg(pattern, eval_fraction=0.3, eval_batches=20)  # cycles the few eval rows
    split = data.corpus_split(pattern, 0.3)
    assert split.eval and not set(split.eval) & set(split.train)
    ev = data.make_eval_batches(cfg)
    assert len(ev) == 20
    for b in ev:
        _check_batch(b, 4, 16)
    halves = [data.make_eval_batches(cfg, process_index=p, process_count=2) for p in range(2)]
    for g, (h0, h1) in enumerate(zip(*halves)):
        assert sorted(_row_keys(h0) + _row_keys(h1)) == sorted(_row_keys(ev[g]))
    # eval_fraction=0 (or a single file) has no eval split.
    with pytest.raises(ValueError, match="paths.*eval split is empty"):
        data.make_eval_batches(_tiny_cfg(pattern, eval_fraction=0.0))


def test_orbax_checkpoint_round_trip(tiny, tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    pattern, _ = tiny
    cfg = _tiny_cfg(pattern, seed=2)
    tree = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "step": np.array(7, np.int32)}
    it = data.make_train_iterator(cfg)
    for _ in range(5):
        next(it)
    options = ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False)
    with ocp.CheckpointManager(tmp_path / "ckpt", options=options) as mngr:
        mngr.save(5, args=ocp.args.Composite(state=ocp.args.StandardSave(tree), data=data.iterator_checkpoint_args(it)))
        mngr.wait_until_finished()
    expected = [next(it) for _ in range(3)]

    it2 = data.make_train_iterator(cfg)
    with ocp.CheckpointManager(tmp_path / "ckpt", options=options) as mngr:
        assert mngr.latest_step() == 5
        restored = mngr.restore(
            5,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(tree), data=data.iterator_checkpoint_args(it2, restore=True)
            ),
        )
    np.testing.assert_array_equal(np.asarray(restored["state"]["w"]), tree["w"])
    assert int(restored["state"]["step"]) == 7
    assert restored["data"] is it2
    for want in expected:
        got = next(it2)
        for k in KEYS:
            np.testing.assert_array_equal(got[k], want[k])
