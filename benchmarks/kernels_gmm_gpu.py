r"""Grouped matmul (dropless MoE) on GPU: the Mosaic GPU kernel vs jax.lax.ragged_dot vs dense.

Usage:
  python benchmarks/kernels_gmm_gpu.py --quick     # correctness + 4 MoE shapes (~1 min, H200)
  python benchmarks/kernels_gmm_gpu.py             # all 16 shapes + block-size sweep
  --budget S: start no further shape (or sweep entry) after S seconds; skipped ones are listed.
  On CPU the same code runs at toy shapes with the kernel interpreted (a smoke test; the
  timings mean nothing there).

First a correctness check at a realistic shape (16k - 37 rows, 2048 -> 1408, 8 experts of
skewed sizes with one empty, bf16): forward and both gradients of ``grouped_matmul(impl=
"pallas")`` vs ``ragged_dot``, max error relative to max |reference|; plus a decode-sized call
(40 rows). Then, per shape (rows M = tokens * top_k in {16k, 64k}; d_model -> d_ff 2048 -> 1408
(DeepSeekMoE-16B style) and 4096 -> 1792 (Mixtral's 14336 / 8); 8 and 64 experts; balanced and
skewed (Zipf, last expert empty) group sizes), the forward and forward + backward (``jax.vjp``:
d_lhs and d_rhs) of:
* ours: ``grouped_matmul(impl="pallas")`` (the Mosaic GPU kernels, default block sizes);
* ragged_dot: ``jax.lax.ragged_dot`` (float32 accumulation; however XLA lowers it on this
  GPU: a cuDNN grouped GEMM or a zero-padded dense dot with G x the flops);
* dense: a per-expert batched einsum ``[E, C, K] x [E, K, N]`` with C = M / E, i.e. the
  capacity-style execution at capacity factor 1.0 (same flops; independent of the group
  sizes, so it is timed once per shape).
TFLOP/s counts 2 M K N for the forward and 6 M K N for forward + backward; % of the dense bf16
peak (H100/H200 SXM: 989 TFLOP/s). Without --quick, a short block-size sweep of our forward
follows (the default, ``BlockSizes.for_device``, first).
Time = min over 3 rounds of back-to-back calls. Each row is printed (with the elapsed seconds)
as soon as it is measured. Any failure is reported in its cell (and its
message printed), so one run also diagnoses a kernel that does not compile. Rows are printed as
they are measured; the markdown is printed again at the end.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

import jax  # noqa: E402
from benchmarks._timing import seconds_per_call  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from effx.pallas_kernels import grouped_matmul as gm  # noqa: E402
from effx.pallas_kernels.grouped_matmul.config import BlockSizes  # noqa: E402

PEAK = {"h100": 989.0, "h200": 989.0, "h800": 989.0}   # dense bf16 TFLOP/s, SXM datasheets
MODELS = ((2048, 1408), (4096, 1792))
SWEEP = (BlockSizes.for_device("gpu", 0, 0, 0), BlockSizes(128, 64, 128, 4),
         BlockSizes(128, 64, 128, 6), BlockSizes(128, 128, 128, 2))


def _peak() -> float | None:
  kind = jax.devices()[0].device_kind.lower()
  return next((v for k, v in PEAK.items() if k in kind), None)


def _time(fn, *args, rounds: int = 3) -> float:
  return seconds_per_call(fn, *args, rounds=rounds, min_time=0.02, max_calls=30)


def _sizes(m: int, e: int, skewed: bool) -> jax.Array:
  """Group sizes summing to m: equal, or Zipf (weight 1 / (i + 1)) with the last expert 0."""
  w = 1.0 / np.arange(1, e + 1) if skewed else np.ones(e)
  if skewed:
    w[-1] = 0.0
  sizes = np.floor(w / w.sum() * m).astype(np.int32)
  sizes[0] += m - sizes.sum()
  return jnp.asarray(sizes)


def _inputs(m, k, n, e, seed=0):
  ks = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(ks[0], (m, k), jnp.float32).astype(jnp.bfloat16)
  w = (jax.random.normal(ks[1], (e, k, n), jnp.float32) / np.sqrt(k)).astype(jnp.bfloat16)
  d = jax.random.normal(ks[2], (m, n), jnp.float32).astype(jnp.bfloat16)
  return x, w, d


def _ours(block_sizes=None):
  """Our kernel through the entry point; off a GPU, interpreted with toy tiles."""
  backend = None if jax.default_backend() == "gpu" else "gpu"
  if backend is not None:
    block_sizes = block_sizes or BlockSizes(64, 64, 64, num_stages=2)

  def f(x, w, gs):
    return gm.grouped_matmul(x, w, gs, impl="pallas", backend=backend, block_sizes=block_sizes)
  return f


def _ragged(x, w, gs):
  return gm.grouped_matmul(x, w, gs, impl="xla")


def _dense(x, w, gs):
  del gs   # capacity-style: every expert gets C = M / E rows
  e, k, _ = w.shape
  c = x.shape[0] // e
  return jnp.einsum("eck,ekn->ecn", x[:e * c].reshape(e, c, k), w,
                    preferred_element_type=jnp.float32).astype(x.dtype)


def _fwd_bwd(f):
  """(out, (d_lhs, d_rhs)) for the cotangent d [M, N] (its first E*C rows, [E, C, N], for
  the dense einsum)."""
  def g(x, w, gs, d):
    out, vjp = jax.vjp(lambda x, w: f(x, w, gs), x, w)
    return out, vjp(d[:out.size // out.shape[-1]].reshape(out.shape).astype(out.dtype))
  return g


def _err(got, want) -> float:
  got, want = jnp.asarray(got, jnp.float32), jnp.asarray(want, jnp.float32)
  return float(jnp.max(jnp.abs(got - want)) / jnp.maximum(jnp.max(jnp.abs(want)), 1e-6))


def _cell(fn):
  """fn() or 'ERR <type>: <message>' (the message is what a failed lowering says)."""
  try:
    return fn()
  except Exception as e:  # noqa: BLE001 -- report in the table and go on
    msg = " ".join(str(e).split())[:300]
    print(f"  ! {type(e).__name__}: {msg}", flush=True)
    return f"ERR {type(e).__name__}"


def correctness(m: int, k: int, n: int, e: int) -> list[str]:
  """Rows of the correctness table: forward and gradients vs ragged_dot, relative errors."""
  rows = []
  for rows_m, label in ((m, "skewed, one expert empty"), (40, "decode-sized")):
    gs = _sizes(rows_m, e, skewed=True)
    x, w, d = _inputs(rows_m, k, n, e, seed=1)

    def check():
      got = jax.jit(_fwd_bwd(_ours()))(x, w, gs, d)
      want = jax.jit(_fwd_bwd(_ragged))(x, w, gs, d)
      errs = [_err(got[0], want[0]), _err(got[1][0], want[1][0]), _err(got[1][1], want[1][1])]
      ok = all(v < 2e-2 for v in errs)
      return " | ".join(f"{v:.1e}" for v in errs) + f" | {'ok' if ok else 'FAIL'}"

    res = _cell(check)
    if res.startswith("ERR"):
      res = f"{res} | | | FAIL"
    rows.append(f"| M{rows_m} K{k} N{n} E{e} ({label}) | {res} |")
    print(rows[-1], flush=True)
  return rows


def run(quick: bool, budget: float | None = None) -> str:
  """Markdown: correctness, then timings (module docstring)."""
  on_gpu = jax.default_backend() == "gpu"
  peak = _peak()
  if on_gpu:
    ms = (16384, 65536)
    models = MODELS
    experts = (8, 64)
    corr = (16384 - 37, 2048, 1408, 8)
  else:   # CPU smoke test: toy shapes, the kernel interpreted
    ms, models, experts, corr = (256,), ((128, 128),), (4,), (200, 128, 128, 4)
  shapes = [(m, kn, e, skew) for m in ms for kn in models for e in experts
            for skew in (False, True)]
  if quick and on_gpu:
    shapes = [(16384, MODELS[0], 8, False), (16384, MODELS[0], 64, True),
              (65536, MODELS[1], 8, True), (65536, MODELS[0], 64, False)]

  out = ["### Correctness vs ragged_dot (max |err| / max |ref|)", "",
         "| shape | out | d_lhs | d_rhs | verdict |", "|---|---|---|---|---|"]
  out += correctness(*corr)

  def rate(t, flops):
    if not isinstance(t, float):
      return [t, "", ""]
    tf = flops / t / 1e12
    return [f"{t * 1e3:.3f}", f"{tf:.1f}", f"{100 * tf / peak:.0f}%" if peak else "n/a"]

  out += ["", "### Timings (bf16)", "",
          "| M | K -> N | E | groups | impl | fwd ms | fwd TFLOP/s | fwd % peak | fwd+bwd ms "
          "| fwd+bwd TFLOP/s | fwd+bwd % peak |", "|---" * 11 + "|"]
  t_start = time.perf_counter()

  def over_budget(what: str) -> bool:
    if budget is None or time.perf_counter() - t_start < budget:
      return False
    out.append(f"| {what}: skipped (--budget {budget:g} s spent) |")
    print(out[-1], flush=True)
    return True

  def emit(row: str):
    out.append(row)
    print(f"{row}  [{time.perf_counter() - t_start:.0f} s]", flush=True)

  dense_done = set()
  impls = (("ours", _ours()), ("ragged_dot", _ragged), ("dense einsum (C = M/E)", _dense))
  for m, (k, n), e, skew in shapes:
    if over_budget(f"M{m} K{k} N{n} E{e} {'skewed' if skew else 'balanced'}"):
      continue
    x, w, d = _inputs(m, k, n, e)
    gs = _sizes(m, e, skew)
    for name, f in impls:
      if name.startswith("dense"):
        if (m, k, n, e) in dense_done:
          continue
        dense_done.add((m, k, n, e))
      fwd = jax.jit(f)
      both = jax.jit(_fwd_bwd(f))
      t_f = _cell(lambda: _time(fwd, x, w, gs))
      t_b = _cell(lambda: _time(both, x, w, gs, d))
      cells = [m, f"{k} -> {n}", e, "skewed" if skew else "balanced", name,
               *rate(t_f, 2 * m * k * n), *rate(t_b, 6 * m * k * n)]
      emit("| " + " | ".join(str(c) for c in cells) + " |")
  if not quick and not over_budget("block-size sweep"):
    out += sweep(on_gpu, rate)
  return "\n".join(out)


def sweep(on_gpu: bool, rate) -> list[str]:
  """Markdown rows: our forward at one large shape under each of SWEEP's block sizes."""
  m, (k, n), e = (65536, MODELS[0], 8) if on_gpu else (256, (128, 128), 4)
  out = ["", f"### Block-size sweep, our forward (M{m} K{k} N{n} E{e} balanced)", "",
         "| block_m | block_k | block_n | stages | ms | TFLOP/s | % peak |",
         "|---|---|---|---|---|---|---|"]
  x, w, _ = _inputs(m, k, n, e)
  gs = _sizes(m, e, skewed=False)
  for bs in SWEEP if on_gpu else SWEEP[:1]:
    t = _cell(lambda: _time(jax.jit(_ours(bs)), x, w, gs))
    out.append(f"| {bs.block_m} | {bs.block_k} | {bs.block_n} | {bs.num_stages} | "
               + " | ".join(rate(t, 2 * m * k * n)) + " |")
    print(out[-1], flush=True)
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--quick", action="store_true", help="4 shapes instead of 16, no sweep")
  p.add_argument("--budget", type=float, default=None,
                 help="seconds after which no further shape is started")
  args = p.parse_args()
  dev = jax.devices()[0]
  print(f"# grouped matmul on {jax.default_backend()} ({dev.device_kind}), jax {jax.__version__}",
        flush=True)
  if jax.default_backend() != "gpu":
    print("(no GPU: toy shapes, kernel interpreted, timings meaningless)", flush=True)
  t0 = time.perf_counter()
  text = run(args.quick, args.budget)
  print(f"(total {time.perf_counter() - t0:.0f} s)", flush=True)
  print("\n" + text)


if __name__ == "__main__":
  main()
