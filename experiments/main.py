r"""effx launcher: `python -m experiments.main --config config:lm_tiny --workdir DIR --mode MODE`.

Configs are fiddle: `--config config:NAME` picks a function of experiments.configs,
`--config fiddler:NAME(arg=...)` applies a fiddler, `--config set:path.to.field=VALUE` sets a
field to a Python literal. The final config is printed and written to DIR/config.json.

Modes:
  main      train (resuming if DIR has checkpoints), evaluate, complete a prompt, print a summary
  train     train only
  eval      evaluate the newest checkpoint
  generate  complete `generate.prompt` with the newest checkpoint
  train_heads  train the draft heads of `heads` on the frozen newest checkpoint
  speculative  measure those heads: tree sized from measured latency, τ and speedup
The main job runs train, eval, generate, train_heads and speculative in turn.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import types
import typing

from absl import app, flags, logging
import fiddle as fdl
from fiddle import absl_flags as fdl_flags
from fiddle import daglish
from fiddle.experimental import serialization

from experiments import configs

MODES = ("main", "train", "eval", "generate", "train_heads", "speculative")
DATA_MODES = ("main", "train", "eval", "train_heads", "speculative")  # modes that read the corpus


class ConfigPyrefPolicy(serialization.DefaultPyrefPolicy):
  """What `--config config_file:` / `config_str:` JSON may reference: effx and experiments
  code, fiddle's own types, serializable builtins and dtypes (numpy/jax.numpy/ml_dtypes), so a
  config file cannot call arbitrary functions (e.g. `subprocess.run`) when it is built."""

  PACKAGES = ("effx", "experiments", "fiddle", "builtins", "numpy", "jax", "ml_dtypes")
  CODE_PACKAGES = ("effx", "experiments", "fiddle", "builtins")

  def allows_import(self, module: str, symbol: str) -> bool:
    return module.split(".")[0] in self.PACKAGES

  def allows_value(self, value) -> bool:
    if not super().allows_value(value):
      return False
    module = getattr(value, "__module__", None) or ""
    if module.split(".")[0] in self.CODE_PACKAGES:
      return True
    import numpy as np
    try:  # numpy / jax.numpy / ml_dtypes: dtypes only, never functions such as numpy.load
      return isinstance(value, type) and np.dtype(value) is not None
    except TypeError:
      return False

  def __str__(self) -> str:
    return f"effx ConfigPyrefPolicy (packages {', '.join(self.PACKAGES)}; dtypes only from numpy)"


def define_config_flag(flag_values: flags.FlagValues = flags.FLAGS):
  """The launcher's `--config` flag: configs and fiddlers only from experiments.configs
  (allow_imports=False), `set:` takes Python literals only, JSON configs limited by
  `ConfigPyrefPolicy`."""
  return fdl_flags.DEFINE_fiddle_config(
      "config", help_string="Experiment config: config:NAME, fiddler:NAME(...), set:a.b=VALUE.",
      default_module=configs, allow_imports=False, pyref_policy=ConfigPyrefPolicy(),
      flag_values=flag_values)


_CONFIG = define_config_flag()
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, logs, config).")
_MODE = flags.DEFINE_enum("mode", "main", MODES, "What to do.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() (coordinator from the JAX_* "
    "environment variables or the cluster's own, e.g. Cloud TPU / SLURM).")


class ConfigError(ValueError):
  """A config problem reported as one line before any compute."""


def _simple_types(annotation) -> tuple[type, ...] | None:
  """The plain types an annotation allows (int, float, bool, str, None), or None when it
  allows anything else too (then no type check is made)."""
  simple = (int, float, bool, str, type(None))
  if annotation in simple:
    return (annotation,)
  if typing.get_origin(annotation) in (typing.Union, types.UnionType):
    members = typing.get_args(annotation)
    if all(m in simple for m in members):
      return members
  return None


def check_types(cfg: fdl.Buildable) -> None:
  """ConfigError naming the field when a set value cannot have the field's plain type
  (e.g. `set:train.steps='10'`, a str for an int). Ints are accepted for floats."""
  for node, path in daglish.iterate(cfg):
    if not isinstance(node, fdl.Buildable):
      continue
    try:
      hints = typing.get_type_hints(node.__fn_or_cls__)
    except Exception:  # unresolvable annotations: nothing to check against
      continue
    for name, value in node.__arguments__.items():
      allowed = _simple_types(hints.get(name))
      if allowed is None or isinstance(value, fdl.Buildable):
        continue
      ok = any(isinstance(value, t) and not (t is int and isinstance(value, bool)) or
               (t is float and isinstance(value, int) and not isinstance(value, bool))
               for t in allowed)
      if not ok:
        field = f"{daglish.path_str(path)}.{name}".lstrip(".")
        names = " or ".join("None" if t is type(None) else t.__name__ for t in allowed)
        raise ConfigError(f"{field}: got {value!r} ({type(value).__name__}); must be {names}")


def build_experiment(cfg: fdl.Config):
  """Builds the experiment, turning any construction error into a one-line ConfigError."""
  check_types(cfg)
  try:
    return fdl.build(cfg)
  except Exception as err:  # fiddle wraps the field's own ValueError/TypeError
    root = err
    while root.__cause__ is not None or root.__context__ is not None:
      nxt = root.__cause__ or (None if root.__suppress_context__ else root.__context__)
      if not isinstance(nxt, Exception):
        break
      root = nxt
    message = str(root).strip().splitlines()[0] if str(root).strip() else type(root).__name__
    raise ConfigError(message) from err


def flag_config(flag) -> fdl.Config:
  """The parsed `--config` value; fiddle's parse errors become a one-line ConfigError.

  Fiddle parses lazily and chains its errors (e.g. 'Could not set "model.x" to "3"' caused by
  'No parameter named 'x' ...'); the line keeps every message of the chain except fiddle's
  generic hint about `allow_imports`.
  """
  fiddle_flag = flag._flagvalues[flag.name] if isinstance(flag, flags.FlagHolder) else flag
  pending = list(getattr(fiddle_flag, "_remaining_directives", ()))
  try:
    return flag.value
  except Exception as err:  # AttributeError / ValueError / TypeError / SyntaxError from fiddle
    parts, seen, node = [], set(), err
    left = getattr(fiddle_flag, "_remaining_directives", None)
    if left is not None and 0 < len(pending) - len(left) <= len(pending):
      failing = pending[len(pending) - len(left) - 1]
      parts.append(f"--config {failing if len(failing) <= 120 else failing[:100] + '...'}")
    while isinstance(node, Exception) and id(node) not in seen:
      seen.add(id(node))
      text = str(node).strip()
      line = text.splitlines()[0].rstrip(".") if text else type(node).__name__
      if "allow_imports" not in line:
        parts.append(line)
      node = node.__cause__ or node.__context__
    raise ConfigError(": ".join(parts) or type(err).__name__) from err


def parse_config(directives: list[str]) -> fdl.Config:
  """The config the launcher builds from `--config` values, e.g. ["config:lm_tiny",
  "set:train.steps=10"] (for notebooks and tests); ConfigError as on the command line."""
  flag_values = flags.FlagValues()
  holder = define_config_flag(flag_values)
  flag_values(["effx"] + [f"--config={d}" for d in directives])
  return flag_config(holder)


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing that reports a bad flag (e.g. `--mode=bogus`) as one stderr line."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as err:
    sys.exit(f"effx: flag error: {err}")


def config_json(cfg: fdl.Config) -> str:
  """Readable JSON of the final config (fiddle serialization)."""
  return json.dumps(json.loads(serialization.dump_json(cfg)), indent=2, sort_keys=True)


def prepare_workdir(workdir: str) -> str:
  """Creates the workdir and checks it is writable; one-line error otherwise."""
  workdir = os.path.abspath(workdir)
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write_probe.{socket.gethostname()}.{os.getpid()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as err:
    raise ConfigError(f"workdir: {workdir!r} is not writable ({err.strerror})") from err
  return workdir


def preflight(exp, mode: str, num_devices: int | None = None,
              process_count: int | None = None) -> None:
  """Checks what needs the runtime (devices, processes, corpus files) before the workdir is
  made or anything compiles: one-line ConfigErrors naming the field and value."""
  import math
  import flax.linen as nn
  import jax
  from effx.data import make_packed_rows
  num_devices = jax.device_count() if num_devices is None else num_devices
  process_count = jax.process_count() if process_count is None else process_count
  try:
    sizes = dict(zip(("data", "fsdp", "tensor", "expert"), exp.mesh.axis_sizes(num_devices)))
  except ValueError as err:
    raise ConfigError(str(err)) from None
  batch_axes = nn.logical_to_mesh_axes(("batch",), list(exp.mesh.rules))[0] or ()
  batch_axes = (batch_axes,) if isinstance(batch_axes, str) else batch_axes
  shards = math.prod(sizes[a] for a in batch_axes)
  batch = exp.data.batch_size
  if batch % process_count:
    raise ConfigError(f"data.batch_size: got {batch}; must be divisible by the process count "
                      f"{process_count}")
  if batch % shards:
    raise ConfigError(f"data.batch_size: got {batch}; must be divisible by the {shards} batch "
                      f"shards of the mesh ({'*'.join(batch_axes)} of {sizes})")
  if mode in DATA_MODES:
    try:  # lists and reads the corpus (cached: training reuses it)
      make_packed_rows(exp.data, "train")
      make_packed_rows(exp.data, "eval")
    except (ValueError, OSError) as err:
      raise ConfigError(str(err).splitlines()[0]) from None


def imported_state(exp):
  """A TrainState with the weights of the HF checkpoint `exp.init_from_hf` for `exp.model`
  (effx/hf_import.py); a missing or mismatched tensor is a one-line ConfigError."""
  import jax.numpy as jnp
  from effx.hf_import import load_params
  from effx.train import TrainState
  try:
    params = load_params(exp.init_from_hf, exp.model)
  except (ValueError, OSError) as err:
    raise ConfigError(f"init_from_hf: {str(err).splitlines()[0]}") from None
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=None,
                    model_state={})


def run(cfg: fdl.Config, workdir: str, mode: str) -> dict:
  """Runs `mode` for the experiment config `cfg` in `workdir`; returns a summary dict."""
  import jax
  import numpy as np
  from effx.data import ByteTokenizer, make_eval_batches
  from effx.decoding.generate import generate, pad_prompts
  from effx.train import Trainer, restore_params, train

  if mode not in MODES:
    raise ConfigError(f"mode: got {mode!r}; allowed: {', '.join(MODES)}")
  exp = build_experiment(cfg)
  if exp.init_from_hf is not None and mode in ("main", "train"):
    raise ConfigError(f"init_from_hf: --mode {mode} trains the base model, which is not "
                      f"supported from imported weights; use --mode eval, generate, "
                      f"train_heads or speculative")
  preflight(exp, mode)
  # weights of an imported Hugging Face checkpoint instead of the workdir's checkpoint
  imported = None if exp.init_from_hf is None else imported_state(exp)
  workdir = prepare_workdir(workdir)
  text = config_json(cfg)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(text)
  print(f"effx experiment {exp.name!r} in {workdir}\n{fdl.printing.as_str_flattened(cfg)}",
        flush=True)
  summary: dict = {"experiment": exp.name, "workdir": workdir}
  started = time.perf_counter()
  if mode in ("main", "train"):
    result = train(exp.model, exp.train, exp.mesh, exp.data, workdir)
    state = result.state
    summary.update(steps=result.steps_done, resumed_from=result.resumed_from,
                   stopped_by=result.stopped_by, tokens_per_second=round(result.tokens_per_second),
                   mfu=None if result.mfu is None else round(result.mfu, 4), **result.eval)
  elif imported is not None:
    state = imported
  else:
    state = restore_params(exp.model, exp.train, exp.mesh, exp.data.seq_len,
                           exp.data.batch_size, workdir)
  if mode == "eval":
    trainer = Trainer(exp.model, exp.train, exp.mesh, exp.data.seq_len, exp.data.batch_size)
    summary.update(trainer.evaluate(state, make_eval_batches(exp.data)))
  if mode in ("main", "generate") and summary.get("stopped_by") != "sigterm":
    tok = ByteTokenizer()
    prompt = np.concatenate([[tok.BOS_ID], tok.encode(exp.generate.prompt)])
    prompts, lengths = pad_prompts([prompt])
    variables = {"params": state.params, **state.model_state}
    t0 = time.perf_counter()
    out = generate(exp.model, variables, prompts, lengths,
                   max_new_tokens=exp.generate.max_new_tokens, max_len=exp.generate.max_len,
                   sampling=exp.generate.sampling, key=jax.random.key(exp.generate.seed),
                   eos_id=tok.EOS_ID)
    tokens = np.asarray(out.tokens[0, :int(out.lengths[0])])
    summary["generate_seconds"] = round(time.perf_counter() - t0, 2)
    summary["completion"] = exp.generate.prompt + tok.decode(tokens)
  variables = {"params": state.params, **state.model_state}
  if mode in ("main", "train_heads") and exp.heads and summary.get("stopped_by") != "sigterm":
    from experiments.draft_heads import train_heads
    reports = train_heads(exp, workdir, variables)
    summary["heads_top1"] = {k: [round(x, 3) for x in r["top1"]] for k, r in reports.items()}
  if mode in ("main", "speculative") and exp.heads and summary.get("stopped_by") != "sigterm":
    from experiments.draft_heads import measure_speculative
    rows = measure_speculative(exp, workdir, variables)
    summary["speculative"] = "\n" + format_speculative(rows)
  summary["wall_seconds"] = round(time.perf_counter() - started, 1)
  return summary


def format_speculative(rows: list[dict]) -> str:
  """A small table of the speculative-decoding measurements."""
  lines = ["  method    batch  nodes (depth)   tau  tau on a common chain  speedup  "
           "tok/s (spec / plain)  greedy==plain"]
  for r in rows:
    chain = f"{r['tau_chain']:.2f}" if "tau_chain" in r else "-"
    nodes = f"{r['tree_nodes']} ({r['tree_depth']})" if "tree_depth" in r else f"{r['tree_nodes']}"
    lines.append(f"  {r['method']:<9} {r['batch']:>5} {nodes:>13} {r['tau']:>5.2f} {chain:>22} "
                 f"{r['speedup']:>7.2f}x  {r['tokens_per_second']:>8.1f} / "
                 f"{r['plain_tokens_per_second']:<8.1f}    {r['outputs_match_plain']}")
  return "\n".join(lines)


def print_summary(summary: dict) -> None:
  completion = summary.pop("completion", None)
  print("\n==== effx summary ====")
  for key, value in summary.items():
    print(f"{key:>20}: {value}")
  if "eval_loss" in summary:
    print(f"{'':>20}  (eval loss is nats per byte: byte-level tokens)")
  wd = summary["workdir"]
  print(f"{'checkpoints':>20}: {os.path.join(wd, 'checkpoints')}")
  print(f"{'tensorboard':>20}: tensorboard --logdir {os.path.join(wd, 'tensorboard')}")
  if completion is not None:
    print("---- completion ----\n" + completion + "\n--------------------")


def main(argv: list[str]) -> None:
  logging.set_verbosity(logging.WARNING)  # orbax/grain INFO lines drown the progress display
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _WORKDIR.value is None:
    sys.exit("effx: --workdir is required")
  try:
    cfg = flag_config(_CONFIG)
    if cfg is None:
      raise ConfigError("config: none given; use --config config:lm_tiny (see experiments/configs)")
    if _DISTRIBUTED.value:
      from effx.sharding import initialize_distributed
      try:
        initialize_distributed()
      except ValueError as err:
        raise ConfigError(str(err)) from None
    summary = run(cfg, _WORKDIR.value, _MODE.value)
  except ConfigError as err:
    sys.exit(f"effx: config error: {err}")
  print_summary(summary)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
