"""Tests for effx.sharding: mesh sizes, and sharded train steps (data / FSDP / tensor parallel
on 8 virtual CPU devices, in a subprocess) == the same steps on one device."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from effx.sharding import DEFAULT_RULES, MeshConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("cfg,devices,sizes", [
    (MeshConfig(), 8, (8, 1, 1, 1)),
    (MeshConfig(data=-1, fsdp=4), 8, (2, 4, 1, 1)),
    (MeshConfig(data=2, fsdp=-1, tensor=2), 8, (2, 2, 2, 1)),
    (MeshConfig(data=1, tensor=2, expert=-1), 6, (1, 1, 2, 3)),
    (MeshConfig(data=2, fsdp=2, tensor=2, expert=1), 8, (2, 2, 2, 1)),
    (MeshConfig(data=1), 1, (1, 1, 1, 1)),
])
def test_axis_sizes_valid(cfg, devices, sizes):
  assert cfg.axis_sizes(devices) == sizes


@pytest.mark.parametrize("cfg,devices,needles", [
    (MeshConfig(data=2, fsdp=2), 8, ["multiply to 4", "8 devices", "'data': 2", "'fsdp': 2"]),
    (MeshConfig(data=4, tensor=4), 8, ["multiply to 16", "8 devices"]),
    (MeshConfig(data=-1, fsdp=3), 8, ["product 3", "device count 8"]),
    (MeshConfig(data=-1, fsdp=-1), 8, ["at most one axis may be -1"]),
    (MeshConfig(data=0), 8, ["mesh.data: got 0"]),
    (MeshConfig(data=-1, tensor=-2), 8, ["mesh.tensor: got -2"]),
])
def test_axis_sizes_invalid(cfg, devices, needles):
  with pytest.raises(ValueError) as err:
    cfg.axis_sizes(devices)
  msg = str(err.value)
  assert "\n" not in msg
  for needle in needles:
    assert needle in msg, msg


def test_default_rules_cover_the_logical_names():
  names = {name for name, _ in DEFAULT_RULES}
  for name in ("vocab", "embed", "mlp", "heads", "kv_heads", "head_dim", "expert", "layers",
               "norm", "batch"):
    assert name in names


_SCRIPT = textwrap.dedent("""
    import os, sys, json
    assert "jax" not in sys.modules
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import functools
    import jax, numpy as np
    from effx.attention.mha import MultiHeadAttention
    from effx.layers.mlp import GatedMLP
    from effx.model import DecoderLM, block
    from effx.sharding import MeshConfig
    from effx.train import TrainConfig, Trainer

    assert jax.device_count() == 8, jax.devices()
    model = DecoderLM(vocab_size=32, embed_dim=32, num_layers=2, layer_pattern=[block(
        functools.partial(MultiHeadAttention, num_heads=4, num_kv_heads=4),
        functools.partial(GatedMLP, hidden_dim=64))])
    cfg = TrainConfig(steps=10, learning_rate=1e-2, warmup_steps=0, seed=0)
    rng = np.random.default_rng(0)
    seq = rng.integers(0, 32, (8, 17)).astype(np.int32)
    batch = dict(inputs=seq[:, :-1], targets=seq[:, 1:],
                 positions=np.broadcast_to(np.arange(16, dtype=np.int32), (8, 16)).copy(),
                 segment_ids=np.ones((8, 16), np.int32), weights=np.ones((8, 16), np.float32))
    meshes = {"single": (MeshConfig(data=1), jax.devices()[:1]),
              "data": (MeshConfig(data=8), None),
              "fsdp": (MeshConfig(data=2, fsdp=4), None),
              "tensor": (MeshConfig(data=2, tensor=4), None)}
    result = {}
    for name, (mesh_cfg, devices) in meshes.items():
      trainer = Trainer(model, cfg, mesh_cfg, seq_len=16, batch_size=8, devices=devices)
      state = trainer.init_state()
      losses = []
      for _ in range(3):
        state, metrics = trainer.train_step(state, batch)
        losses.append(float(metrics["loss"]))
      layer = state.params["layers"]["block_0"]
      result[name] = dict(
          losses=losses, mesh=dict(trainer.mesh.shape),
          devices=len(state.params["embed"]["embedding"].sharding.device_set),
          # Per-device shard shapes of a few parameters.
          embed=state.params["embed"]["embedding"].addressable_shards[0].data.shape,
          wi=layer["ffn"]["wi"].addressable_shards[0].data.shape,
          query=layer["attention"]["query_kernel"].addressable_shards[0].data.shape)
    print("RESULT " + json.dumps(result))
""")


@pytest.mark.slow
def test_sharded_train_steps_match_one_device():
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
  result = json.loads(line[len("RESULT "):])
  single = result["single"]
  assert single["devices"] == 1
  assert single["losses"][0] > single["losses"][-1]  # the steps do train
  for name in ("data", "fsdp", "tensor"):
    assert result[name]["devices"] == 8, result[name]
    # Same losses within a tolerance that allows a different reduction order: 1e-5 relative.
    for a, b in zip(result[name]["losses"], single["losses"]):
      assert a == pytest.approx(b, rel=1e-5), (name, result[name]["losses"], single["losses"])
  assert result["data"]["mesh"]["data"] == 8
  # The parameters really are laid out by the logical-axis rules: embedding [vocab 32,
  # embed 32], wi [layers 2, embed 32, 2, mlp 64], query [layers 2, embed 32, heads 4, 8].
  assert result["fsdp"]["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1, "expert": 1}
  assert result["data"]["embed"] == [32, 32] and result["data"]["wi"] == [2, 32, 2, 64]
  assert result["fsdp"]["embed"] == [32, 8] and result["fsdp"]["wi"] == [2, 8, 2, 64]
  assert result["tensor"]["embed"] == [8, 32] and result["tensor"]["wi"] == [2, 32, 2, 16]
  assert result["tensor"]["query"] == [2, 32, 1, 8]
