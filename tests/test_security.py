"""Security: no code execution from data or from the command line.

* no pickle-based deserialization anywhere in effx/, experiments/, benchmarks/, scripts/
  (pickle, cPickle, dill, shelve, marshal, `allow_pickle=True`, `torch.load`, unsafe yaml,
  builtin eval/exec) — the source files are scanned; the patterns are checked on bad snippets;
* checkpoints go through orbax only, imported weights through safetensors only (no
  np.save/np.load, flax msgpack, torch.save); a directory holding only a pickle-based
  `pytorch_model.bin` is refused without opening it;
* command-line `set:` overrides and fiddler arguments accept Python literals only;
  `config:`/`fiddler:` resolve names in experiments.configs only (the launcher's flag has
  allow_imports=False); `config_file:`/`config_str:` JSON may reference only effx/experiments
  code and dtypes (`ConfigPyrefPolicy`), so a crafted config cannot call e.g. shutil.copyfile
  when it is built. Each refusal is checked with a marker file the attack would create.
"""

from __future__ import annotations

import ast
import os
import pickle
import re
import shutil
import subprocess
import sys

import fiddle as fdl
import numpy as np
import pytest
from absl import flags
from fiddle.experimental import serialization

from experiments import configs
from experiments import main as launcher

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCANNED = ("effx", "experiments", "benchmarks", "scripts")

UNSAFE = {
    "pickle-family import": re.compile(
        r"^\s*(import|from)\s+(pickle|cPickle|_pickle|dill|shelve|marshal|joblib|cloudpickle)\b",
        re.M),
    "pickle-family call": re.compile(r"\b(pickle|cPickle|_pickle|dill|cloudpickle|joblib)\.\w"),
    "allow_pickle=True": re.compile(r"allow_pickle\s*=\s*True"),
    "torch.load": re.compile(r"\btorch\.load\b"),
    "unsafe yaml": re.compile(r"\byaml\.(unsafe_)?load\(|\byaml\.full_load\("),
    "eval/exec": re.compile(r"(?<![\w.])(eval|exec)\s*\("),
}
# Serialization other than orbax (checkpoints) and safetensors (imports).
OTHER_SERIALIZATION = re.compile(
    r"\b(np|numpy|jnp)\.(save|savez|savez_compressed|load)\s*\(|\bflax\.serialization\b|"
    r"\bmsgpack\b|\btorch\.save\b|\bh5py\b|\btf\.train\.Checkpoint\b")


def _source_files() -> list[str]:
  files = []
  for top in SCANNED:
    for root, dirs, names in os.walk(os.path.join(REPO, top)):
      dirs[:] = [d for d in dirs if d != "__pycache__"]
      files += [os.path.join(root, n) for n in names if n.endswith((".py", ".sh", ".toml",
                                                                      ".cfg", ".json"))]
  return sorted(files)


def _read(path: str) -> str:
  with open(path, encoding="utf-8") as f:
    return f.read()


def test_the_patterns_catch_unsafe_snippets():
  bad = {"pickle-family import": "import pickle\n", "pickle-family call": "x = dill.loads(b)",
         "allow_pickle=True": "np.load(f, allow_pickle=True)", "torch.load": "torch.load(p)",
         "unsafe yaml": "yaml.load(text)", "eval/exec": "value = eval(text)"}
  for name, snippet in bad.items():
    assert UNSAFE[name].search(snippet), name
  assert not UNSAFE["eval/exec"].search("self._eval(q) + mask.eval_shape(x)")
  assert OTHER_SERIALIZATION.search("np.save(path, arr)")
  assert not OTHER_SERIALIZATION.search("np.loadtxt_like = 1; jnp.asarray(x)")


def test_no_pickle_based_deserialization_in_the_package():
  files = _source_files()
  assert len(files) > 30 and any(f.endswith("checkpoint.py") for f in files)
  hits = [f"{os.path.relpath(f, REPO)}: {name}: {m.group(0).strip()}"
          for f in files for name, pattern in UNSAFE.items()
          for m in pattern.finditer(_read(f))]
  assert not hits, "\n".join(hits)


def test_checkpoints_only_through_orbax_and_imports_only_through_safetensors():
  # The package itself (scripts/make_hf_fixtures.py writes test fixtures as plain .npy arrays
  # with allow_pickle=False, and np.load's default is allow_pickle=False).
  package = [f for f in _source_files() if f.endswith(".py") and
             os.path.relpath(f, REPO).split(os.sep)[0] in ("effx", "experiments")]
  hits = [f"{os.path.relpath(f, REPO)}: {m.group(0)}" for f in package
          for m in OTHER_SERIALIZATION.finditer(_read(f))]
  assert not hits, "\n".join(hits)
  imports = {}
  for f in _source_files():
    if f.endswith(".py"):
      for node in ast.walk(ast.parse(_read(f))):
        if isinstance(node, ast.Import):
          names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
          names = [node.module or ""]
        else:
          continue
        for name in names:
          imports.setdefault(name.split(".")[0], set()).add(os.path.relpath(f, REPO))
  assert "effx/checkpoint.py" in imports["orbax"]
  assert {p for p in imports["orbax"]} <= {"effx/checkpoint.py", "effx/decoding/head_training.py"}
  assert "effx/hf_import.py" in imports["safetensors"]
  # torch appears only in the script that regenerates the HF test fixtures (it never loads).
  assert imports.get("torch", set()) <= {"scripts/make_hf_fixtures.py"}


class _Marker:
  """Unpickling this creates a directory: proof that a pickle was loaded."""

  def __init__(self, path):
    self.path = path

  def __reduce__(self):
    return os.mkdir, (self.path,)


def test_hf_import_never_opens_a_pickle_checkpoint(tmp_path):
  from effx.hf_import import SafetensorsCheckpoint
  marker = tmp_path / "unpickled"
  (tmp_path / "pytorch_model.bin").write_bytes(pickle.dumps(_Marker(str(marker))))
  (tmp_path / "config.json").write_text("{}")
  with pytest.raises(FileNotFoundError, match="no model.safetensors"):
    SafetensorsCheckpoint(str(tmp_path))
  assert not marker.exists()


def test_the_launcher_flag_has_no_imports_and_a_pyref_policy():
  flag = flags.FLAGS["config"]  # registered by experiments.main at import
  assert flag.allow_imports is False
  assert flag.default_module is configs
  assert isinstance(flag._pyref_policy, launcher.ConfigPyrefPolicy)


def _refused(directives, needles, marker=None):
  with pytest.raises(launcher.ConfigError) as err:
    launcher.build_experiment(launcher.parse_config(["config:lm_tiny"] + directives))
  message = str(err.value)
  assert "\n" not in message
  for needle in needles:
    assert needle in message, (needle, message)
  if marker is not None:
    assert not os.path.exists(marker)


def test_command_line_values_are_literals_only(tmp_path):
  marker = str(tmp_path / "made")
  _refused(["set:train.steps=__import__('os').getpid()"],
           ["train.steps", "__import__('os').getpid()", "Could not parse literal value"])
  _refused([f"set:name=__import__('os').mkdir({marker!r})"], ["Could not parse literal"], marker)
  _refused(["set:train.learning_rate=1e-3 if True else 0"], ["Could not parse literal"])
  _refused([f"fiddler:with_mesh(data=__import__('os').mkdir({marker!r}))"],
           ["fiddler:with_mesh", "malformed node"], marker)
  # names resolve only in experiments.configs: no module can be imported from the flag
  _refused([f"fiddler:os.mkdir({marker!r})"], ["os.mkdir", "Could not resolve"], marker)
  with pytest.raises(launcher.ConfigError, match="Could not resolve"):
    launcher.parse_config([f"config:os.mkdir({marker!r})"])
  assert not os.path.exists(marker)
  # literals themselves are fine
  exp = launcher.build_experiment(launcher.parse_config(
      ["config:lm_tiny", "set:train.steps=7", "set:generate.prompt='import os'"]))
  assert exp.train.steps == 7 and exp.generate.prompt == "import os"


def test_json_configs_may_reference_only_effx_code_and_dtypes(tmp_path):
  from fiddle._src.absl_flags.utils import ZlibJSONSerializer
  marker = tmp_path / "copied"
  attacks = {
      "shutil.copyfile": fdl.Config(shutil.copyfile, src=__file__, dst=str(marker)),
      "numpy.load": fdl.Config(np.load, file=str(tmp_path / "x.npy"), allow_pickle=True),
      "subprocess.run": fdl.Config(subprocess.run, args=["mkdir", str(marker)]),
  }
  for name, attack in attacks.items():
    module, symbol = name.split(".")
    path = tmp_path / f"{module}.json"
    path.write_text(serialization.dump_json(attack))
    for directive in (f"config_file:{path}",
                      f"config_str:{ZlibJSONSerializer().serialize(attack)}"):
      with pytest.raises(launcher.ConfigError,
                         match=f"Importing {symbol} from {module}.* is not permitted"):
        launcher.parse_config([directive])
      assert not marker.exists()
  # the launcher's own config.json is a valid config_file (reproducing a run)
  good = tmp_path / "config.json"
  good.write_text(launcher.config_json(configs.with_bf16(configs.lm_tiny())))
  exp = launcher.build_experiment(launcher.parse_config([f"config_file:{good}",
                                                         "set:model.embed_dim=64"]))
  assert exp.name == "lm_tiny" and exp.model.embed_dim == 64


def test_the_launcher_refuses_code_in_flags(tmp_path):
  from fiddle._src.absl_flags.utils import ZlibJSONSerializer
  marker = tmp_path / "copied"
  attack = ZlibJSONSerializer().serialize(
      fdl.Config(shutil.copyfile, src=__file__, dst=str(marker)))
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  for config, needles in [
      (["config:lm_tiny", "set:train.steps=__import__('os').getpid()"],
       ["train.steps", "Could not parse literal value"]),
      ([f"config_str:{attack}"], ["copyfile from shutil is not permitted"]),
  ]:
    args = [sys.executable, "-m", "experiments.main", "--workdir", str(tmp_path / "run")]
    for item in config:
      args += ["--config", item]
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("effx: config error: ") and "Traceback" not in proc.stderr
    for needle in needles:
      assert needle in last, last
    assert not marker.exists() and not (tmp_path / "run").exists()
