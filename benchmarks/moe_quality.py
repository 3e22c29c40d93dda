r"""Same-budget training runs of lm_tiny: dense FFN vs MoE vs MoE + a shared expert.

Usage: python -m benchmarks.moe_quality [--seconds 60] [--variants dense,moe,moe_shared]
           [--experts 8] [--top-k 2] [--warmup-steps 10] [--workdir-root /tmp] [--no-write]

Each variant trains `experiments.configs.lm_tiny()` (no draft heads) from scratch in a fresh
workdir for `train.time_budget_s = --seconds` (compilation paid beforehand) and is scored on
the same held-out eval batches (see benchmarks/attention_quality.py, whose runner this reuses). MoE
variants use the `with_moe` fiddler in every layer: `--experts` experts, top-`--top-k`, expert
width = dense width / top_k (same active FFN parameters per token as the dense model),
dropless dispatch (the fiddler's default); `moe_shared` adds one always-on shared expert
(`num_shared_experts=1`), which adds one more expert's worth of active parameters. The
optional `moe_capacity` variant uses capacity dispatch (factor 1.25) so that the drop rate
is not trivially 0. The drop rate is the `moe/drop_rate` the train step logs to
metrics.jsonl (mean over the logged steps, and the last logged value).
Appends "## MoE: same-budget training" to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse

from benchmarks._report import append_section
from benchmarks.attention_quality import budget_note, budgeted_run
from experiments import configs

VARIANTS = ("dense", "moe", "moe_shared", "moe_capacity")


def _config(variant: str, experts: int, top_k: int):
  cfg = configs.lm_tiny()
  if variant == "moe":
    return configs.with_moe(cfg, num_experts=experts, top_k=top_k)
  if variant == "moe_shared":
    return configs.with_moe(cfg, num_experts=experts, top_k=top_k, num_shared_experts=1)
  if variant == "moe_capacity":
    return configs.with_moe(cfg, num_experts=experts, top_k=top_k, dispatch="capacity",
                            capacity_factor=1.25)
  return cfg


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--seconds", type=float, default=60.0, help="training budget per variant")
  parser.add_argument("--variants", default="dense,moe,moe_shared",
                      help=f"subset of {','.join(VARIANTS)}")
  parser.add_argument("--experts", type=int, default=8)
  parser.add_argument("--top-k", type=int, default=2)
  parser.add_argument("--warmup-steps", type=int, default=10,
                      help="lm_tiny's warmup (100) is longer than a short budget's run; "
                           "-1 keeps it")
  parser.add_argument("--workdir-root", default="/tmp")
  parser.add_argument("--no-write", action="store_true", help="print only")
  args = parser.parse_args()
  variants = [v for v in args.variants.split(",") if v]
  unknown = set(variants) - set(VARIANTS)
  if unknown:
    raise SystemExit(f"--variants: unknown {sorted(unknown)}; allowed: {list(VARIANTS)}")

  dense_dim = configs.lm_tiny().model.layer_pattern[0].ffn.hidden_dim
  labels = {
      "dense": f"dense SwiGLU FFN (width {dense_dim})",
      "moe": f"MoE {args.experts} experts top-{args.top_k} (width {dense_dim // args.top_k}, "
             f"dropless)",
      "moe_shared": f"MoE {args.experts} experts top-{args.top_k} + 1 shared expert (dropless)",
      "moe_capacity": f"MoE {args.experts} experts top-{args.top_k} (capacity 1.25)",
  }
  warmup = None if args.warmup_steps < 0 else args.warmup_steps
  rows = []
  for v in variants:
    print(f"== {v}: {labels[v]} ({args.seconds:g} s)", flush=True)
    row = budgeted_run(v, _config(v, args.experts, args.top_k), args.seconds,
                       args.workdir_root, warmup)
    print(row, flush=True)
    rows.append((labels[v], row))

  lines = [budget_note(args.seconds, warmup), "",
           "| FFN | params | steps | tokens seen | eval loss | eval acc | tokens/s | "
           "drop rate (mean / last logged) | load before -> after |",
           "|---|---:|---:|---:|---:|---:|---:|---|---|"]
  for label, r in rows:
    drop = r["moe"].get("moe/drop_rate")
    drop_s = (("— (dense)" if label.startswith("dense") else "not logged") if drop is None
              else f"{drop[0]:.4f} / {drop[1]:.4f}")
    lines.append(f"| {label} | {r['params']} | {r['steps']} | {r['tokens']:,} | "
                 f"{r['eval_loss']:.3f} | {r['eval_accuracy']:.3f} | "
                 f"{r['tokens_per_second']:,.0f} | {drop_s} | "
                 f"{r['load_before']} -> {r['load_after']} |")
  lines += ["", "params counts all experts (total, not active). Drop rate is the fraction of "
            "(token, expert) assignments not computed by the train-mode dispatch; dropless "
            "dispatch never drops by construction."]
  body = "\n".join(lines)
  print(body)
  if not args.no_write:
    append_section("MoE: same-budget training (CPU)", body)


if __name__ == "__main__":
  main()
