r"""Measures the device's dense-matmul peak and the train step's achieved FLOP/s (MFU).

Usage: python -m benchmarks.train_throughput [--config lm_tiny] [--steps 10]
Appends a "Train throughput" section to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import time

import fiddle as fdl
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks._report import append_section
from effx import perf
from effx.data import make_train_iterator
from effx.train import Trainer
from experiments import configs


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--config", default="lm_tiny", help="a config function of experiments.configs")
  parser.add_argument("--steps", type=int, default=10, help="timed steps (after 2 warm-up steps)")
  parser.add_argument("--no-write", action="store_true", help="print only")
  args = parser.parse_args()

  exp = fdl.build(getattr(configs, args.config)())
  rows = []
  for dtype in (jnp.float32, jnp.bfloat16):
    rows.append((f"`jnp.dot` 2048x2048 {jnp.dtype(dtype).name}",
                 perf.measure_matmul_peak(dtype, size=2048, min_seconds=1.0)))
  peak_f32 = rows[0][1]
  trainer = Trainer(exp.model, exp.train, exp.mesh, exp.data.seq_len, exp.data.batch_size)
  state = trainer.init_state()
  batches = make_train_iterator(exp.data)
  batch = next(batches)
  flops = trainer.step_flops(state, batch)
  compiled = trainer._train_step.lower(state, trainer._device_batch(batch)).compile()
  xla_flops = perf.compiled_flops(compiled)
  for _ in range(2):
    state, metrics = trainer.train_step(state, next(batches))
  jax.block_until_ready(metrics)
  times = []
  for _ in range(args.steps):
    b = next(batches)
    t0 = time.perf_counter()
    state, metrics = trainer.train_step(state, b)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t0)
  step_s = float(np.median(times))
  tokens = exp.data.batch_size * exp.data.seq_len
  achieved = flops / step_s
  datasheet = perf.datasheet_peak()
  body = [
      f"Config `{args.config}`: {trainer.num_params:,} parameters, batch {exp.data.batch_size} x "
      f"{exp.data.seq_len} tokens, compute dtype {jnp.dtype(exp.model.dtype).name}.",
      "",
      "| measurement | value |",
      "|---|---|",
  ]
  body += [f"| peak: {name} | {value / 1e9:,.1f} GFLOP/s |" for name, value in rows]
  if datasheet:
    body.append(f"| peak: datasheet bf16 | {datasheet / 1e12:,.0f} TFLOP/s |")
  body += [
      f"| train step model FLOPs (6N + attention, per step) | {flops / 1e9:,.2f} GFLOP |",
      f"| XLA cost analysis (counts a scanned loop body once) | "
      f"{(xla_flops or 0) / 1e9:,.2f} GFLOP |",
      f"| median step time ({args.steps} steps) | {step_s * 1e3:,.1f} ms |",
      f"| tokens/s | {tokens / step_s:,.0f} |",
      f"| achieved | {achieved / 1e9:,.1f} GFLOP/s |",
      f"| MFU vs measured f32 matmul peak | {achieved / peak_f32:.1%} |",
  ]
  if datasheet and jax.default_backend() != "cpu":
    body.append(f"| MFU vs datasheet bf16 peak | {achieved / datasheet:.1%} |")
  text = "\n".join(body)
  print(text)
  if not args.no_write:
    append_section(f"Train throughput ({args.config})", text)


if __name__ == "__main__":
  main()
