"""Every experiment config and fiddler builds a model that trains and decodes consistently."""

from __future__ import annotations

import fiddle as fdl
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effx.train import Trainer
from experiments import configs

FIDDLERS = {
    "dense": lambda c: c,
    "sliding_window": lambda c: configs.with_sliding_window(c, window=5),
    "global_every_2": lambda c: configs.with_global_every(c, every=2, window=5),
    "blockwise": lambda c: configs.with_blockwise(c, block_size=8),
    "linear_elu": lambda c: configs.with_linear_attention(c, "elu", "none", chunk_size=4),
    "linear_retnet": lambda c: configs.with_linear_attention(c, "relu", "retnet", chunk_size=4),
    "linear_gla": lambda c: configs.with_linear_attention(c, "elu", "gla", chunk_size=4),
    "linear_delta": lambda c: configs.with_linear_attention(c, "identity", "delta", chunk_size=4),
    "based": lambda c: configs.with_based(c, feature_dim=4, window=5),
    "moh": lambda c: configs.with_moh(c, num_shared_heads=1, top_k=1),
    "moe": lambda c: configs.with_moe(c, num_experts=4, top_k=2, every=2),
    "moe_shared_capacity": lambda c: configs.with_moe(c, num_experts=4, top_k=1,
                                                      num_shared_experts=1, dispatch="capacity",
                                                      capacity_factor=4.0,
                                                      eval_capacity_factor=4.0),
}


def tiny(fiddler) -> fdl.Config:
  cfg = configs.lm_tiny()
  cfg.model.embed_dim = 32
  cfg.model.num_layers = 2
  cfg.model.layer_pattern[0].attention.num_heads = 2
  cfg.model.layer_pattern[0].ffn.hidden_dim = 64
  cfg.data.seq_len = 16
  cfg.data.batch_size = 2
  cfg.heads = []
  return fiddler(cfg)


@pytest.mark.parametrize("name", sorted(FIDDLERS))
def test_decoding_token_by_token_equals_full_forward(name):
  exp = fdl.build(tiny(FIDDLERS[name]))
  model = exp.model
  tokens = jnp.asarray(np.random.RandomState(0).randint(3, 200, (2, 12)), jnp.int32)
  variables = model.init(jax.random.key(0), tokens)
  full = model.apply(variables, tokens).logits
  cache = model.init_cache(2, 16)
  out = model.apply(variables, tokens[:, :7], cache=cache)
  logits, cache = [out.logits], out.cache
  for t in range(7, 12):
    out = model.apply(variables, tokens[:, t:t + 1], cache=cache)
    logits.append(out.logits)
    cache = out.cache
  np.testing.assert_allclose(np.asarray(jnp.concatenate(logits, 1)), np.asarray(full),
                             atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("name", ["dense", "linear_gla", "moh", "moe"])
def test_a_train_step_lowers_the_loss(name):
  exp = fdl.build(tiny(FIDDLERS[name]))
  trainer = Trainer(exp.model, exp.train, exp.mesh, exp.data.seq_len, exp.data.batch_size,
                    devices=jax.devices()[:1])
  state = trainer.init_state()
  rs = np.random.RandomState(1)
  inputs = np.tile(rs.randint(3, 200, (2, 4)), (1, 4)).astype(np.int32)  # periodic: learnable
  batch = dict(inputs=inputs, targets=np.roll(inputs, -1, 1),
               positions=np.broadcast_to(np.arange(16, dtype=np.int32), (2, 16)).copy(),
               segment_ids=np.ones((2, 16), np.int32), weights=np.ones((2, 16), np.float32))
  losses = []
  for _ in range(8):
    state, metrics = trainer.train_step(state, batch)
    losses.append(float(metrics["loss"]))
  assert np.isfinite(losses).all() and losses[-1] < losses[0]
  if name == "moe":
    assert "moe/drop_rate" in metrics and "moe/expert_load" in metrics
  if name == "moh":
    assert float(metrics["aux_loss"]) > 0


@pytest.mark.parametrize("factory", [configs.lm_tiny, configs.lm_small, configs.lm_1b])
def test_named_configs_build(factory):
  exp = fdl.build(factory())
  assert exp.model.num_layers >= 2 and exp.data.seq_len >= 256
