r"""Chunked causal linear attention on GPU: our Mosaic GPU kernels vs the XLA chunked reference.

Usage:
  python benchmarks/kernels_linear_gpu.py            # H200: < 60 s; prints a markdown section
  python benchmarks/kernels_linear_gpu.py --quick    # fewer timing iterations

``run(quick)`` returns the markdown section (the caller decides where it goes; this script does
not write BENCHMARKS.md). First a correctness check at a realistic shape (bf16, batch 4,
T 4096, 16 heads, d_k = d_v = 128, RetNet per-head decay; y, final state and the gradients in
q, k, v, log_decay, initial state vs the reference, errors relative to max|reference|), and a
small packed-segments case. Then forward and forward+backward timings at T = 2k, 8k, 32k with
batch x T = 32k tokens (same shapes and decay).

TFLOP/s counts the chunked algorithm's matmul work (C = 64), the same for both
implementations: per token and head, forward ``2C(d_k + d_v) + 4 d_k d_v`` (intra-chunk
``Q Kᵀ`` and ``A V``, inter-chunk ``Q S`` and ``Kᵀ V``) and backward ``2C(3 d_k + 2 d_v)
+ 8 d_k d_v``. % of peak is against the dense bf16 tensor-core peak (H100/H200 989 TFLOP/s).
The kernel runs one CTA per (batch, head, 64-wide d_v tile) walking the chunks in order, so at
batch 1 (T = 32k) only 32 CTAs are busy: that row shows the sequential-chunk limit.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from effx.pallas_kernels.linear_attention import gpu as la_gpu  # noqa: E402
from effx.pallas_kernels.linear_attention.reference import linear_attention_reference  # noqa: E402

PEAK_BF16 = {"h100": 989.0, "h200": 989.0, "h800": 989.0, "gh200": 989.0}
CHUNK = 64
HEADS, DIM = 16, 128
TOKENS = 32 * 1024
LENGTHS = (2048, 8192, 32768)
CHECKS = (("B 4, T 4096", 4, 4096, 0), ("B 1, T 1000, 3 packed docs", 1, 1000, 3))


def _peak() -> float | None:
  kind = jax.devices()[0].device_kind.lower()
  return next((v for k, v in PEAK_BF16.items() if k in kind), None)


def _inputs(b, t, h, d, seed=0, dtype=jnp.bfloat16):
  ks = jax.random.split(jax.random.key(seed), 6)
  q = (jax.random.normal(ks[0], (b, t, h, d), jnp.float32) / np.sqrt(d)).astype(dtype)
  k = (jax.random.normal(ks[1], (b, t, h, d), jnp.float32) / np.sqrt(d)).astype(dtype)
  v = jax.random.normal(ks[2], (b, t, h, d), jnp.float32).astype(dtype)
  g = jnp.log1p(-jnp.exp2(-5.0 - jnp.arange(h, dtype=jnp.float32) * 3.0 / h))  # RetNet γ_h
  s0 = jax.random.normal(ks[3], (b, h, d, d), jnp.float32)
  dy = jax.random.normal(ks[4], (b, t, h, d), jnp.float32).astype(dtype)
  ds = jax.random.normal(ks[5], (b, h, d, d), jnp.float32)
  return q, k, v, g, s0, dy, ds


def _ours(q, k, v, g, s0=None, seg=None):
  return la_gpu.linear_attention_gpu(q, k, v, log_decay=g, initial_state=s0, segment_ids=seg)


def _ref(q, k, v, g, s0=None, seg=None):
  return linear_attention_reference(q, k, v, log_decay=g, initial_state=s0, segment_ids=seg,
                                    chunk_size=CHUNK)


def _fwd_bwd(fn):
  """jit: (y, state) and all five gradients for cotangents (dy, ds)."""
  def f(q, k, v, g, s0, dy, ds, seg):
    out, vjp = jax.vjp(lambda *a: fn(*a, seg=seg), q, k, v, g, s0)
    return out, vjp((dy, ds))
  return jax.jit(f)


def _rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.abs(a - b).max() / max(1e-6, np.abs(b).max()))


def _check_case(title, b, t, seg_parts) -> list[str]:
  q, k, v, g, s0, dy, ds = _inputs(b, t, HEADS, DIM, seed=1)
  seg = None
  if seg_parts:
    seg = jnp.asarray(np.minimum(np.arange(t) * seg_parts // t + 1, seg_parts)[None]
                      .repeat(b, 0), jnp.int32)
  got = _fwd_bwd(_ours)(q, k, v, g, s0, dy, ds, seg)
  want = _fwd_bwd(_ref)(q, k, v, g, s0, dy, ds, seg)
  names = ("y", "state", "dq", "dk", "dv", "dlog_decay", "ds0")
  errs = [_rel_err(a, r) for a, r in zip(jax.tree.leaves(got), jax.tree.leaves(want))]
  ok = all(np.isfinite(errs)) and max(errs) < 5e-2
  cells = ", ".join(f"{n} {e:.1e}" for n, e in zip(names, errs))
  line = f"| {title} | {cells} | {'ok' if ok else 'FAIL'} |"
  print(line, flush=True)
  return [line]


def check() -> list[str]:
  lines = [f"| check (bf16, {HEADS} heads, d {DIM}, RetNet decay, s0) | max error / max | "
           "result |",
           "|---|---|---|"]
  for title, b, t, seg in CHECKS:
    try:
      lines += _check_case(title, b, t, seg)
    except Exception:  # noqa: BLE001 - report the failure, keep benchmarking the reference
      traceback.print_exc()
      lines.append(f"| {title} | kernel failed: see log | FAIL |")
  return lines


def _time(fn, *args, iters: int) -> float:
  """Median seconds of ``fn(*args)`` after one warm-up call."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def _flops(b, t, fwd_only: bool) -> float:
  per_tok = 2 * CHUNK * 2 * DIM + 4 * DIM * DIM
  if not fwd_only:
    per_tok += 2 * CHUNK * 5 * DIM + 8 * DIM * DIM
  return float(per_tok) * b * t * HEADS


def timings(quick: bool) -> list[str]:
  peak = _peak()
  iters = 5 if quick else 20
  lines = ["| T | batch | pass | ours ms | XLA ms | speed-up | ours TFLOP/s (% peak) | "
           "XLA TFLOP/s (% peak) |", "|---|---|---|---|---|---|---|---|"]
  for t in LENGTHS:
    b = TOKENS // t
    q, k, v, g, _, dy, ds = _inputs(b, t, HEADS, DIM)
    for name, fwd_only in (("fwd", True), ("fwd+bwd", False)):
      res = {}
      for impl, fn in (("ours", _ours), ("xla", _ref)):
        try:
          if fwd_only:
            f = jax.jit(lambda q, k, v, g, fn=fn: fn(q, k, v, g))
            res[impl] = _time(f, q, k, v, g, iters=iters)
          else:
            f = _fwd_bwd(fn)
            res[impl] = _time(f, q, k, v, g, None, dy, ds, None, iters=iters)
        except Exception:  # noqa: BLE001
          traceback.print_exc()
          res[impl] = None
      fl = _flops(b, t, fwd_only)

      def cell(s):
        if s is None:
          return "failed", "n/a"
        tf = fl / s / 1e12
        pct = f" ({100 * tf / peak:.1f} %)" if peak else ""
        return f"{1e3 * s:.2f}", f"{tf:.1f}{pct}"

      (o_ms, o_tf), (x_ms, x_tf) = cell(res["ours"]), cell(res["xla"])
      sp = (f"{res['xla'] / res['ours']:.2f}x" if res["ours"] and res["xla"] else "n/a")
      line = f"| {t} | {b} | {name} | {o_ms} | {x_ms} | {sp} | {o_tf} | {x_tf} |"
      print(line, flush=True)
      lines.append(line)
  return lines


def run(quick: bool) -> str:
  """The markdown section: correctness at a realistic shape, then the timing table."""
  t0 = time.time()
  kind = jax.devices()[0].device_kind
  head = (f"Chunked causal linear attention (C = {CHUNK}), Mosaic GPU kernels "
          f"(`linear_attention/gpu.py`) vs the XLA chunked reference, on {kind}; bf16, "
          f"{HEADS} heads, d_k = d_v = {DIM}, RetNet per-head decay, batch x T = {TOKENS} "
          "tokens. Medians of "
          f"{5 if quick else 20} calls after a warm-up. FLOPs: the chunked algorithm's matmuls "
          "(module docstring), same count for both.")
  body = [head, ""] + check() + [""] + timings(quick)
  body.append(f"\n_total wall time {time.time() - t0:.0f} s_")
  return "\n".join(body) + "\n"


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="5 timing iterations instead of 20")
  print(run(parser.parse_args().quick))
