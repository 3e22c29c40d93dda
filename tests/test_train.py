"""Tests for effx.train: a tiny run learns, gradient accumulation == one big batch, a NaN loss
stops the run naming the step without checkpointing the bad state."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effx.attention.mha import MultiHeadAttention
from effx.checkpoint import Checkpointer
from effx.data import DataConfig
from effx.layers.mlp import GatedMLP
from effx.model import DecoderLM, block
from effx.sharding import MeshConfig
from effx.train import NonFiniteLossError, TrainConfig, Trainer, train

VOCAB = 260  # the byte tokenizer's ids fit
MODEL = DecoderLM(vocab_size=VOCAB, embed_dim=32, num_layers=2, layer_pattern=[block(
    functools.partial(MultiHeadAttention, num_heads=2),
    functools.partial(GatedMLP, hidden_dim=64))])
ONE_DEVICE = MeshConfig(data=1)


def _corpus(tmp_path) -> DataConfig:
  """A tiny, very learnable text corpus of 4 files (>= 2 so there is an eval split)."""
  text = "the quick brown fox jumps over the lazy dog. " * 40
  for i in range(4):
    (tmp_path / f"doc{i}.txt").write_text(f"{i}: {text}")
  return DataConfig(paths=str(tmp_path / "*.txt"), seq_len=32, batch_size=4, eval_fraction=0.3,
                    eval_batches=1)


def _cfg(**kwargs) -> TrainConfig:
  base = dict(steps=20, learning_rate=1e-2, warmup_steps=2, checkpoint_every=10, log_every=1,
              eval_every=0, progress_bar=False, weight_decay=0.0)
  return TrainConfig(**(base | kwargs))


def _batch(batch=4, seq=16, seed=0):
  rng = np.random.default_rng(seed)
  s = rng.integers(3, 40, (batch, seq + 1)).astype(np.int32)
  return dict(inputs=s[:, :-1], targets=s[:, 1:],
              positions=np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy(),
              segment_ids=np.ones((batch, seq), np.int32),
              weights=(rng.random((batch, seq)) < 0.9).astype(np.float32))


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.mark.slow
def test_tiny_run_learns_and_checkpoints(tmp_path):
  (tmp_path / "data").mkdir()
  data = _corpus(tmp_path / "data")
  workdir = str(tmp_path / "run")
  logs = []
  result = train(MODEL, _cfg(), ONE_DEVICE, data, workdir, log=logs.append)
  assert result.steps_done == 20 and result.stopped_by == "steps"
  assert result.resumed_from is None
  losses = [m["loss"] for m in _metrics(workdir) if "loss" in m]
  assert len(losses) == 20
  assert np.mean(losses[-3:]) < 0.6 * np.mean(losses[:3]), losses
  assert np.isfinite(result.eval["eval_loss"]) and result.eval["eval_loss"] < losses[0]
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
  assert ckpt.all_steps() == [10, 20]
  ckpt.close()
  assert any("parameters" in line for line in logs)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("corpus")
  _corpus(path)
  return path


def test_grad_accumulation_equals_one_big_batch():
  batch = _batch(batch=4)
  runs, init = {}, None
  for accum in (1, 2):
    trainer = Trainer(MODEL, _cfg(grad_accum_steps=accum, warmup_steps=0, learning_rate=1e-3),
                      ONE_DEVICE, seq_len=16, batch_size=4)
    init = trainer.init_state() if init is None else init  # same params and optimizer state
    state = jax.tree.map(jnp.copy, init)  # train_step donates its state
    metrics = []
    for _ in range(2):
      state, m = trainer.train_step(state, batch)
      metrics.append(jax.device_get(m))
    runs[accum] = (jax.device_get(state.params), metrics)
  (p1, m1), (p2, m2) = runs[1], runs[2]
  for a, b in zip(m1, m2):
    for key in ("loss", "accuracy", "grad_norm", "tokens"):
      np.testing.assert_allclose(a[key], b[key], rtol=1e-5, err_msg=key)
  # Tolerance: float32 summation order only (the micro-batch grads are summed, not averaged).
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), p1, p2)
  assert m1[1]["loss"] < m1[0]["loss"]
  with pytest.raises(ValueError, match="train.grad_accum_steps: 3 does not divide"):
    Trainer(MODEL, _cfg(grad_accum_steps=3), ONE_DEVICE, seq_len=16, batch_size=4)


def test_nan_loss_stops_naming_the_step_without_checkpointing_it(data_dir, tmp_path,
                                                                 monkeypatch):
  """Step 5's batch is poisoned (a token id outside the vocabulary gathers NaN embeddings)."""
  bad_step = 5
  original = Trainer.train_step

  def poisoned(self, state, batch):
    if int(jax.device_get(state.step)) == bad_step - 1:
      batch = dict(batch, inputs=np.full_like(batch["inputs"], VOCAB + 7))
    return original(self, state, batch)

  monkeypatch.setattr(Trainer, "train_step", poisoned)
  data = DataConfig(paths=str(data_dir / "*.txt"), seq_len=32, batch_size=4, eval_fraction=0.3,
                    eval_batches=1)
  workdir = str(tmp_path / "run")
  with pytest.raises(NonFiniteLossError) as err:
    train(MODEL, _cfg(checkpoint_every=2), ONE_DEVICE, data, workdir, log=lambda *_: None)
  msg = str(err.value)
  assert f"at step {bad_step}" in msg and "last checkpoint: step 4" in msg, msg
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
  assert ckpt.all_steps() == [2, 4]
  trainer = Trainer(MODEL, _cfg(), ONE_DEVICE, seq_len=32, batch_size=4)
  step, state = ckpt.restore_latest(trainer.abstract_state, None)
  ckpt.close()
  assert step == 4 and int(state.step) == 4
  assert all(np.isfinite(np.asarray(p)).all() for p in jax.tree.leaves(state.params))
  assert all(np.isfinite(m["loss"]) for m in _metrics(workdir))  # the NaN step is not logged


def test_train_config_errors():
  for kwargs, field in ((dict(steps=0), "train.steps"), (dict(learning_rate=0.0),
                                                        "train.learning_rate"),
                        (dict(end_lr_ratio=2.0), "train.end_lr_ratio"),
                        (dict(warmup_steps=-1), "train.warmup_steps")):
    with pytest.raises(ValueError, match=field):
      TrainConfig(**kwargs)
