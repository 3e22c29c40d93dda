r"""Attention-layer forward time and planned memory vs sequence length, every attention kind.

Usage: python -m benchmarks.attention_scaling [--lengths 512,1024,2048,4096,8192,16384]
           [--batch 1] [--embed 256] [--heads 4] [--head-dim 64] [--rounds 3]
           [--window 256] [--block 512] [--dense-cap-gib 2] [--budget-s 1500]
           [--kinds dense,blockwise,...] [--plot docs/img/attention_scaling.png] [--no-write]

What is measured, per (kind, length): the whole attention layer (q/k/v projections, rotary,
attention, output projection; routers for MoH) called as `attn(x, positions)` on
`x: [batch, T, embed]` float32, forward only, jitted.

* time: every (kind, length) point is compiled first; then all points are timed in
  interleaved rounds (each round runs every point once, shortest lengths first), and the
  figure kept is the minimum over rounds of wall time and, separately, of this process's CPU
  time (all threads; steadier than wall time on a loaded machine). Interleaving exposes every
  point to the same load, so t(T)/t(1k) and ratios between kinds are measured side by side.
* memory: `compiled.memory_analysis().temp_size_in_bytes`, XLA's buffer-assignment peak of
  the scratch memory of the compiled forward (excludes the parameters, the input and the
  output). It is what the compiler plans, not a measured RSS; it is computed for skipped
  points too (compile only).
* dense softmax (impl "xla") builds `[batch, heads, T, T]` float32 scores; lengths whose
  scores exceed `--dense-cap-gib` are compiled (for the memory plan) but not run:
  "OOM-skipped".

Kinds: dense (MultiHeadAttention impl="xla"), blockwise (impl="blockwise", block `--block`),
sliding window (blockwise with CausalMask() & SlidingWindowMask(window)), linear
(LinearAttention elu, chunked, chunk 64), Based (BasedAttention defaults: Taylor feature dim
16 + window-64 softmax), MoH 50/75/100% (MixtureOfHeadsAttention impl="head_sparse", 1 shared
head + top-1/2/3 of the 3 routed heads; 100% keeps the router so only the sparsity differs).
Appends "## Attention scaling vs sequence length" to BENCHMARKS.md and writes the plot.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp

from benchmarks._report import ROOT, append_section
from effx.attention.linear import BasedAttention, LinearAttention
from effx.attention.masks import CausalMask, SlidingWindowMask
from effx.attention.mha import MultiHeadAttention
from effx.attention.moh import MixtureOfHeadsAttention

KINDS = ("dense", "blockwise", "sliding_window", "linear", "based", "moh50", "moh75", "moh100")
GIB = 1024 ** 3


def _modules(args) -> dict[str, tuple[str, Any]]:
  """kind -> (label, module)."""
  h, d = args.heads, args.head_dim
  routed = h - 1
  moh = lambda k: MixtureOfHeadsAttention(num_heads=h, head_dim=d, num_shared_heads=1, top_k=k,
                                          impl="head_sparse")
  top = lambda f: min(routed, max(1, round(f / 100 * h) - 1))  # active = 1 shared + top-k
  return {
      "dense": ("dense softmax (xla)", MultiHeadAttention(num_heads=h, head_dim=d, impl="xla")),
      "blockwise": (f"blockwise softmax (block {args.block})",
                    MultiHeadAttention(num_heads=h, head_dim=d, impl="blockwise",
                                       block_size=args.block)),
      "sliding_window": (f"sliding window {args.window} (blockwise, block {args.block})",
                         MultiHeadAttention(num_heads=h, head_dim=d, impl="blockwise",
                                            block_size=args.block,
                                            mask=CausalMask() & SlidingWindowMask(args.window))),
      "linear": ("linear elu (chunked 64)",
                 LinearAttention(num_heads=h, head_dim=d, feature_map="elu", form="chunked",
                                 chunk_size=64)),
      "based": ("Based (taylor f=16 + window 64)", BasedAttention(num_heads=h, head_dim=d)),
      **{f"moh{f}": (f"MoH {100 * (1 + top(f)) / h:.0f}% heads (1 shared + top-{top(f)} of "
                     f"{routed} routed)", moh(top(f))) for f in (50, 75, 100)},
  }


def _inputs(batch: int, t: int, embed: int) -> tuple[jax.Array, jax.Array]:
  x = jax.random.normal(jax.random.key(1), (batch, t, embed), jnp.float32)
  pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (batch, t))
  return x, pos


def _forward(module) -> Callable:
  def fwd(params, x, pos):
    (y, _), sown = module.apply({"params": params}, x, pos, mutable=["aux_loss", "metrics"])
    return y, sown  # keep the routers' sown losses/metrics alive (as in training)
  return jax.jit(fwd)


def _timed(fn, *args) -> tuple[float, float]:
  """(wall seconds, process CPU seconds) of one call."""
  t0, c0 = time.perf_counter(), time.process_time()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - t0, time.process_time() - c0


def _log(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


def _fmt_ms(s: float | None) -> str:
  if s is None:
    return "—"
  return f"{s * 1e3:,.0f}" if s >= 0.1 else f"{s * 1e3:.1f}"


def _fmt_mib(b: float | None) -> str:
  return "—" if b is None else f"{b / 2 ** 20:,.1f}"


def _plot(path: str, lengths, kinds, labels, best, temp, skipped) -> str | None:
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return None
  fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 5))
  for i, k in enumerate(kinds):
    style = dict(marker="osv^D<>px"[i % 9], linestyle=("-", "--", ":")[i % 3], label=labels[k])
    xs = [t for t in lengths if (k, t) in best]
    a1.plot(xs, [best[(k, t)][0] * 1e3 for t in xs], **style)
    xm = [t for t in lengths if temp.get((k, t)) is not None]
    a2.plot(xm, [max(temp[(k, t)], 1) / 2 ** 20 for t in xm], **style)
    for t in lengths:
      if (k, t) in skipped and temp.get((k, t)) is not None:
        a2.annotate("OOM-skipped (plan only)", (t, temp[(k, t)] / 2 ** 20), fontsize=7)
  for a, title, ylabel in ((a1, "forward wall time (min over rounds)", "ms"),
                           (a2, "XLA planned temp memory (memory_analysis)", "MiB")):
    a.set_xscale("log", base=2)
    a.set_yscale("log")
    a.set_xlabel("sequence length T")
    a.set_ylabel(ylabel)
    a.set_title(title)
    a.grid(True, which="both", alpha=0.3)
  a1.legend(fontsize=7)
  fig.suptitle("effx attention kinds on CPU (batch 1, float32)")
  fig.tight_layout()
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fig.savefig(path, dpi=110)
  return path


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--lengths", default="512,1024,2048,4096,8192,16384")
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--embed", type=int, default=256)
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--head-dim", type=int, default=64)
  parser.add_argument("--window", type=int, default=256)
  parser.add_argument("--block", type=int, default=512, help="blockwise tile size")
  parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
  parser.add_argument("--calls", type=int, default=2,
                      help="calls per point per round (every point gets the same sample count)")
  parser.add_argument("--budget-s", type=float, default=1500.0,
                      help="start no new round after this many seconds of timing (>= 1 round)")
  parser.add_argument("--dense-cap-gib", type=float, default=2.0,
                      help="dense softmax is not run where [batch,heads,T,T] f32 scores exceed it")
  parser.add_argument("--kinds", default=",".join(KINDS), help=f"subset of {','.join(KINDS)}")
  parser.add_argument("--ref-length", type=int, default=1024, help="t(T)/t(ref) ratios")
  parser.add_argument("--plot", default=os.path.join(ROOT, "docs", "img", "attention_scaling.png"))
  parser.add_argument("--single-thread", action="store_true",
                      help="XLA CPU single-threaded (no intra-op threads): wall ~ CPU ~ work")
  parser.add_argument("--no-write", action="store_true", help="print only (no section, no plot)")
  args = parser.parse_args()
  if args.single_thread:  # read when the CPU backend starts, i.e. before the first computation
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_cpu_multi_thread_eigen=false"
                               " intra_op_parallelism_threads=1").strip()

  lengths = sorted(int(v) for v in args.lengths.split(","))
  kinds = [k for k in args.kinds.split(",") if k]
  unknown = set(kinds) - set(KINDS)
  if unknown:
    raise SystemExit(f"--kinds: unknown {sorted(unknown)}; allowed: {list(KINDS)}")
  mods = _modules(args)
  labels = {k: mods[k][0] for k in kinds}
  load_start = os.getloadavg()
  started = time.perf_counter()

  # ---- compile every point (memory plan for all, executables for the runnable ones) --------
  compiled, temp, skipped, compile_s = {}, {}, set(), {}
  x0, p0 = _inputs(args.batch, min(128, lengths[0]), args.embed)
  for k in kinds:
    module = mods[k][1]
    params = jax.jit(module.init)(jax.random.key(0), x0, p0)["params"]
    fwd = _forward(module)
    for t in lengths:
      x, pos = _inputs(args.batch, t, args.embed)
      t0 = time.perf_counter()
      exe = fwd.lower(params, x, pos).compile()
      compile_s[(k, t)] = time.perf_counter() - t0
      mem = exe.memory_analysis()
      temp[(k, t)] = None if mem is None else mem.temp_size_in_bytes
      scores = args.batch * args.heads * t * t * 4
      if k == "dense" and scores > args.dense_cap_gib * GIB:
        skipped.add((k, t))
        _log(f"{k} T={t}: OOM-skipped (scores {scores / GIB:.1f} GiB > cap "
             f"{args.dense_cap_gib} GiB); planned temp {_fmt_mib(temp[(k, t)])} MiB")
        continue
      jax.block_until_ready(exe(params, x, pos))  # warm-up run
      compiled[(k, t)] = (exe, params, x, pos)
      _log(f"{k} T={t}: compiled in {compile_s[(k, t)]:.1f}s, temp {_fmt_mib(temp[(k, t)])} MiB")

  # ---- interleaved timing rounds --------------------------------------------------------------
  best: dict[tuple[str, int], list[float]] = {p: [float("inf")] * 2 for p in compiled}
  rounds_done = 0
  timing_started = time.perf_counter()
  for r in range(args.rounds):
    if r and time.perf_counter() - timing_started > args.budget_s:
      _log(f"--budget-s {args.budget_s} reached after {r} rounds")
      break
    for t in lengths:
      for k in kinds:
        if (k, t) not in compiled:
          continue
        exe, params, x, pos = compiled[(k, t)]
        for _ in range(args.calls):
          wall, cpu = _timed(exe, params, x, pos)
          best[(k, t)] = [min(best[(k, t)][0], wall), min(best[(k, t)][1], cpu)]
    rounds_done += 1
    _log(f"round {r + 1}: " + ", ".join(f"{k}@{lengths[-1]}={_fmt_ms(best[(k, lengths[-1])][0])}ms"
                                        for k in kinds if (k, lengths[-1]) in best))
  load_end = os.getloadavg()
  total_s = time.perf_counter() - started

  # ---- report ----------------------------------------------------------------------------------
  ref = args.ref_length if args.ref_length in lengths else lengths[0]
  name = lambda t: f"{t // 1024}k" if t % 1024 == 0 else str(t)
  hdr_t = " | ".join(name(t) for t in lengths)
  lines = [
      f"Whole attention layer (projections + attention + output projection), forward only, "
      f"jitted, float32, batch {args.batch}, embed {args.embed}, {args.heads} heads x head_dim "
      f"{args.head_dim}, causal"
      f"{'; XLA CPU single-threaded (XLA_FLAGS: ' + os.environ['XLA_FLAGS'] + ')' if args.single_thread else ''}"
      f". Time = minimum of wall time over {rounds_done} interleaved "
      f"rounds x {args.calls} calls (after compile + one warm-up call; each round visits every "
      f"(kind, length) point; every point gets the same number of samples, since a minimum "
      f"over more samples would favour the cheap short points under load); "
      f"\"CPU\" columns use this process's CPU time (all threads) instead, which is steadier "
      f"under load. Memory = `compiled.memory_analysis().temp_size_in_bytes`, XLA's planned "
      f"peak scratch of the compiled forward (excludes parameters, input and output; a plan, "
      f"not a measured RSS). Dense softmax is not run where its [batch, heads, T, T] float32 "
      f"scores exceed {args.dense_cap_gib:g} GiB (\"OOM-skipped\"; its memory plan is still "
      f"shown). Load average (1/5/15 min) at start: "
      f"{', '.join(f'{v:.1f}' for v in load_start)}; at end: "
      f"{', '.join(f'{v:.1f}' for v in load_end)} on {os.cpu_count()} cores — absolute times "
      f"are inflated and noisy, ratios measured side by side are the meaningful part. "
      f"Total run {total_s / 60:.1f} min.",
      "",
      f"![attention scaling](docs/img/{os.path.basename(args.plot)})",
      "",
      "Forward wall time, ms:",
      "",
      f"| kind | {hdr_t} | t({name(lengths[-1])})/t({name(ref)}) wall | CPU |",
      "|---|" + "---:|" * (len(lengths) + 2),
  ]

  def ratio(k: str, i: int) -> str:
    a, b = best.get((k, lengths[-1])), best.get((k, ref))
    return "—" if a is None or b is None else f"{a[i] / b[i]:.1f}"

  for k in kinds:
    cells = ["OOM-skipped" if (k, t) in skipped else _fmt_ms(best.get((k, t), [None])[0])
             for t in lengths]
    lines.append(f"| {labels[k]} | {' | '.join(cells)} | {ratio(k, 0)} | {ratio(k, 1)} |")
  lines += ["", "Forward CPU time (this process, all threads), ms:", "",
            f"| kind | {hdr_t} |", "|---|" + "---:|" * len(lengths)]
  for k in kinds:
    cells = ["OOM-skipped" if (k, t) in skipped else _fmt_ms(best.get((k, t), [None, None])[1])
             for t in lengths]
    lines.append(f"| {labels[k]} | {' | '.join(cells)} |")
  lines += ["", "Planned temp memory (XLA memory_analysis), MiB:", "",
            f"| kind | {hdr_t} |", "|---|" + "---:|" * len(lengths)]
  for k in kinds:
    cells = [_fmt_mib(temp.get((k, t))) + (" (not run)" if (k, t) in skipped else "")
             for t in lengths]
    lines.append(f"| {labels[k]} | {' | '.join(cells)} |")

  # ---- issue targets ---------------------------------------------------------------------------
  checks = []
  if "linear" in kinds and ("linear", lengths[-1]) in best and ("linear", ref) in best:
    w, c = (best[("linear", lengths[-1])][i] / best[("linear", ref)][i] for i in (0, 1))
    verdict = ("met (wall and CPU)" if max(w, c) <= 20 else "met on CPU time only" if c <= 20
               else "met on wall time only" if w <= 20 else "NOT met")
    checks.append(f"- linear attention t({lengths[-1]})/t({ref}) <= 20: wall {w:.1f}, CPU "
                  f"{c:.1f} (ideal linear scaling: {lengths[-1] / ref:.0f}) -> {verdict}")
  if "blockwise" in kinds:
    ok = ("blockwise", lengths[-1]) in best
    checks.append(f"- blockwise softmax runs T={lengths[-1]} without running out of memory: "
                  f"{'met' if ok else 'NOT met'} (planned temp "
                  f"{_fmt_mib(temp.get(('blockwise', lengths[-1])))} MiB vs dense "
                  f"{_fmt_mib(temp.get(('dense', lengths[-1])))} MiB)")
  moh50 = "moh50" if "moh50" in kinds else None
  if moh50:
    for base in ("dense", "blockwise", "moh100"):
      if base not in kinds:
        continue
      common = [t for t in lengths if (moh50, t) in best and (base, t) in best]
      if not common:
        continue
      rw = [best[(moh50, t)][0] / best[(base, t)][0] for t in common]
      rc = [best[(moh50, t)][1] / best[(base, t)][1] for t in common]
      cells = ", ".join(f"{t}: {a:.2f} (CPU {b:.2f})" for t, a, b in zip(common, rw, rc))
      faster = [a < 0.9 and b < 0.9 for a, b in zip(rw, rc)]
      verdict = ("faster at every length" if all(faster) else
                 f"faster at {', '.join(str(t) for t, f in zip(common, faster) if f)}"
                 if any(faster) else "not measurably faster")
      checks.append(f"- {labels[moh50]} time / {labels[base]} time by length: {cells} -> "
                    f"{verdict} (\"measurably\" = wall and CPU ratios both < 0.9)")
  if checks:
    lines += ["", "Issue targets:", ""] + checks
  body = "\n".join(lines)
  if not args.no_write:
    written = _plot(args.plot, lengths, kinds, labels, best, temp, skipped) if args.plot else None
    if written is None:
      body = body.replace(f"\n\n![attention scaling](docs/img/{os.path.basename(args.plot)})",
                          "\n\n(no plot: matplotlib is not installed)" if args.plot else "")
  print(body)
  if not args.no_write:
    title = "Attention scaling vs sequence length (CPU"
    append_section(title + (", single-threaded XLA)" if args.single_thread else ")"), body)


if __name__ == "__main__":
  main()
