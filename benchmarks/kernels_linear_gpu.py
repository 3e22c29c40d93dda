r"""Chunked causal linear attention on GPU: our Mosaic GPU kernels vs the XLA chunked reference.

Usage:
  python benchmarks/kernels_linear_gpu.py --quick    # H200: ~90 s (T 2k, 8k; 5 timing calls)
  python benchmarks/kernels_linear_gpu.py            # T 2k, 8k, 32k; 20 timing calls
  options: --budget S (start no timing row after S seconds), --watchdog S (dump every thread's
  Python stack when one stage makes no progress for S seconds; 0: off)

Every stage prints a progress line ``[elapsed s] ...`` (flushed) before and after it: imports,
each compile (kernel and reference, separately from the first run), each correctness case and
each timing row, so a hang or a slow compile is localised by the last line printed (and by the
watchdog's stack dump). A failing stage prints its traceback and the run goes on.

Correctness first (bf16, initial state; y, final state and the gradients in q, k, v,
log_decay, initial state vs the reference, errors relative to max|reference|): RetNet per-head
decay cases: a tiny one (batch 1, T 256, 2 heads, d 64: forward alone, then forward +
backward), a packed-documents one (batch 1, T 1000, 16 heads, d 128, 3 segments; T not a chunk
multiple) and, without --quick, batch 4 x T 4096; then a Based-shaped case (d_k = 273, the
Taylor map of 16 features, padded to 320 = five d_k tiles; d_v 64; per-token scalar gates
``[B, T, H]``, 3 docs) and a GLA case (per-channel gates, d 128, 3 docs), both batch 1,
T 1000, 16 heads. Then forward and
forward+backward timings at batch x T = 32k tokens, 16 heads: Based (d_k 273, d_v 64) and GLA
(d 128) rows at T 8k, then d_k = d_v = 128 RetNet at every T (the XLA reference at T <= 8k only
with --quick). Each timing row also reports the kernel's error against XLA at that shape.

GLA on GPU: the kernel runs the inter-chunk recurrence and XLA the sub-chunk intra-chunk term,
so the GLA rows time that hybrid against the all-XLA reference.

``run(quick)`` returns the markdown section (the caller decides where it goes; this script does
not write BENCHMARKS.md); the progress lines go to stdout as they happen.

TFLOP/s counts the chunked algorithm's matmul work (C = 64), the same for both
implementations: per token and head, forward ``2C(d_k + d_v) + 4 d_k d_v`` (intra-chunk
``Q Kᵀ`` and ``A V``, inter-chunk ``Q S`` and ``Kᵀ V``) and backward ``2C(3 d_k + 2 d_v)
+ 8 d_k d_v`` (unpadded d_k, d_v; GLA's elementwise sub-chunk work is not counted). % of peak
is against the dense bf16 tensor-core peak (H100/H200 989 TFLOP/s). The kernel runs one CTA per
(batch, head, 64-wide d_v tile, d_k tile <= 128 rows) walking the chunks in order, so at
batch 1 (T = 32k) only 32 CTAs are busy: that row shows the sequential-chunk limit.
"""

from __future__ import annotations

import argparse
import faulthandler
import os
import sys
import time
import traceback

T_START = time.perf_counter()
WATCHDOG_S = [0.0]      # re-armed by every progress line; 0 = off


def log(msg: str) -> None:
  """One flushed progress line with the elapsed time; re-arms the no-progress watchdog."""
  print(f"[{time.perf_counter() - T_START:6.1f} s] {msg}", flush=True)
  if WATCHDOG_S[0] > 0:
    faulthandler.cancel_dump_traceback_later()
    faulthandler.dump_traceback_later(WATCHDOG_S[0], repeat=True)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

log("importing jax and the kernels")
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from effx.pallas_kernels.linear_attention import gpu as la_gpu  # noqa: E402
from effx.pallas_kernels.linear_attention.reference import linear_attention_reference  # noqa: E402

log(f"imports done (jax {jax.__version__})")

PEAK_BF16 = {"h100": 989.0, "h200": 989.0, "h800": 989.0, "gh200": 989.0}
CHUNK = 64
HEADS, DIM = 16, 128
TOKENS = 32 * 1024
LENGTHS = {True: (2048, 8192), False: (2048, 8192, 32768)}     # by quick
BASED_DK, BASED_DV = 273, 64          # Based: Taylor features of 16 dims, 1 + 16 + 16²
VARIANT_T = 8192                      # T of the Based and GLA timing rows
XLA_MAX_T = {True: 8192, False: 32768}
NAMES = ("y", "state", "dq", "dk", "dv", "dlog_decay", "ds0")
TOL = 5e-2


def _peak() -> float | None:
  kind = jax.devices()[0].device_kind.lower()
  return next((v for k, v in PEAK_BF16.items() if k in kind), None)


def _inputs(b, t, h, dk, dv=None, kind="retnet", seed=0, dtype=jnp.bfloat16):
  """q, k, v, log_decay, s0, dy, dS. log_decay by kind: "retnet" γ_h ``[h]``, "scalar"
  per-token scalar gates ``[b, t, h]``, "gla" per-channel gates ``[b, t, h, dk]``."""
  dv = dv or dk
  ks = jax.random.split(jax.random.key(seed), 7)
  q = (jax.random.normal(ks[0], (b, t, h, dk), jnp.float32) / np.sqrt(dk)).astype(dtype)
  k = (jax.random.normal(ks[1], (b, t, h, dk), jnp.float32) / np.sqrt(dk)).astype(dtype)
  v = jax.random.normal(ks[2], (b, t, h, dv), jnp.float32).astype(dtype)
  if kind in ("gla", "scalar"):  # log σ(x + 4): about -0.02 per token (and channel)
    shape = (b, t, h, dk) if kind == "gla" else (b, t, h)
    g = jax.nn.log_sigmoid(jax.random.normal(ks[6], shape, jnp.float32) + 4.0)
  else:
    g = jnp.log1p(-jnp.exp2(-5.0 - jnp.arange(h, dtype=jnp.float32) * 3.0 / h))  # RetNet γ_h
  s0 = jax.random.normal(ks[3], (b, h, dk, dv), jnp.float32)
  dy = jax.random.normal(ks[4], (b, t, h, dv), jnp.float32).astype(dtype)
  ds = jax.random.normal(ks[5], (b, h, dk, dv), jnp.float32)
  return q, k, v, g, s0, dy, ds


def _ours(q, k, v, g, s0=None, seg=None):
  return la_gpu.linear_attention_gpu(q, k, v, log_decay=g, initial_state=s0, segment_ids=seg)


def _ref(q, k, v, g, s0=None, seg=None):
  return linear_attention_reference(q, k, v, log_decay=g, initial_state=s0, segment_ids=seg,
                                    chunk_size=CHUNK)


def _fwd(fn):
  """(q, k, v, g, s0, seg) -> (y, state)."""
  return lambda q, k, v, g, s0, seg: fn(q, k, v, g, s0, seg)


def _fwd_bwd(fn):
  """(q, k, v, g, s0, dy, ds, seg) -> ((y, state), gradients in q, k, v, g, s0)."""
  def f(q, k, v, g, s0, dy, ds, seg):
    out, vjp = jax.vjp(lambda *a: fn(*a, seg=seg), q, k, v, g, s0)
    return out, vjp((dy, ds))
  return f


def _compile(label: str, fn, *args):
  """jit + lower + compile with progress lines; returns the compiled callable."""
  log(f"{label}: compiling")
  t0 = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  log(f"{label}: compiled in {time.perf_counter() - t0:.1f} s")
  return compiled


def _call(label: str, compiled, *args):
  """One call, waited for, with progress lines."""
  log(f"{label}: running")
  t0 = time.perf_counter()
  out = jax.block_until_ready(compiled(*args))
  log(f"{label}: ran in {time.perf_counter() - t0:.2f} s")
  return out


def _rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.abs(a - b).max() / max(1e-6, np.abs(b).max()))


def _errors(got, want) -> list[float]:
  return [_rel_err(a, r) for a, r in zip(jax.tree.leaves(got), jax.tree.leaves(want))]


def _check(title: str, b: int, t: int, h: int, d: int, seg_parts: int, fwd_only: bool,
           dv: int | None = None, kind: str = "retnet") -> str:
  """One correctness case: our kernels vs the reference; returns the markdown row."""
  q, k, v, g, s0, dy, ds = _inputs(b, t, h, d, dv, kind, seed=1)
  seg = None
  if seg_parts:
    seg = jnp.asarray(np.minimum(np.arange(t) * seg_parts // t + 1, seg_parts)[None]
                      .repeat(b, 0), jnp.int32)
  args = (q, k, v, g, s0, seg) if fwd_only else (q, k, v, g, s0, dy, ds, seg)
  make = _fwd if fwd_only else _fwd_bwd
  got = _call(f"{title} ours", _compile(f"{title} ours", make(_ours), *args), *args)
  want = _call(f"{title} XLA", _compile(f"{title} XLA", make(_ref), *args), *args)
  errs = _errors(got, want)
  ok = all(np.isfinite(errs)) and max(errs) < TOL
  cells = ", ".join(f"{n} {e:.1e}" for n, e in zip(NAMES, errs))
  row = f"| {title} | {cells} | {'ok' if ok else 'FAIL'} |"
  log(row)
  return row


def check(quick: bool) -> list[str]:
  cases = [("tiny B 1, T 256, H 2, d 64, fwd", 1, 256, 2, 64, 0, True),
           ("tiny B 1, T 256, H 2, d 64, fwd+bwd", 1, 256, 2, 64, 0, False),
           ("B 1, T 1000, H 16, d 128, 3 packed docs, fwd+bwd", 1, 1000, HEADS, DIM, 3, False)]
  if not quick:
    cases.append(("B 4, T 4096, H 16, d 128, fwd+bwd", 4, 4096, HEADS, DIM, 0, False))
  cases += [(f"Based d_k {BASED_DK}, d_v {BASED_DV}, B 1, T 1000, H 16, 3 docs, fwd+bwd", 1,
             1000, HEADS, BASED_DK, 3, False, BASED_DV, "scalar"),
            ("GLA gates, B 1, T 1000, H 16, d 128, 3 docs, fwd+bwd", 1, 1000, HEADS, DIM, 3,
             False, DIM, "gla")]
  rows = ["| check (bf16, initial state; RetNet γ_h unless named) | max error / max | result |",
          "|---|---|---|"]
  for title, *spec in cases:
    log(f"check {title}: start")
    try:
      rows.append(_check(title, *spec))
    except Exception:  # noqa: BLE001 - report the failure, keep going
      traceback.print_exc()
      sys.stdout.flush()
      rows.append(f"| {title} | failed: see log | FAIL |")
      log(f"check {title}: FAILED (traceback above)")
  return rows


def _time(label: str, compiled, args, iters: int):
  """(median seconds after one warm-up call, the warm-up's outputs)."""
  out = _call(f"{label} warm-up", compiled, *args)
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - t0)
  med = float(np.median(times))
  log(f"{label}: median {1e3 * med:.2f} ms over {iters} calls")
  return med, out


def _flops(b, t, dk, dv, fwd_only: bool) -> float:
  per_tok = 2 * CHUNK * (dk + dv) + 4 * dk * dv
  if not fwd_only:
    per_tok += 2 * CHUNK * (3 * dk + 2 * dv) + 8 * dk * dv
  return float(per_tok) * b * t * HEADS


def _rows(quick: bool):
  """(shape label, kind, T, d_k, d_v) of every timing row group, in order: the Based and GLA
  rows first (the budget may cut the last rows), then d 128 RetNet at every T."""
  rows = [(f"Based d_k {BASED_DK} d_v {BASED_DV}", "scalar", VARIANT_T, BASED_DK, BASED_DV),
          ("GLA d 128", "gla", VARIANT_T, DIM, DIM)]
  return rows + [("RetNet d 128", "retnet", t, DIM, DIM) for t in LENGTHS[quick]]


def timings(quick: bool, budget_s: float) -> list[str]:
  peak = _peak()
  iters = 5 if quick else 20
  rows = ["| shape | T | batch | pass | ours ms | XLA ms | speed-up | ours TFLOP/s (% peak) | "
          "XLA TFLOP/s (% peak) | max err vs XLA |", "|---|---|---|---|---|---|---|---|---|---|"]
  for shape, kind, t, dk, dv in _rows(quick):
    b = TOKENS // t
    q, k, v, g, _, dy, ds = _inputs(b, t, HEADS, dk, dv, kind)
    for name, fwd_only in (("fwd", True), ("fwd+bwd", False)):
      args = (q, k, v, g, None, None) if fwd_only else (q, k, v, g, None, dy, ds, None)
      make = _fwd if fwd_only else _fwd_bwd
      res, outs, failed = {}, {}, set()
      for impl, fn in (("ours", _ours), ("xla", _ref)):
        label = f"time {shape} T {t} B {b} {name} {impl}"
        res[impl] = None
        if impl == "xla" and t > XLA_MAX_T[quick]:
          continue
        if time.perf_counter() - T_START > budget_s:
          log(f"{label}: skipped (past the {budget_s:.0f} s budget)")
          continue
        try:
          res[impl], outs[impl] = _time(label, _compile(label, make(fn), *args), args, iters)
        except Exception:  # noqa: BLE001
          traceback.print_exc()
          sys.stdout.flush()
          failed.add(impl)
          log(f"{label}: FAILED (traceback above)")
      fl = _flops(b, t, dk, dv, fwd_only)

      def cell(impl):
        s = res[impl]
        if s is None:
          return ("failed" if impl in failed else "n/a"), "n/a"
        tf = fl / s / 1e12
        pct = f" ({100 * tf / peak:.1f} %)" if peak else ""
        return f"{1e3 * s:.2f}", f"{tf:.1f}{pct}"

      (o_ms, o_tf), (x_ms, x_tf) = cell("ours"), cell("xla")
      sp = f"{res['xla'] / res['ours']:.2f}x" if res["ours"] and res["xla"] else "n/a"
      err = (f"{max(_errors(outs['ours'], outs['xla'])):.1e}"
             if "ours" in outs and "xla" in outs else "n/a")
      row = (f"| {shape} | {t} | {b} | {name} | {o_ms} | {x_ms} | {sp} | {o_tf} | {x_tf} | "
             f"{err} |")
      log(row)
      rows.append(row)
  return rows


def run(quick: bool, budget_s: float | None = None) -> str:
  """The markdown section: correctness checks, then the timing table."""
  if budget_s is None:
    budget_s = 80.0 if quick else 300.0
  kind = jax.devices()[0].device_kind
  log(f"device {kind}; quick={quick}, timing rows start until {budget_s:.0f} s")
  head = (f"Chunked causal linear attention (C = {CHUNK}), Mosaic GPU kernels "
          f"(`linear_attention/gpu.py`) vs the XLA chunked reference, on {kind}; bf16, "
          f"{HEADS} heads, batch x T = {TOKENS} tokens; d_k = d_v = {DIM} with RetNet "
          f"per-head decay, Based-shaped d_k {BASED_DK} / d_v {BASED_DV} (per-token scalar "
          f"gates) and GLA per-channel gates (d {DIM}; kernel = inter-chunk part, XLA = "
          "intra-chunk part). "
          f"Medians of {5 if quick else 20} calls after a warm-up. FLOPs: the chunked "
          "algorithm's matmuls (module docstring), same count for both.")
  body = [head, ""] + check(quick) + [""] + timings(quick, budget_s)
  body.append(f"\n_total wall time {time.perf_counter() - T_START:.0f} s_")
  log("done")
  return "\n".join(body) + "\n"


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="T 2k and 8k, 5 timing calls")
  parser.add_argument("--budget", type=float, default=None,
                      help="seconds after which no timing row starts (80 quick, 300 full)")
  parser.add_argument("--watchdog", type=float, default=25.0,
                      help="dump all Python stacks after this many seconds without progress")
  cli = parser.parse_args()
  WATCHDOG_S[0] = cli.watchdog
  print(run(cli.quick, cli.budget), flush=True)
  faulthandler.cancel_dump_traceback_later()
