r"""Same-budget training runs of lm_tiny with each attention kind: eval loss and tokens/s.

Usage: python -m benchmarks.attention_quality [--seconds 60] [--kinds dense,sliding,...]
           [--warmup-steps 10] [--workdir-root /tmp] [--no-write]

Each kind trains `experiments.configs.lm_tiny()` (4 layers, embed 256, 4 heads, batch 16 x 256
bytes of the embedded stdlib corpus, no draft heads) with one attention fiddler applied, from
scratch in a fresh workdir under `--workdir-root`, for `train.time_budget_s = --seconds` of
wall time (compilation is paid first by an identical 1-step run whose compiled programs a
persistent XLA compilation cache hands to the timed run). Then the same 4 held-out eval
batches are scored. The runs are sequential in one process; the load
average before and after each run is recorded, because tokens/s on a loaded shared CPU is
noisy. Appends "## Attention kinds: same-budget training" to BENCHMARKS.md.

Kinds: dense (causal softmax), sliding (window 64), hybrid (sliding window 64 with a global
layer every 2), linear_elu, linear_gla (chunked, chunk 64), based (Taylor f=16 + window 64),
moh50 (MoH head_sparse, 1 shared + top-1 of 3 routed heads = 50% active).
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import tempfile
import time
from typing import Callable

import fiddle as fdl
import numpy as np

from benchmarks._report import append_section
from experiments import configs

KINDS: dict[str, tuple[str, Callable]] = {
    "dense": ("dense causal softmax", lambda c: c),
    "sliding": ("sliding window 64", lambda c: configs.with_sliding_window(c, window=64)),
    "hybrid": ("hybrid: window 64, global every 2",
               lambda c: configs.with_global_every(c, every=2, window=64)),
    "linear_elu": ("linear elu (chunked 64)",
                   lambda c: configs.with_linear_attention(c, feature_map="elu")),
    "linear_gla": ("linear GLA (elu, chunked 64)",
                   lambda c: configs.with_linear_attention(c, feature_map="elu", decay="gla")),
    "based": ("Based (taylor f=16 + window 64)", lambda c: configs.with_based(c)),
    "moh50": ("MoH 50% heads (1 shared + top-1, head_sparse)",
              lambda c: configs.with_moh(c, num_shared_heads=1, top_k=1)),
}


def _load() -> str:
  return "/".join(f"{v:.1f}" for v in os.getloadavg())


_CACHE_DIR: str | None = None


def _enable_compilation_cache(root: str) -> None:
  """A persistent XLA compilation cache (per process) so a warm-up run can pay compilation."""
  global _CACHE_DIR
  if _CACHE_DIR is None:
    import jax
    _CACHE_DIR = tempfile.mkdtemp(prefix="effx_bench_xla_cache_", dir=root)
    atexit.register(shutil.rmtree, _CACHE_DIR, ignore_errors=True)
    jax.config.update("jax_compilation_cache_dir", _CACHE_DIR)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def budgeted_run(name: str, cfg: fdl.Config, seconds: float, workdir_root: str,
                 warmup_steps: int | None = None, precompile: bool = True) -> dict:
  """Trains `cfg` (an Experiment config) from scratch for `seconds`; returns a summary row.

  The config gets: no draft heads, `train.time_budget_s = seconds`, no intermediate
  checkpoints, no progress bar, metrics logged every 10 steps, a fresh workdir. With
  `precompile`, an identical run with a ~0 s budget (1 step + eval, discarded workdir) first
  fills a persistent compilation cache, so the budget is spent on training rather than on
  compiling (which takes minutes on a loaded CPU). The summary has eval loss/accuracy,
  tokens/s (steady-state steps, from TrainResult), steps done, parameters, the load average
  before and after, and every `moe/*` scalar of metrics.jsonl (mean over logged steps, last).
  """
  from effx.train import train

  cfg.heads = []
  cfg.train.checkpoint_every = 0
  cfg.train.progress_bar = False
  cfg.train.log_every = 10
  if warmup_steps is not None:
    cfg.train.warmup_steps = warmup_steps
  if precompile:
    _enable_compilation_cache(workdir_root)
    cfg.train.time_budget_s = 1e-6
    exp = fdl.build(cfg)
    t0 = time.perf_counter()
    scratch = tempfile.mkdtemp(prefix=f"effx_{name}_warmup_", dir=workdir_root)
    train(exp.model, exp.train, exp.mesh, exp.data, scratch, log=lambda m: None)
    shutil.rmtree(scratch, ignore_errors=True)
    print(f"  warm-up (compile) run: {time.perf_counter() - t0:.0f} s", flush=True)
  cfg.train.time_budget_s = float(seconds)
  exp = fdl.build(cfg)
  workdir = tempfile.mkdtemp(prefix=f"effx_{name}_", dir=workdir_root)
  load_before = _load()
  messages: list[str] = []
  t0 = time.perf_counter()
  result = train(exp.model, exp.train, exp.mesh, exp.data, workdir, log=messages.append)
  wall = time.perf_counter() - t0
  params = next((m.split(" parameters")[0].split("model: ")[1] for m in messages
                 if m.startswith("model: ")), "?")
  logged: dict[str, list[float]] = {}
  path = os.path.join(workdir, "metrics.jsonl")
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        rec = json.loads(line)
        for k, v in rec.items():
          if k.startswith("moe/") and isinstance(v, (int, float)):
            logged.setdefault(k, []).append(float(v))
  return dict(
      name=name, workdir=workdir, params=params, steps=result.steps_done,
      stopped_by=result.stopped_by, eval_loss=result.eval.get("eval_loss", float("nan")),
      eval_accuracy=result.eval.get("eval_accuracy", float("nan")),
      tokens_per_second=result.tokens_per_second, wall_s=wall,
      tokens=result.steps_done * exp.data.batch_size * exp.data.seq_len,
      load_before=load_before, load_after=_load(),
      moe={k: (float(np.mean(v)), v[-1]) for k, v in logged.items()})


def budget_note(seconds: float, warmup: int | None) -> str:
  base = configs.lm_tiny()
  return (f"`lm_tiny` (embed {base.model.embed_dim}, {base.model.num_layers} layers, "
          f"{base.model.layer_pattern[0].attention.num_heads} heads, batch "
          f"{base.data.batch_size} x {base.data.seq_len} bytes of the embedded stdlib corpus, "
          f"AdamW peak lr {base.train.learning_rate:g}, warmup "
          f"{base.train.warmup_steps if warmup is None else f'{warmup} (lm_tiny: {base.train.warmup_steps})'}"
          f" steps, cosine over "
          f"{base.train.steps} steps) without draft heads, trained from scratch for "
          f"`train.time_budget_s = {seconds:g}` s of wall time each (compilation paid "
          f"beforehand by an identical discarded 1-step run through a persistent XLA "
          f"compilation cache, so the budget buys training steps), "
          f"then scored on the same {base.data.eval_batches} held-out eval batches "
          f"(`eval loss` = nats per token; tokens are bytes). tokens/s counts steady-state "
          f"steps only (the first, compiling step excluded); runs are sequential, so each saw "
          f"a different "
          f"load (load average 1/5/15 min before -> after each run is in the table) and "
          f"tokens/s on this shared 2-core CPU is noisy: with a budget this short the "
          f"loss ranks mostly reflect how many steps each kind got, not its final quality.")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--seconds", type=float, default=60.0, help="training budget per kind")
  parser.add_argument("--kinds", default=",".join(KINDS), help=f"subset of {','.join(KINDS)}")
  parser.add_argument("--warmup-steps", type=int, default=10,
                      help="lm_tiny's warmup (100) is longer than a short budget's run; "
                           "-1 keeps it")
  parser.add_argument("--workdir-root", default="/tmp")
  parser.add_argument("--no-write", action="store_true", help="print only")
  args = parser.parse_args()
  kinds = [k for k in args.kinds.split(",") if k]
  unknown = set(kinds) - set(KINDS)
  if unknown:
    raise SystemExit(f"--kinds: unknown {sorted(unknown)}; allowed: {list(KINDS)}")

  warmup = None if args.warmup_steps < 0 else args.warmup_steps
  rows = []
  for k in kinds:
    label, fiddler = KINDS[k]
    print(f"== {k}: {label} ({args.seconds:g} s)", flush=True)
    row = budgeted_run(k, fiddler(configs.lm_tiny()), args.seconds, args.workdir_root,
                       warmup)
    print(row, flush=True)
    rows.append((label, row))

  lines = [budget_note(args.seconds, warmup), "",
           "| attention | params | steps | tokens seen | eval loss | eval acc | tokens/s | "
           "load before -> after |",
           "|---|---:|---:|---:|---:|---:|---:|---|"]
  for label, r in rows:
    lines.append(f"| {label} | {r['params']} | {r['steps']} | {r['tokens']:,} | "
                 f"{r['eval_loss']:.3f} | {r['eval_accuracy']:.3f} | "
                 f"{r['tokens_per_second']:,.0f} | {r['load_before']} -> {r['load_after']} |")
  moh = [(label, r) for label, r in rows if "moe/active_head_fraction" in r["moe"]]
  for label, r in moh:
    lines.append(f"\n{label}: logged `active_head_fraction` "
                 f"{r['moe']['moe/active_head_fraction'][1]:.2f}.")
  body = "\n".join(lines)
  print(body)
  if not args.no_write:
    append_section("Attention kinds: same-budget training (CPU)", body)


if __name__ == "__main__":
  main()
