"""effx.hf_import against transformers' own outputs (tests/fixtures/hf, see
scripts/make_hf_fixtures.py): logits, greedy continuations, export round trips, errors, Medusa."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from effx import hf_import
from effx.decoding.generate import generate

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "hf")
NAMES = ("llama", "qwen2", "mistral")


def fixture(name: str) -> tuple[str, np.ndarray, np.ndarray, np.ndarray]:
  d = os.path.join(FIXTURES, name)
  return (d, np.load(os.path.join(d, "tokens.npy")), np.load(os.path.join(d, "logits.npy")),
          np.load(os.path.join(d, "greedy.npy")))


@pytest.mark.parametrize("name", NAMES)
def test_logits_and_greedy_match_transformers(name):
  d, tokens, expected, greedy = fixture(name)
  model, params = hf_import.load_hf(d)
  out = model.apply({"params": params}, jnp.asarray(tokens))
  np.testing.assert_allclose(np.asarray(out.logits), expected, atol=1e-4, rtol=0)
  lengths = np.full((tokens.shape[0],), tokens.shape[1], np.int32)
  gen = generate(model, {"params": params}, tokens, lengths, max_new_tokens=greedy.shape[1],
                 max_len=tokens.shape[1] + greedy.shape[1])
  np.testing.assert_array_equal(np.asarray(gen.tokens), greedy)


def test_specs_read_from_the_configs():
  llama = hf_import.read_spec(os.path.join(FIXTURES, "llama"))
  assert (llama.num_heads, llama.num_kv_heads, llama.head_dim) == (4, 2, 8)
  assert llama.rotary.scaling == "llama3" and llama.rotary.original_max_position == 128
  qwen = hf_import.read_spec(os.path.join(FIXTURES, "qwen2"))
  assert qwen.tie_embeddings and qwen.use_qkv_bias and qwen.rotary.base == 1e6
  mistral = hf_import.read_spec(os.path.join(FIXTURES, "mistral"))
  assert mistral.sliding_windows == (5, 5) and mistral.head_dim == 16
  assert mistral.num_kv_heads == 1 and mistral.rotary.scaling == "linear"
  model = hf_import.build_model(mistral)
  attention = model.layer_pattern[0](parent=None).make_attention(parent=None)
  assert attention.mask.right.window == 5


def test_transformers4_config_keys_read_like_transformers5():
  with open(os.path.join(FIXTURES, "llama", "config.json")) as f:
    config = json.load(f)
  rope = config.pop("rope_parameters")
  legacy = dict(config, rope_theta=rope.pop("rope_theta"),
                rope_scaling=dict(rope, type=rope.pop("rope_type")))
  assert hf_import.spec_from_config(legacy) == hf_import.read_spec(
      os.path.join(FIXTURES, "llama"))


def test_scanned_layers_give_the_same_logits():
  d, tokens, expected, _ = fixture("mistral")
  model, params = hf_import.load_hf(d, scan_layers=True)
  assert params["layers"]["block_0"]["attention"]["query_kernel"].shape == (2, 32, 4, 16)
  out = model.apply({"params": params}, jnp.asarray(tokens))
  np.testing.assert_allclose(np.asarray(out.logits), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name,scan", [("llama", False), ("qwen2", True), ("mistral", False)])
def test_export_import_round_trip_is_exact(name, scan, tmp_path):
  d = os.path.join(FIXTURES, name)
  model, params = hf_import.load_hf(d, scan_layers=scan)
  hf_import.export_hf(model, params, str(tmp_path))
  written = load_file(str(tmp_path / "model.safetensors"))
  original = hf_import.SafetensorsCheckpoint(d)
  assert sorted(written) == original.names()
  for key in written:
    np.testing.assert_array_equal(written[key], original.get(key), err_msg=key)
  assert hf_import.read_spec(str(tmp_path)) == hf_import.read_spec(d)
  model2, params2 = hf_import.load_hf(str(tmp_path), scan_layers=scan)
  assert hf_import.spec_from_model(model2) == hf_import.spec_from_model(model)
  assert model2.scan_layers == scan
  jax.tree.map(np.testing.assert_array_equal, params2, params)


def _copy_with(tmp_path, name: str, change) -> str:
  """A copy of fixture `name` (single-file) whose tensors went through `change(dict)`."""
  src = os.path.join(FIXTURES, name)
  dst = tmp_path / name
  dst.mkdir()
  shutil.copy(os.path.join(src, "config.json"), dst / "config.json")
  tensors = load_file(os.path.join(src, "model.safetensors"))
  change(tensors)
  save_file(tensors, str(dst / "model.safetensors"))
  return str(dst)


def test_mismatched_tensor_shape_names_the_tensor(tmp_path):
  key = "model.layers.1.self_attn.k_proj.weight"
  d = _copy_with(tmp_path, "llama", lambda t: t.update({key: np.zeros((8, 32), np.float32)}))
  with pytest.raises(ValueError, match=rf"{key}: expected shape \(16, 32\), found \(8, 32\)"):
    hf_import.load_hf(d)


def test_missing_and_unexpected_tensors_are_named(tmp_path):
  key = "model.layers.0.mlp.up_proj.weight"
  d = _copy_with(tmp_path, "llama", lambda t: t.pop(key))
  with pytest.raises(ValueError, match=rf"{key}: missing"):
    hf_import.load_hf(d)
  extra = "model.layers.2.mlp.up_proj.weight"
  d = _copy_with(tmp_path, "qwen2", lambda t: t.update({extra: np.zeros((64, 32),
                                                                              np.float32)}))
  with pytest.raises(ValueError, match=rf"{extra}: unexpected"):
    hf_import.load_hf(d)


def test_unsupported_configs_raise_naming_the_field():
  with open(os.path.join(FIXTURES, "llama", "config.json")) as f:
    config = json.load(f)
  with pytest.raises(ValueError, match="architectures"):
    hf_import.spec_from_config(dict(config, architectures=["GPT2LMHeadModel"]))
  with pytest.raises(ValueError, match="rope_parameters: rope type 'yarn'"):
    hf_import.spec_from_config(dict(config, rope_parameters={"rope_type": "yarn",
                                                             "rope_theta": 1e4}))
  with pytest.raises(ValueError, match="hidden_act"):
    hf_import.spec_from_config(dict(config, hidden_act="relu2"))


def _medusa_file(path, num_heads: int, width: int, vocab: int, n: int, stored_blocks: int,
                 seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  tensors = {}
  for k in range(num_heads):
    for i in range(stored_blocks):
      tensors[f"{k}.{i}.linear.weight"] = rng.normal(0, 0.3, (width, width)).astype(np.float32)
      tensors[f"{k}.{i}.linear.bias"] = rng.normal(0, 0.3, (width,)).astype(np.float32)
    tensors[f"{k}.{n}.weight"] = rng.normal(0, 0.3, (vocab, width)).astype(np.float32)
  save_file(tensors, str(path))
  return tensors


def _medusa_reference(tensors: dict, hidden: np.ndarray, num_heads: int, n: int) -> np.ndarray:
  """Medusa's torch module in numpy: per head, n ResBlocks (shared if only block 0 is stored)."""
  silu = lambda z: z / (1 + np.exp(-z))
  out = []
  for k in range(num_heads):
    x = hidden.astype(np.float64)
    for i in range(n):
      i = i if f"{k}.{i}.linear.weight" in tensors else 0
      x = x + silu(x @ tensors[f"{k}.{i}.linear.weight"].T + tensors[f"{k}.{i}.linear.bias"])
    out.append(x @ tensors[f"{k}.{n}.weight"].T)
  return np.stack(out, axis=-2)


@pytest.mark.parametrize("n,stored", [(1, 1), (2, 1), (2, 2)])
def test_medusa_checkpoint_loads_into_medusa_heads(tmp_path, n, stored):
  d, tokens, _, _ = fixture("llama")
  model, params = hf_import.load_hf(d)
  hidden = np.asarray(model.apply({"params": params}, jnp.asarray(tokens)).hidden)  # [2, 12, 32]
  tensors = _medusa_file(tmp_path / "medusa_lm_head.safetensors", 3, 32, model.vocab_size, n,
                         stored)
  heads, variables = hf_import.load_medusa_heads(str(tmp_path), embed_dim=32,
                                                 vocab_size=model.vocab_size)
  assert (heads.num_heads, heads.num_blocks, heads.vocab_size) == (3, n, 260)
  logits = np.asarray(heads.apply(variables, jnp.asarray(hidden)))
  assert logits.shape == (2, 12, 3, 260)
  np.testing.assert_allclose(logits, _medusa_reference(tensors, hidden, 3, n), atol=1e-4)


def test_medusa_checkpoint_shape_mismatch_names_the_tensor(tmp_path):
  _medusa_file(tmp_path / "m.safetensors", 2, 32, 100, 1, 1)
  with pytest.raises(ValueError, match=r"0\.1\.weight: expected shape \(260, 32\), found "
                                       r"\(100, 32\)"):
    hf_import.load_medusa_heads(str(tmp_path / "m.safetensors"), vocab_size=260)


def _launch(workdir, *config, mode):
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  args = [sys.executable, "-m", "experiments.main"]
  for item in config:
    args += ["--config", item]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  return subprocess.run(args + ["--workdir", str(workdir), "--mode", mode], cwd=repo, env=env,
                        capture_output=True, text=True, timeout=420)


@pytest.mark.slow
def test_train_heads_starts_from_an_imported_checkpoint(tmp_path):
  llama = os.path.join(FIXTURES, "llama")
  corpus = os.path.join(os.path.dirname(hf_import.__file__), "layers", "*.py")
  config = [f"config:hf_model(path={llama!r}, num_heads=2, steps=3, seq_len=16, batch_size=2)",
            f"set:data.paths={corpus!r}", "set:data.eval_batches=1"]
  proc = _launch(tmp_path / "run", *config, mode="train_heads")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "heads[medusa]: 3 steps" in proc.stdout
  assert "heads_top1" in proc.stdout
  with open(tmp_path / "run" / "heads" / "medusa" / "report.json") as f:
    assert len(json.load(f)["top1"]) == 2
  with open(tmp_path / "run" / "config.json") as f:
    written = f.read()
  assert "init_from_hf" in written and "LlamaForCausalLM" in written

  train = _launch(tmp_path / "other", *config, mode="train")
  assert train.returncode != 0 and "init_from_hf" in train.stderr
  assert len(train.stderr.strip().splitlines()) == 1, train.stderr
