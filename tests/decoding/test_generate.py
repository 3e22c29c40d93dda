"""Tests for effx.decoding.generate / sampling: greedy == hand-rolled argmax with full
forwards, per-row EOS, seeded sampling, top-k=1 == greedy, prompt validation."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effx.attention import masks as M
from effx.attention.mha import MultiHeadAttention
from effx.decoding.generate import generate, pad_prompts, validate_prompts
from effx.decoding.sampling import SamplingConfig, sample, warp_logits
from effx.layers.mlp import GatedMLP
from effx.model import DecoderLM, block

VOCAB, EMBED, NEW, MAX_LEN = 32, 16, 6, 16
PAD = -1  # a filler no real token equals

MODEL = DecoderLM(
    vocab_size=VOCAB, embed_dim=EMBED, num_layers=2,
    layer_pattern=[block(functools.partial(MultiHeadAttention, num_heads=4, num_kv_heads=2),
                         functools.partial(GatedMLP, hidden_dim=32)),
                   block(functools.partial(MultiHeadAttention, num_heads=4,
                                           mask=M.CausalMask() & M.SlidingWindowMask(3)),
                         functools.partial(GatedMLP, hidden_dim=32))])
PROMPTS, LENGTHS = pad_prompts([np.array([3, 7, 1, 30, 2]), np.array([5, 9]),
                                np.array([11, 4, 4, 8])])


@functools.cache
def variables():
  shapes = nn.unbox(jax.eval_shape(MODEL.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape) * 0.5, s.dtype), shapes)


def _generate(**kwargs):
  kwargs = dict(max_new_tokens=NEW, max_len=MAX_LEN, pad_id=PAD) | kwargs
  return generate(MODEL, variables(), PROMPTS, LENGTHS, **kwargs)


@functools.cache
def greedy_by_hand() -> np.ndarray:
  """Argmax rollout with full forwards (no cache): int [batch, NEW]."""
  width = PROMPTS.shape[1] + NEW
  buf = np.zeros((len(LENGTHS), width), np.int32)
  buf[:, :PROMPTS.shape[1]] = PROMPTS
  forward = jax.jit(lambda v, t: MODEL.apply(v, t).logits)
  rows = np.arange(len(LENGTHS))
  out = np.zeros((len(LENGTHS), NEW), np.int32)
  for i in range(NEW):
    # Causal: the junk after each row's end cannot affect the logits read at its end.
    logits = np.asarray(forward(variables(), jnp.asarray(buf)))
    tok = logits[rows, LENGTHS + i - 1].argmax(-1)
    buf[rows, LENGTHS + i] = tok
    out[:, i] = tok
  return out


def test_greedy_equals_argmax_rollout_with_full_forwards():
  out = _generate()
  expected = greedy_by_hand()
  np.testing.assert_array_equal(np.asarray(out.tokens), expected)
  assert np.asarray(out.lengths).tolist() == [NEW] * 3
  assert int(out.steps) == NEW
  assert len({tuple(r) for r in expected}) > 1  # rows really differ


def test_per_row_eos_stop():
  expected = greedy_by_hand()
  # An EOS id that ends some rows early and others not (or later).
  first = lambda row, tok: next((i for i, t in enumerate(row) if t == tok), None)
  candidates = [t for t in np.unique(expected[:, :NEW - 1])
                if len({first(r, t) for r in expected}) > 1]
  assert candidates, expected
  eos = int(candidates[0])
  out = _generate(eos_id=eos)
  tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
  for r, row in enumerate(expected):
    stop = first(row, eos)
    n = NEW if stop is None else stop + 1
    assert lengths[r] == n
    np.testing.assert_array_equal(tokens[r, :n], row[:n])
    np.testing.assert_array_equal(tokens[r, n:], PAD)
  # When every row has stopped the loop ends early.
  last_stop = max(first(r, eos) if first(r, eos) is not None else NEW for r in expected)
  assert int(out.steps) == min(last_stop + 1, NEW)


def test_loop_ends_when_every_row_has_stopped():
  expected = greedy_by_hand()
  first = lambda row, tok: next((i for i, t in enumerate(row) if t == tok), None)
  # A token and a subset of rows that all emit it before the budget runs out.
  for tok in np.unique(expected[:, :NEW - 1]):
    rows = [r for r in range(len(expected)) if first(expected[r, :NEW - 1], tok) is not None]
    if len(rows) >= 2:
      break
  else:
    pytest.fail(f"no token shared by two rows: {expected}")
  out = generate(MODEL, variables(), PROMPTS[rows], LENGTHS[rows], max_new_tokens=NEW,
                 max_len=MAX_LEN, eos_id=int(tok), pad_id=PAD)
  stops = [first(expected[r], tok) + 1 for r in rows]
  assert np.asarray(out.lengths).tolist() == stops
  assert int(out.steps) == max(stops) < NEW


def test_seeded_sampling_repeats_and_top_k_1_is_greedy():
  cfg = SamplingConfig(temperature=1.0, top_k=8, top_p=0.9)
  a = _generate(sampling=cfg, key=jax.random.key(1))
  b = _generate(sampling=cfg, key=jax.random.key(1))
  c = _generate(sampling=cfg, key=jax.random.key(2))
  np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
  assert not np.array_equal(np.asarray(a.tokens), np.asarray(c.tokens))
  top1 = _generate(sampling=SamplingConfig(temperature=0.7, top_k=1), key=jax.random.key(3))
  np.testing.assert_array_equal(np.asarray(top1.tokens), greedy_by_hand())


def test_warp_logits():
  logits = jnp.log(jnp.asarray([[0.5, 0.25, 0.15, 0.1]]))
  greedy = warp_logits(logits, SamplingConfig())
  np.testing.assert_array_equal(np.asarray(greedy), [[0, -np.inf, -np.inf, -np.inf]])
  top2 = np.exp(np.asarray(warp_logits(logits, SamplingConfig(temperature=1.0, top_k=2))))
  np.testing.assert_allclose(top2, [[2 / 3, 1 / 3, 0, 0]], rtol=1e-5)
  # top_p 0.7: 0.5 alone is short of 0.7, 0.5 + 0.25 reaches it -> two tokens.
  topp = np.exp(np.asarray(warp_logits(logits, SamplingConfig(temperature=1.0, top_p=0.7))))
  np.testing.assert_allclose(topp, [[2 / 3, 1 / 3, 0, 0]], rtol=1e-5)
  hot = np.exp(np.asarray(warp_logits(logits, SamplingConfig(temperature=2.0))))
  ref = np.sqrt([0.5, 0.25, 0.15, 0.1])
  np.testing.assert_allclose(hot[0], ref / ref.sum(), rtol=1e-5)
  keys = jax.random.split(jax.random.key(0), 1)
  assert int(sample(keys, logits, SamplingConfig(temperature=1.0, top_k=1))[0]) == 0
  with pytest.raises(ValueError, match="sampling.top_p"):
    SamplingConfig(top_p=0.0)
  with pytest.raises(ValueError, match="sampling.temperature"):
    SamplingConfig(temperature=-1.0)


def _one_line(match, fn):
  with pytest.raises(ValueError, match=match) as err:
    fn()
  assert "\n" not in str(err.value)


def test_prompt_errors_are_one_line_value_errors():
  # Prompt + new tokens longer than the cache.
  _one_line(r"max_len: .*5 tokens plus 12 new tokens.*max_len is 16",
            lambda: _generate(max_new_tokens=12))
  # An empty prompt.
  prompts, lengths = pad_prompts([np.array([1, 2]), np.array([], np.int32)])
  _one_line("prompt_lengths: every prompt needs at least one token",
            lambda: generate(MODEL, variables(), prompts, lengths, max_new_tokens=2, max_len=8))
  # A token id outside the vocabulary (only real tokens count, padding is ignored).
  bad = PROMPTS.copy()
  bad[1, 1] = VOCAB
  _one_line(rf"prompts: token ids must be in \[0, {VOCAB}\), got \[{VOCAB}\]",
            lambda: generate(MODEL, variables(), bad, LENGTHS, max_new_tokens=2, max_len=16))
  bad[1, 3] = VOCAB + 5  # beyond row 1's length 2: padding, not checked
  bad[1, 1] = 0
  validate_prompts(bad, LENGTHS, 2, 16, VOCAB)
  _one_line("max_new_tokens: got 0", lambda: validate_prompts(PROMPTS, LENGTHS, 0, 16, VOCAB))
  _one_line("prompts: must be integer",
            lambda: validate_prompts(PROMPTS.astype(np.float32), LENGTHS, 2, 16, VOCAB))
