"""A battery of bad inputs: each is answered before any compute by a one-line error naming the
field, the value and what is allowed, and none leaves a workdir that breaks the next run.

* config-level cases go through the launcher's own code path in this process
  (`experiments.main.parse_config` -> `run`), with the training / restore entry points replaced
  by a function that fails the test, so an error raised any later than the preflight would
  show; the workdir must not exist afterwards;
* runtime facts the 1-process test cannot produce (3 processes, 4 devices) go through
  `experiments.main.preflight` with explicit counts;
* layer- and API-level cases call the module imported on its own (attention, embedding, draft
  tree, `generate` with `variables=None`: the prompt checks run before anything is applied);
* one slow test drives the launcher in subprocesses: failures (devices, corpus, `--distributed`
  without a cluster, a str for an int) exit non-zero with a one-line last stderr line, then a
  valid run in the same workdir succeeds, and a failed launch in a used workdir leaves its
  config and checkpoints untouched (the next run resumes).

(`tests/test_experiments.py` already covers an unknown field, heads not dividing the width,
steps=0 and `--mode bogus` as launcher subprocesses; here they run in-process, with the rest.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import main as launcher

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ["model.embed_dim=32", "model.num_layers=2", "model.layer_pattern[0].attention.num_heads=2",
        "model.layer_pattern[0].ffn.hidden_dim=64", "data.seq_len=32", "data.batch_size=4",
        "train.steps=6", "train.progress_bar=False", "train.time_budget_s=None", "heads=[]",
        "train.checkpoint_every=3", "train.log_every=1", "data.eval_batches=1",
        "generate.max_new_tokens=8", "generate.max_len=64"]
MOE = "fiddler:with_moe(num_experts=4,top_k=2)"

# (id, --config directives after config:lm_tiny + TINY, mode, pieces the one line must contain:
#  the field, the value, and what is allowed). "{tmp}" is the test's tmp_path.
CONFIG_CASES = [
    ("unknown_field", ["set:model.nonexistent=3"], "train",
     ["model.nonexistent", '"3"', "valid parameter names: vocab_size"]),
    ("heads_not_dividing_width", ["set:model.layer_pattern[0].attention.num_heads=3"], "train",
     ["attention.num_heads", "3", "does not divide the width 32"]),
    ("kv_heads_not_dividing_heads", ["set:model.layer_pattern[0].attention.num_kv_heads=3"],
     "train", ["attention.num_kv_heads", "got 3", "divide num_heads=2"]),
    ("window_longer_than_max_length", ["fiddler:with_sliding_window(window=100)"], "train",
     ["model.layer_pattern[0].attention", "window 100", "<= 64"]),
    ("moe_top_k_above_experts", ["fiddler:with_moe(num_experts=4,top_k=8)"], "train",
     ["top_k", "got 8", "[1, num_experts=4]"]),
    ("moe_capacity_factor_zero",
     ["fiddler:with_moe(num_experts=4,top_k=2,dispatch='capacity',capacity_factor=0.0)"], "train",
     ["capacity_factor", "got 0.0", "> 0"]),
    ("moe_eval_capacity_negative",
     [MOE, "set:model.layer_pattern[0].ffn.eval_capacity_factor=-1.0"], "train",
     ["eval_capacity_factor", "got -1.0", "> 0"]),
    ("moe_expert_choice_causal_lm", [MOE, "set:model.layer_pattern[0].ffn.routing='expert_choice'"],
     "train", ["routing", "'expert_choice'", "allow_noncausal_routing=True"]),
    ("prompt_longer_than_cache", ["set:generate.max_len=16"], "generate",
     ["generate.max_len", "got 16", ">= 31"]),
    ("empty_prompt", ["set:generate.prompt=''"], "generate",
     ["generate.prompt", "empty", "at least one character"]),
    ("mesh_not_device_count", ["fiddler:with_mesh(data=3)"], "train",
     ["mesh", "'data': 3", "devices"]),
    ("mesh_two_rest_axes", ["fiddler:with_mesh(data=-1,tensor=-1)"], "train",
     ["mesh", "'tensor': -1", "at most one axis may be -1"]),
    ("mesh_zero_axis", ["fiddler:with_mesh(data=-1,fsdp=0)"], "train",
     ["mesh.fsdp", "got 0", "positive size or -1"]),
    ("corpus_missing", ["set:data.paths='{tmp}/nothing/*.txt'"], "train",
     ["DataConfig.paths", "nothing/*.txt", "matches no file"]),
    ("corpus_empty", ["set:data.paths='{tmp}/empty/*.txt'"], "train",
     ["DataConfig.paths", "empty/*.txt", "all empty"]),
    ("negative_learning_rate", ["set:train.learning_rate=-0.001"], "train",
     ["train.learning_rate", "-0.001", "> 0"]),
    ("zero_steps", ["set:train.steps=0"], "train", ["train.steps", "got 0", "> 0"]),
    ("unknown_mode", [], "bogus", ["mode", "'bogus'", "main, train, eval"]),
    ("bad_remat_policy", ["set:model.remat_policy='sometimes'"], "train",
     ["model.remat_policy", "'sometimes'", "'dots_no_batch'"]),
    ("unknown_feature_map", ["fiddler:with_linear_attention(feature_map='cosine')"], "train",
     ["feature_map", "'cosine'", "'performer'"]),
    ("moh_top_k_above_routed_heads", ["fiddler:with_moh(num_shared_heads=1,top_k=4)"], "train",
     ["moh.top_k", "got 4", "routed heads=1"]),
    ("zero_seq_len", ["set:data.seq_len=0"], "train", ["seq_len", "0", ">= 1"]),
    ("negative_seq_len", ["set:data.seq_len=-8"], "train", ["seq_len", "-8", ">= 1"]),
    ("grad_accum_not_dividing_batch", ["set:train.grad_accum_steps=3"], "train",
     ["train.grad_accum_steps", "got 3", "data.batch_size=4"]),
    ("string_for_int", ["set:train.steps='10'"], "train",
     ["train.steps", "'10' (str)", "must be int"]),
    ("float_for_int", ["set:data.batch_size=4.5"], "train",
     ["data.batch_size", "4.5 (float)", "must be int"]),
    ("unknown_dtype", ["set:model.dtype='float17'"], "train",
     ["model.dtype", "'float17'", "jnp.bfloat16"]),
    ("vocab_below_tokenizer", ["set:model.vocab_size=100"], "train",
     ["model.vocab_size", "got 100", ">= 259"]),
    ("top_p_above_one", ["set:generate.sampling.top_p=1.5"], "generate",
     ["sampling.top_p", "got 1.5", "(0, 1]"]),
    ("negative_temperature", ["set:generate.sampling.temperature=-1.0"], "generate",
     ["sampling.temperature", "got -1.0", ">= 0"]),
    ("eval_fraction_one", ["set:data.eval_fraction=1.0"], "train",
     ["eval_fraction", "1.0", "[0, 1)"]),
    ("fiddler_syntax_error", ["fiddler:with_moe(num_experts=4,top_k=)"], "train",
     ["--config fiddler:with_moe(num_experts=4,top_k=)", "top_k=", "expected argument value"]),
    ("unknown_fiddler", ["fiddler:with_everything"], "train",
     ["--config fiddler:with_everything", "with_everything", "available names"]),
]


def _no_compute(*args, **kwargs):
  raise AssertionError("a bad config reached training / checkpoint restore")


def _one_line(message: str, needles: list[str]) -> None:
  assert message and "\n" not in message, repr(message)
  for needle in needles:
    assert needle in message, (needle, message)


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
  root = tmp_path_factory.mktemp("corpora")
  (root / "empty").mkdir()
  for name in ("a.txt", "b.txt"):
    (root / "empty" / name).write_text("")
  return root


@pytest.mark.parametrize("name,directives,mode,needles", CONFIG_CASES,
                         ids=[c[0] for c in CONFIG_CASES])
def test_config_error_before_any_compute(name, directives, mode, needles, corpora, tmp_path,
                                         monkeypatch):
  import effx.train
  for entry in ("train", "restore_params", "Trainer"):
    monkeypatch.setattr(effx.train, entry, _no_compute)
  workdir = tmp_path / "run"
  directives = [d.replace("{tmp}", str(corpora)) for d in directives]
  with pytest.raises(launcher.ConfigError) as err:
    cfg = launcher.parse_config(["config:lm_tiny"] + [f"set:{s}" for s in TINY] + directives)
    launcher.run(cfg, str(workdir), mode)
  _one_line(str(err.value), needles)
  assert not workdir.exists()


def _tiny_experiment(*directives):
  return launcher.build_experiment(
      launcher.parse_config(["config:lm_tiny"] + [f"set:{s}" for s in TINY] + list(directives)))


@pytest.mark.parametrize("directives,devices,processes,needles", [
    ([], 1, 3, ["data.batch_size", "got 4", "divisible by the process count 3"]),
    (["set:data.batch_size=6"], 4, 1, ["data.batch_size", "got 6", "the 4 batch shards"]),
    (["fiddler:with_mesh(data=2,tensor=2)", "set:data.batch_size=3"], 4, 1,
     ["data.batch_size", "got 3", "the 2 batch shards"]),
    (["fiddler:with_mesh(data=3)"], 4, 1, ["mesh", "multiply to 3", "there are 4 devices"]),
    (["fiddler:with_mesh(data=-1,tensor=3)"], 4, 1, ["mesh", "(product 3)", "device count 4"]),
], ids=["batch_vs_processes", "batch_vs_data_shards", "batch_vs_data_shards_with_tensor",
        "mesh_product", "mesh_rest_not_dividing"])
def test_preflight_for_other_device_and_process_counts(directives, devices, processes, needles):
  exp = _tiny_experiment(*directives)
  with pytest.raises(launcher.ConfigError) as err:
    launcher.preflight(exp, "train", num_devices=devices, process_count=processes)
  _one_line(str(err.value), needles)


def test_data_pipeline_rejects_uneven_process_split():
  from effx.data import DataConfig, make_train_iterator
  with pytest.raises(ValueError) as err:
    make_train_iterator(DataConfig(seq_len=8, batch_size=4), process_index=0, process_count=3)
  _one_line(str(err.value), ["DataConfig.batch_size=4", "process_count=3"])


def test_distributed_with_a_non_integer_process_count(monkeypatch):
  from effx.sharding import initialize_distributed
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1")
  monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
  monkeypatch.setenv("JAX_PROCESS_ID", "0")
  with pytest.raises(ValueError) as err:  # the launcher reports it as a config error
    initialize_distributed()
  _one_line(str(err.value), ["JAX_NUM_PROCESSES", "'two'", "must be an integer"])
  assert jax.process_count() == 1


def test_layers_on_their_own_reject_wrong_ranks_and_dtypes():
  from effx.attention.linear import BasedAttention, LinearAttention
  from effx.attention.mha import MultiHeadAttention
  from effx.layers.embedding import Embed
  attn = MultiHeadAttention(num_heads=2)
  linear = LinearAttention(num_heads=2, head_dim=8)
  based = BasedAttention(num_heads=2, head_dim=8, feature_dim=4, window=4)
  x = jnp.zeros((2, 8, 16), jnp.float32)
  pos = jnp.broadcast_to(jnp.arange(8, dtype=jnp.int32), (2, 8))
  key = jax.random.key(0)
  cases = [
      (lambda: attn.init(key, x[0], pos), ValueError, ["x must be [batch, seq, embed]", "(8, 16)"]),
      (lambda: attn.init(key, x, pos.astype(jnp.float32)), TypeError,
       ["positions must be integer", "float32"]),
      (lambda: attn.init(key, x.astype(jnp.int32), pos), TypeError,
       ["x must be a floating array", "int32"]),
      (lambda: attn.init(key, x, pos[0]), ValueError, ["positions must be [batch, seq]", "(8,)"]),
      (lambda: attn.init(key, x, pos, segment_ids=jnp.ones((2, 7), jnp.int32)), ValueError,
       ["segment_ids must be int [batch, seq]=(2, 8)", "(2, 7)"]),
      (lambda: Embed(10, 4).init(key, jnp.zeros((1, 2), jnp.float32)), TypeError,
       ["Embed: tokens must be an integer array", "float32"]),
      (lambda: linear.init(key, x[0], pos), ValueError,
       ["LinearAttention: x must be [batch, seq, embed]", "(8, 16)"]),
      (lambda: linear.init(key, x, pos.astype(jnp.float32)), ValueError,
       ["LinearAttention: positions must be int [batch, seq]=(2, 8)", "float32"]),
      (lambda: based.init(key, x, pos[:, :4]), ValueError,
       ["Attention: positions must be int [batch, seq]=(2, 8)", "(2, 4)"]),
  ]
  for call, error, needles in cases:
    with pytest.raises(error) as err:
      call()
    _one_line(str(err.value), needles)


def test_draft_tree_with_a_missing_parent():
  from effx.decoding.tree import from_choices
  with pytest.raises(ValueError) as err:
    from_choices([[0], [1, 0]])
  _one_line(str(err.value), ["choices", "[1, 0]", "parent path [1]"])
  with pytest.raises(ValueError) as err:
    from_choices([[0], [3]], top_k=2)
  _one_line(str(err.value), ["choices[1]", "rank 3", "< top_k=2"])


def test_generate_rejects_bad_prompts_before_applying_the_model():
  from effx.decoding.generate import generate
  exp = _tiny_experiment()
  prompts = np.array([[1, 70, 71, 0], [1, 72, 0, 0]], np.int32)
  lengths = np.array([3, 2], np.int32)
  cases = [  # variables=None: any use of the model would fail differently
      (dict(prompts=prompts, lengths=lengths, max_len=8),
       ["max_len", "a prompt of 4 tokens plus 8 new tokens", "is 8"]),
      (dict(prompts=prompts, lengths=np.array([3, 0], np.int32), max_len=64),
       ["prompt_lengths", "[3, 0]", "at least one token"]),
      (dict(prompts=np.where(prompts == 71, 300, prompts), lengths=lengths, max_len=64),
       ["prompts", "[300]", "[0, 260)"]),
      (dict(prompts=prompts.astype(np.float32), lengths=lengths, max_len=64),
       ["prompts", "float32", "integer token ids"]),
      (dict(prompts=prompts[0], lengths=lengths[:1], max_len=64),
       ["prompts", "(4,)", "[batch, prompt_len]"]),
  ]
  for case, needles in cases:
    with pytest.raises(ValueError) as err:
      generate(exp.model, None, case["prompts"], case["lengths"], max_new_tokens=8,
               max_len=case["max_len"])
    _one_line(str(err.value), needles)


# --------------------------------------------------------------------------------------------
# The launcher itself (subprocesses): exit status, the last stderr line, the workdir after.
# --------------------------------------------------------------------------------------------


def _launch(workdir, *directives, mode="train", flags=(), timeout=300):
  args = [sys.executable, "-m", "experiments.main", "--config", "config:lm_tiny"]
  for item in [f"set:{s}" for s in TINY] + list(directives):
    args += ["--config", item]
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS" and not k.startswith(
      ("JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_", "TPU_"))}
  env["JAX_PLATFORMS"] = "cpu"
  return subprocess.run(args + ["--workdir", str(workdir), "--mode", mode, *flags], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=timeout)


def _assert_refused(proc, needles):
  assert proc.returncode != 0, proc.stdout[-2000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("effx: config error: "), proc.stderr[-2000:]
  _one_line(last, needles)


@pytest.mark.slow
def test_launcher_failures_leave_the_workdir_usable(tmp_path):
  workdir = tmp_path / "run"
  # Failures found only at runtime (device count, corpus files): before the workdir exists.
  _assert_refused(_launch(workdir, "fiddler:with_mesh(data=3)"), ["mesh", "'data': 3", "devices"])
  _assert_refused(_launch(workdir, f"set:data.paths='{tmp_path}/none/*.txt'"),
                  ["DataConfig.paths", "none/*.txt", "matches no file"])
  _assert_refused(_launch(workdir, flags=["--distributed"]),  # no cluster configured
                  ["--distributed", "coordinator_address should be defined",
                   "set JAX_COORDINATOR_ADDRESS"])
  assert not workdir.exists()

  good = _launch(workdir)
  assert good.returncode == 0, good.stderr[-3000:]
  assert "stopped_by: steps" in good.stdout
  config_before = (workdir / "config.json").read_text()
  checkpoints = sorted(os.listdir(workdir / "checkpoints"))
  assert "6" in checkpoints

  # A failed launch in a used workdir changes nothing there ...
  _assert_refused(_launch(workdir, "set:train.steps='12'"),
                  ["train.steps", "'12' (str)", "must be int"])
  assert (workdir / "config.json").read_text() == config_before
  assert sorted(os.listdir(workdir / "checkpoints")) == checkpoints
  # ... and the next valid run resumes from it (already at the last step: evaluates only).
  again = _launch(workdir)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "resumed from checkpoint step 6" in again.stdout
  assert json.loads((workdir / "config.json").read_text()) == json.loads(config_before)
