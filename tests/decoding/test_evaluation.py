"""Measurement helpers of effx.decoding.evaluation: calibration text, drafting latency, and
the side-by-side speedup comparison."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effx.attention.mha import MultiHeadAttention
from effx.decoding.evaluation import (compare_with_plain, generated_batches,
                                      measure_proposal_latency)
from effx.decoding.generate import generate, pad_prompts
from effx.decoding.head_training import HeadTrainConfig, HeadTrainer, make_proposer
from effx.decoding.head_training import proposer_params
from effx.decoding.speculative import SpeculativeConfig, speculative_generate
from effx.decoding.tree import chain
from effx.layers import GatedMLP
from effx.model import DecoderLM, block

V, E = 20, 32


def tiny():
  model = DecoderLM(vocab_size=V, embed_dim=E, num_layers=1,
                    layer_pattern=(block(functools.partial(MultiHeadAttention, num_heads=2),
                                         functools.partial(GatedMLP, hidden_dim=64)),))
  return model, model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))


def test_generated_batches_hold_the_greedy_continuations():
  model, variables = tiny()
  prompts = [np.array([1, 5, 6, 7]), np.array([1, 9]), np.array([1, 4, 4])]
  batches = generated_batches(model, variables, prompts, max_new_tokens=6, batch_size=2)
  assert len(batches) == 2
  rows = [r for b in batches for r in zip(b["inputs"], b["weights"], b["segment_ids"],
                                          b["targets"])]
  tokens, lengths = pad_prompts(prompts)
  plain = np.asarray(generate(model, variables, tokens, lengths, max_new_tokens=6,
                              max_len=16).tokens)
  for (inputs, weights, segments, targets), prompt, new in zip(rows, prompts, plain):
    n = len(prompt)
    np.testing.assert_array_equal(inputs[:n + 6], np.concatenate([prompt, new]))
    assert segments[:n + 6].all() and not segments[n + 6:].any()
    # weighted positions are exactly those whose target is a generated token
    np.testing.assert_array_equal(np.flatnonzero(weights), np.arange(n - 1, n + 5))
    np.testing.assert_array_equal(targets[weights > 0], new)


def test_proposal_latency_is_measured_per_depth():
  model, variables = tiny()
  for kind in ("medusa", "hydra++"):
    trainer = HeadTrainer(HeadTrainConfig(kind=kind, num_heads=3, num_blocks=2), model,
                          variables)
    params = proposer_params(trainer.heads, trainer.init()[0], variables["params"])
    seconds = measure_proposal_latency(lambda d: make_proposer(trainer.heads, chain(d)), params,
                                       batch=2, depths=(1, 3), embed_dim=E, context=5,
                                       max_len=16, repeats=2)
    assert sorted(seconds) == [1, 3] and all(s > 0 for s in seconds.values())


def test_compare_with_plain_pools_every_batch():
  """Several batches: tokens, match and statistics cover all of them."""
  model, variables = tiny()
  trainer = HeadTrainer(HeadTrainConfig(kind="medusa", num_heads=2), model, variables)
  params = proposer_params(trainer.heads, trainer.init()[0], variables["params"])
  proposer = make_proposer(trainer.heads, chain(2))
  batches = [pad_prompts([np.array([1, 5, 6, 7])]), pad_prompts([np.array([1, 9, 3, 3])])]
  cfg = SpeculativeConfig(max_new_tokens=7, max_len=16)
  result = compare_with_plain(model, variables, "medusa", proposer, params, batches, cfg,
                              repeats=1)
  assert result.outputs_match is True and result.batch == 1
  accepted = [np.asarray(speculative_generate(model, variables, proposer, params, p, n,
                                              cfg).accepted) for p, n in batches]
  active = np.concatenate([a[a >= 0] for a in accepted])
  assert result.stats.steps == active.size > len(accepted[0][accepted[0] >= 0])
  assert result.stats.tau == pytest.approx(np.mean(active + 1))
  assert result.tokens_per_second > 0 and result.baseline_tokens_per_second > 0
