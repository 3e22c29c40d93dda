"""Byte-level language-modelling data pipeline built on grain.

The default corpus is the Python standard library's own ``.py`` source (found
through ``sysconfig``); users point the same pipeline at their own text files
with ``DataConfig.paths`` (comma-separated glob patterns).

Pipeline
--------
1. Files are listed in a deterministic, sorted order and split into train / eval
   *by file*: a file goes to eval iff the sha256 of its path relative to the
   corpus root, read as a fraction in [0, 1), is ``< eval_fraction``.
2. Each file is one document ``BOS + utf-8 bytes + EOS`` (``ByteTokenizer``).
   All documents of a split are read once and concatenated with numpy into one
   ``uint16`` token stream (cached per file set).
3. The stream is cut into rows: row ``r`` covers stream tokens
   ``[r * seq_len, r * seq_len + seq_len + 1)`` (consecutive rows overlap by one
   token, so every next-token target is used exactly once). The tail of the
   last row is padding.
4. A grain ``MapDataset`` over row indices is shuffled (reshuffled every epoch),
   repeated forever, sharded by process and batched; ``to_iter_dataset`` gives a
   checkpointable ``DatasetIterator``.

Batch format (every array ``[batch, seq_len]``):

- ``inputs`` int32: token ids.
- ``targets`` int32: the next token of the stream (``inputs`` shifted by one).
- ``segment_ids`` int32: ``1..n`` numbers the document pieces of a row in order,
  ``0`` = padding. Attention must never cross segment ids.
- ``positions`` int32: position within the document piece. It restarts at 0 at
  every document start (``BOS``) *and* at the first token of every row, i.e. a
  long document continued from the previous row starts again at position 0 (the
  model cannot see the earlier part anyway, and positions stay ``< seq_len``).
- ``weights`` float32: 1 where ``targets`` is the real next token of the same
  document, 0 for padding and for the cross-document target after ``EOS``.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import os
import sysconfig
from typing import Any, ClassVar, Literal, Sequence

import grain
import numpy as np

__all__ = [
    "ByteTokenizer",
    "CorpusSplit",
    "DataConfig",
    "PackedRows",
    "corpus_split",
    "iterator_checkpoint_args",
    "make_eval_batches",
    "make_packed_rows",
    "make_train_iterator",
]

Batch = dict[str, np.ndarray]

# Fixed seed of the eval-row shuffle: the eval set does not depend on cfg.seed.
_EVAL_SHUFFLE_SEED = 0x5EED
_EXCLUDED_STDLIB_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})


# --------------------------------------------------------------------------- #
# Tokenizer
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(frozen=True)
class ByteTokenizer:
    """Byte-level tokenizer: byte ``b`` -> id ``b + 3``; ids 0, 1, 2 are specials.

    ``PAD_ID = 0``, ``BOS_ID = 1``, ``EOS_ID = 2``, ``vocab_size = 259``.
    """

    PAD_ID: ClassVar[int] = 0
    BOS_ID: ClassVar[int] = 1
    EOS_ID: ClassVar[int] = 2
    NUM_SPECIAL: ClassVar[int] = 3
    vocab_size: ClassVar[int] = 256 + 3

    def encode(self, text: str) -> np.ndarray:
        """utf-8 encodes ``text``; returns int32 ``[num_bytes]`` ids (no specials)."""
        data = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
        return data.astype(np.int32) + self.NUM_SPECIAL

    def encode_document(self, text: str) -> np.ndarray:
        """Returns int32 ``[num_bytes + 2]``: ``BOS``, the byte ids, ``EOS``."""
        out = np.empty(len(text.encode("utf-8")) + 2, np.int32)
        out[0] = self.BOS_ID
        out[1:-1] = self.encode(text)
        out[-1] = self.EOS_ID
        return out

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Decodes int ids ``[n]`` to text, dropping specials (invalid utf-8 -> U+FFFD).

        Raises ValueError for ids outside ``[0, vocab_size)``.
        """
        arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            bad = arr[(arr < 0) | (arr >= self.vocab_size)][0]
            raise ValueError(f"ByteTokenizer.decode: id {int(bad)} outside [0, {self.vocab_size})")
        data = (arr[arr >= self.NUM_SPECIAL] - self.NUM_SPECIAL).astype(np.uint8)
        return data.tobytes().decode("utf-8", errors="replace")


# --------------------------------------------------------------------------- #
# Config
# --------------------------------------------------------------------------- #


def _check_int(name: str, value: Any, minimum: int, maximum: int | None = None) -> None:
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    ok = ok and value >= minimum and (maximum is None or value <= maximum)
    if not ok:
        upper = "" if maximum is None else f" and <= {maximum}"
        raise ValueError(f"DataConfig.{name}={value!r}: must be an int >= {minimum}{upper}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Configuration of the byte-level LM pipeline (plain fields, fiddle-friendly).

    Attributes:
      paths: ``None`` for the embedded stdlib corpus, else comma-separated glob
        patterns of text files (``~`` expanded, ``**`` recursive); each pattern
        must match at least one file.
      seq_len: tokens per row (``inputs``/``targets`` are ``[batch, seq_len]``).
      batch_size: global batch size (rows per step over all processes).
      eval_fraction: fraction of files put in the eval split, in ``[0, 1)``.
      seed: shuffle seed, in ``[0, 2**32)``.
      shuffle: shuffle train rows (reshuffled every epoch) or read them in order.
      eval_batches: number of (global) eval batches ``make_eval_batches`` returns.
      read_threads: grain ``ReadOptions.num_threads`` (0 = read in the consumer
        thread; best for this in-memory source).
      prefetch_batches: grain ``ReadOptions.prefetch_buffer_size`` (in batches).
    """

    paths: str | None = None
    seq_len: int = 1024
    batch_size: int = 8
    eval_fraction: float = 0.02
    seed: int = 0
    shuffle: bool = True
    eval_batches: int = 4
    read_threads: int = 0
    prefetch_batches: int = 2

    def __post_init__(self) -> None:
        if self.paths is not None and (not isinstance(self.paths, str) or not self.paths.strip(" ,")):
            raise ValueError(
                f"DataConfig.paths={self.paths!r}: must be None (stdlib corpus) or comma-separated glob patterns"
            )
        _check_int("seq_len", self.seq_len, 1)
        _check_int("batch_size", self.batch_size, 1)
        ef = self.eval_fraction
        if isinstance(ef, bool) or not isinstance(ef, (int, float)) or not 0.0 <= ef < 1.0:
            raise ValueError(f"DataConfig.eval_fraction={ef!r}: must be a float in [0, 1)")
        _check_int("seed", self.seed, 0, 2**32 - 1)
        if not isinstance(self.shuffle, (bool, np.bool_)):
            raise ValueError(f"DataConfig.shuffle={self.shuffle!r}: must be a bool")
        _check_int("eval_batches", self.eval_batches, 1)
        _check_int("read_threads", self.read_threads, 0)
        _check_int("prefetch_batches", self.prefetch_batches, 1)


def _check_process(cfg: DataConfig, process_index: int, process_count: int) -> int:
    """Validates the process arguments; returns the per-process batch size."""
    if isinstance(process_count, bool) or not isinstance(process_count, (int, np.integer)) or process_count < 1:
        raise ValueError(f"process_count={process_count!r}: must be an int >= 1")
    if (
        isinstance(process_index, bool)
        or not isinstance(process_index, (int, np.integer))
        or not 0 <= process_index < process_count
    ):
        raise ValueError(f"process_index={process_index!r}: must be an int in [0, {process_count})")
    if cfg.batch_size % process_count:
        raise ValueError(
            f"DataConfig.batch_size={cfg.batch_size}: must be divisible by process_count={process_count}"
        )
    return cfg.batch_size // process_count


# --------------------------------------------------------------------------- #
# Corpus listing and split
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(frozen=True)
class CorpusSplit:
    """Deterministic by-file train/eval split of a corpus.

    Attributes:
      root: directory the relative paths are relative to.
      train: sorted posix paths (relative to ``root``) of the train files.
      eval: sorted posix paths (relative to ``root``) of the eval files.
    """

    root: str
    train: tuple[str, ...]
    eval: tuple[str, ...]

    def files(self, split: Literal["train", "eval"]) -> tuple[str, ...]:
        """Absolute paths of the files of ``split``."""
        rel = self.train if split == "train" else self.eval
        return tuple(os.path.join(self.root, *r.split("/")) for r in rel)


@functools.lru_cache(maxsize=1)
def _stdlib_files() -> tuple[str, tuple[str, ...]]:
    root = os.path.realpath(sysconfig.get_paths()["stdlib"])
    if not os.path.isdir(root):
        raise ValueError(f"DataConfig.paths=None: stdlib directory {root!r} not found")
    rel: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _EXCLUDED_STDLIB_DIRS]
        for name in filenames:
            if name.endswith(".py"):
                full = os.path.join(dirpath, name)
                if os.path.isfile(full):
                    rel.append(os.path.relpath(full, root).replace(os.sep, "/"))
    return root, tuple(sorted(rel))


def _user_files(paths: str) -> tuple[str, list[str]]:
    found: set[str] = set()
    for pattern in (p.strip() for p in paths.split(",")):
        if not pattern:
            continue
        matches = [
            os.path.realpath(m)
            for m in glob.glob(os.path.expanduser(pattern), recursive=True)
            if os.path.isfile(m)
        ]
        if not matches:
            raise ValueError(f"DataConfig.paths={paths!r}: pattern {pattern!r} matches no file")
        found.update(matches)
    files = sorted(found)
    root = os.path.commonpath([os.path.dirname(f) for f in files])
    return root, sorted(os.path.relpath(f, root).replace(os.sep, "/") for f in files)


def _hash_fraction(rel_path: str) -> float:
    """Stable fraction in [0, 1) from a relative path (sha256, not Python's hash())."""
    digest = hashlib.sha256(rel_path.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def corpus_split(paths: str | None = None, eval_fraction: float = 0.02) -> CorpusSplit:
    """Lists the corpus files and splits them into train / eval by file.

    A file is eval iff ``sha256(relative path) / 2**64 < eval_fraction``. If that
    leaves eval empty while ``eval_fraction > 0`` and there are >= 2 files, the
    file with the smallest hash goes to eval; train always keeps >= 1 file.

    Args:
      paths: ``None`` (stdlib ``.py`` files, excluding site-/dist-packages) or
        comma-separated glob patterns.
      eval_fraction: in ``[0, 1)``.

    User globs are re-listed on every call (new files are picked up); the stdlib
    listing is cached.

    Raises:
      ValueError naming ``paths`` if a pattern matches no file.
    """
    root, rel = _stdlib_files() if paths is None else _user_files(paths)
    if not rel:
        raise ValueError(f"DataConfig.paths={paths!r}: no files found")
    fractions = {r: _hash_fraction(r) for r in rel}
    eval_set = {r for r in rel if fractions[r] < eval_fraction}
    if eval_fraction > 0 and not eval_set and len(rel) >= 2:
        eval_set = {min(rel, key=fractions.__getitem__)}
    if len(eval_set) == len(rel):  # keep at least one train file
        eval_set.discard(max(rel, key=fractions.__getitem__))
    train = tuple(r for r in rel if r not in eval_set)
    return CorpusSplit(root=root, train=train, eval=tuple(r for r in rel if r in eval_set))


# --------------------------------------------------------------------------- #
# Token stream and packed rows
# --------------------------------------------------------------------------- #


@functools.lru_cache(maxsize=4)
def _token_stream(files: tuple[str, ...], stamps: tuple[tuple[int, int], ...]) -> tuple[np.ndarray, np.ndarray]:
    """Reads and tokenizes ``files`` into (uint16 tokens ``[total]``, int64 doc_starts ``[docs + 1]``)."""
    del stamps  # only part of the cache key: a changed file is re-read.
    contents = []
    for f in files:
        with open(f, "rb") as fh:
            contents.append(fh.read())
    byte_lens = np.fromiter((len(c) for c in contents), dtype=np.int64, count=len(contents))
    doc_starts = np.zeros(len(files) + 1, np.int64)
    np.cumsum(byte_lens + 2, out=doc_starts[1:])
    total = int(doc_starts[-1])
    tokens = np.empty(total, np.uint16)
    is_byte = np.ones(total, bool)
    is_byte[doc_starts[:-1]] = False
    is_byte[doc_starts[1:] - 1] = False
    raw = np.frombuffer(b"".join(contents), dtype=np.uint8)
    tokens[is_byte] = raw.astype(np.uint16) + ByteTokenizer.NUM_SPECIAL
    tokens[doc_starts[:-1]] = ByteTokenizer.BOS_ID
    tokens[doc_starts[1:] - 1] = ByteTokenizer.EOS_ID
    tokens.setflags(write=False)
    doc_starts.setflags(write=False)
    return tokens, doc_starts


class PackedRows:
    """Random-access grain source of packed rows over a document token stream.

    Row ``r`` covers stream tokens ``[r * seq_len, r * seq_len + seq_len + 1)``;
    ``self[r]`` is a dict of ``[seq_len]`` arrays with the keys and dtypes of the
    module docstring (``inputs``, ``targets``, ``segment_ids``, ``positions``
    int32; ``weights`` float32).

    Args:
      tokens: uint16/int ``[total]`` concatenated documents.
      doc_starts: int64 ``[num_docs + 1]`` start offset of every document in
        ``tokens`` followed by ``total``.
      seq_len: tokens per row.
    """

    def __init__(self, tokens: np.ndarray, doc_starts: np.ndarray, seq_len: int):
        self.tokens = tokens
        self.doc_starts = doc_starts
        self.seq_len = int(seq_len)
        self.num_tokens = int(doc_starts[-1])
        self.num_docs = len(doc_starts) - 1
        # Targets are stream positions 1..total-1; each row supplies seq_len of them.
        self.num_rows = max(1, -(-(self.num_tokens - 1) // self.seq_len))

    def __len__(self) -> int:
        return self.num_rows

    def __getitem__(self, row: int) -> Batch:
        row = int(row)
        if not 0 <= row < self.num_rows:
            raise IndexError(f"row {row} outside [0, {self.num_rows})")
        n = self.seq_len
        start = row * n
        tok = np.zeros(n + 1, np.int32)  # PAD_ID == 0
        piece = self.tokens[start : start + n + 1]
        tok[: len(piece)] = piece
        idx = np.arange(start, start + n + 1, dtype=np.int64)
        # Document of every stream index; indices >= total map to num_docs (padding).
        doc = np.searchsorted(self.doc_starts, idx, side="right") - 1
        in_doc, tgt_doc = doc[:n], doc[1:]
        real = in_doc < self.num_docs
        seg = np.where(real, in_doc - in_doc[0] + 1, 0)
        piece_start = np.maximum(self.doc_starts[in_doc], start)
        pos = np.where(real, idx[:n] - piece_start, 0)
        return {
            "inputs": tok[:n],
            "targets": tok[1:],
            "segment_ids": seg.astype(np.int32),
            "positions": pos.astype(np.int32),
            "weights": (real & (in_doc == tgt_doc)).astype(np.float32),
        }


def make_packed_rows(cfg: DataConfig, split: Literal["train", "eval"]) -> PackedRows:
    """Reads (cached) and packs the ``split`` files of ``cfg`` into ``PackedRows``.

    Raises:
      ValueError naming ``paths`` for an empty corpus / empty split.
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split={split!r}: must be 'train' or 'eval'")
    cs = corpus_split(cfg.paths, float(cfg.eval_fraction))
    files = cs.files(split)
    if not files:
        why = "set eval_fraction > 0 and give >= 2 files" if split == "eval" else "no train files"
        raise ValueError(
            f"DataConfig.paths={cfg.paths!r} (eval_fraction={cfg.eval_fraction}): {split} split is empty; {why}"
        )
    stamps = []
    for f in files:
        st = os.stat(f)
        stamps.append((st.st_size, st.st_mtime_ns))
    tokens, doc_starts = _token_stream(files, tuple(stamps))
    if int(doc_starts[-1]) == 2 * len(files):
        raise ValueError(f"DataConfig.paths={cfg.paths!r}: the {split} files are all empty")
    return PackedRows(tokens, doc_starts, cfg.seq_len)


# --------------------------------------------------------------------------- #
# Iterators
# --------------------------------------------------------------------------- #


def _global_row_stream(rows: PackedRows, shuffle: bool, seed: int) -> grain.MapDataset:
    """Infinite MapDataset of row dicts: global order, reshuffled every epoch."""
    ds = grain.MapDataset.range(len(rows))
    if shuffle:
        ds = ds.shuffle(seed=seed)
    return ds.repeat(None).map(rows.__getitem__)


def _process_batches(ds: grain.MapDataset, per_process: int, process_index: int, process_count: int) -> grain.MapDataset:
    # Global batch g holds global elements [g*B, (g+1)*B); process p takes the ones
    # with index = p (mod process_count): B/P of them, disjoint across processes.
    return ds[process_index::process_count].batch(per_process, drop_remainder=True)


def make_train_iterator(
    cfg: DataConfig, *, process_index: int = 0, process_count: int = 1
) -> grain.DatasetIterator:
    """Infinite, checkpointable iterator of this process's train batches.

    Each global step's batch is ``cfg.batch_size`` rows of the (per-epoch
    reshuffled, from ``cfg.seed``) train row stream; process ``p`` gets the rows
    with global index ``= p (mod process_count)``, so processes are disjoint and
    their union is the single-process batch.

    Returns:
      ``grain.DatasetIterator`` yielding dicts of ``[cfg.batch_size //
      process_count, cfg.seq_len]`` arrays (see module docstring); supports
      ``get_state()`` / ``set_state()``.

    Raises:
      ValueError if ``batch_size`` is not divisible by ``process_count``, or the
      corpus/split is empty.
    """
    per_process = _check_process(cfg, process_index, process_count)
    rows = make_packed_rows(cfg, "train")
    ds = _process_batches(_global_row_stream(rows, bool(cfg.shuffle), cfg.seed), per_process, process_index, process_count)
    opts = grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=cfg.prefetch_batches)
    return iter(ds.to_iter_dataset(opts))


def make_eval_batches(cfg: DataConfig, *, process_index: int = 0, process_count: int = 1) -> list[Batch]:
    """Exactly ``cfg.eval_batches`` deterministic eval batches for this process.

    Eval rows are shuffled with a fixed seed (independent of ``cfg.seed``) so the
    batches sample many eval files; the result is identical on every call. If
    more rows are needed than the eval split has, the rows are cycled (reshuffled).

    Returns:
      list of dicts of ``[cfg.batch_size // process_count, cfg.seq_len]`` arrays.
    """
    per_process = _check_process(cfg, process_index, process_count)
    rows = make_packed_rows(cfg, "eval")
    ds = _process_batches(_global_row_stream(rows, True, _EVAL_SHUFFLE_SEED), per_process, process_index, process_count)
    return [ds[i] for i in range(cfg.eval_batches)]


def iterator_checkpoint_args(iterator: grain.DatasetIterator, *, restore: bool = False) -> Any:
    """Orbax args to save/restore ``iterator``'s state inside a ``CheckpointManager``.

    Use as one item of ``ocp.args.Composite``, e.g.
    ``mngr.save(step, args=ocp.args.Composite(state=..., data=iterator_checkpoint_args(it)))``
    and ``mngr.restore(step, args=ocp.args.Composite(..., data=iterator_checkpoint_args(it, restore=True)))``;
    restoring sets the state of ``iterator`` in place. The state file is named by
    ``jax.process_index()`` / ``jax.process_count()``.

    Returns:
      ``grain.checkpoint.CheckpointRestore(iterator)`` if ``restore`` else
      ``grain.checkpoint.CheckpointSave(iterator)``.
    """
    import grain.checkpoint as gcp  # CheckpointSave/Restore exist only with orbax installed.

    return gcp.CheckpointRestore(iterator) if restore else gcp.CheckpointSave(iterator)
