"""Tests for the launcher `python -m experiments.main` and the fiddle configs (subprocesses):
config errors are one stderr line naming the field and leave no workdir; a tiny training run
writes a readable config.json; `--mode generate` then prints a completion."""

import json
import os
import subprocess
import sys

import fiddle as fdl
import pytest

from experiments import configs
from experiments.configs import lm
from experiments.main import ConfigError, build_experiment

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["model.embed_dim=32", "model.num_layers=2", "model.layer_pattern[0].attention.num_heads=2",
        "model.layer_pattern[0].ffn.hidden_dim=64", "data.seq_len=32", "data.batch_size=4",
        "train.steps=6", "train.checkpoint_every=3", "train.log_every=1",
        "train.time_budget_s=None", "train.progress_bar=False", "data.eval_batches=1",
        "generate.max_new_tokens=8", "generate.max_len=64"]


def _launch(workdir, *config, mode="train", timeout=420):
  args = [sys.executable, "-m", "experiments.main", "--config", "config:lm_tiny"]
  for item in config:
    args += ["--config", item]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  return subprocess.run(args + ["--workdir", str(workdir), "--mode", mode], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("config,mode,needles", [
    (["set:model.nonexistent=3"], "train", ["model.nonexistent", "No parameter named"]),
    (["set:model.layer_pattern[0].attention.num_heads=3"], "train",
     ["attention.num_heads", "3", "256"]),
    (["set:train.steps=0"], "train", ["train.steps", "got 0"]),
    ([], "bogus", ["--mode", "bogus", "main|train|eval|generate"]),
], ids=["unknown_field", "heads_not_dividing_width", "bad_value", "bad_mode"])
def test_config_errors_are_one_line_and_leave_no_workdir(tmp_path, config, mode, needles):
  workdir = tmp_path / "run"
  proc = _launch(workdir, *config, mode=mode, timeout=400)
  assert proc.returncode != 0
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1, proc.stderr
  for needle in needles:
    assert needle in lines[0], lines[0]
  assert "Traceback" not in proc.stderr + proc.stdout
  assert not workdir.exists()


@pytest.mark.slow
def test_train_writes_config_then_generate_prints_completion(tmp_path):
  workdir = tmp_path / "run"
  # A failed launch first: it must not break the next run in the same workdir.
  bad = _launch(workdir, "set:model.embed_dim=30", timeout=400)
  assert bad.returncode != 0 and not workdir.exists()

  sets = [f"set:{s}" for s in TINY]
  proc = _launch(workdir, *sets, mode="train")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "model.embed_dim: int = 32" in proc.stdout  # the final config is printed
  assert "stopped_by: steps" in proc.stdout
  with open(workdir / "config.json") as f:
    written = json.load(f)
  text = json.dumps(written)
  assert "DecoderLM" in text and "Experiment" in text and "lm_tiny" in text
  assert os.path.isdir(workdir / "checkpoints" / "6")

  gen = _launch(workdir, *sets, "set:generate.prompt='def add(a, b):'", mode="generate",
                timeout=300)
  assert gen.returncode == 0, gen.stderr[-3000:]
  assert "---- completion ----" in gen.stdout
  completion = gen.stdout.split("---- completion ----\n", 1)[1].split("\n----------", 1)[0]
  assert completion.startswith("def add(a, b):")
  assert "stopped_by" not in gen.stdout  # generate restores, it does not train


def test_configs_build():
  for name in ("lm_tiny", "lm_small", "lm_1b"):
    cfg = getattr(configs, name)()
    assert isinstance(cfg, fdl.Config)
  tiny = lm.with_mesh(lm.with_remat(lm.lm_tiny(), policy="dots"), data=1)
  tiny.model.embed_dim = 32
  tiny.model.layer_pattern[0].attention.num_heads = 2
  exp = build_experiment(tiny)
  assert exp.model.remat_policy == "dots" and exp.mesh.data == 1
  assert exp.model.embed_dim == 32
  tiny.model.embed_dim = 31
  with pytest.raises(ConfigError, match="attention.num_heads: 2 does not divide the width 31"):
    build_experiment(tiny)
