r"""Head-sparse MoH attention on a Hopper GPU: the Mosaic GPU kernels vs XLA vs flash attention.

Usage:
  python benchmarks/kernels_moh_gpu.py            # H200: ~1 minute (T = 4k and 16k)
  python benchmarks/kernels_moh_gpu.py --quick    # T = 4k only
  options: --check-only, --write (append the section to BENCHMARKS.md)

First the correctness checks: the kernels (``impl="pallas"``) against the XLA reference, values
and gradients in q, k, v and gates, at the realistic shape (bf16, batch 4, T 4096, 16 heads,
head_dim 128, half the (query block, head) pairs active) and on small awkward cases (ragged
lengths, GQA/MQA, segment ids + soft-cap, head_dim 64 and 256, block_q 64, every pair
inactive). A failure prints a banner and the script exits with status 2 after the timings.

Then the timings (bf16, 16 heads, head_dim 128, causal; batch 4 at T 4k, batch 1 at T 16k):
forward and forward+backward of the kernels at 25 / 50 / 75 / 100 % active (query block, head)
pairs, against the XLA reference (``moh_attention_reference``: dense attention for every head,
then the gates; its time does not depend on the activity, so it is measured once) and against
plain causal flash attention (``flash_attention(impl="auto")``, every head) at 100 %. The
activity map is drawn per (batch, query block): exactly the given fraction of heads, at random.
(Token-level top-k routing makes almost every 128-token block active for every head; the
savings need routing that groups a block's tokens by head.)

TFLOP/s counts useful work only: forward 2 * 2 * batch * heads * T^2 / 2 * head_dim * active
fraction (causal half), backward 2.5x that; the same count for every implementation.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

import jax  # noqa: E402
from benchmarks._timing import seconds_per_call  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from effx.pallas_kernels import moh_attention as mk  # noqa: E402
from effx.pallas_kernels.moh_attention.config import BlockSizes  # noqa: E402

HEADS, HEAD_DIM = 16, 128
FRACTIONS = (0.25, 0.5, 0.75, 1.0)


def _banner(msg: str) -> None:
  bar = "!" * 100
  print(f"\n{bar}\n{msg}\n{bar}\n", flush=True)


def _inputs(seed, b, t, h, hkv, d, block_q, fraction, dtype=jnp.bfloat16):
  """q, k, v, dy and gates with exactly ``fraction`` of the heads active per (batch, block)."""
  ks = jax.random.split(jax.random.key(seed), 6)
  q = jax.random.normal(ks[0], (b, t, h, d), jnp.float32).astype(dtype)
  k = jax.random.normal(ks[1], (b, t, hkv, d), jnp.float32).astype(dtype)
  v = jax.random.normal(ks[2], (b, t, hkv, d), jnp.float32).astype(dtype)
  dy = jax.random.normal(ks[3], (b, t, h, d), jnp.float32).astype(dtype)
  nq = -(-t // block_q)
  rank = jnp.argsort(jax.random.uniform(ks[4], (b, nq, h)), axis=-1)
  active = rank < round(fraction * h)
  tok = jnp.repeat(active, block_q, axis=1)[:, :t]
  gates = jnp.where(tok, jax.random.uniform(ks[5], (b, t, h), minval=0.2, maxval=2.0), 0.0)
  return q, k, v, gates, active, dy


def _fwd_bwd(fn):
  """jit of (q, k, v, gates, dy) -> (y, grads) for ``fn(q, k, v, gates)``."""
  def run(q, k, v, gates, dy):
    y, vjp = jax.vjp(fn, q, k, v, gates)
    return y, vjp(dy)
  return jax.jit(run)


def _max_rel_err(got, want) -> float:
  got, want = jnp.asarray(got, jnp.float32), jnp.asarray(want, jnp.float32)
  return float(jnp.abs(got - want).max()) / max(1.0, float(jnp.abs(want).max()))


def _check(name, b, t, h, hkv, d, fraction, *, block_q=128, seg=False, cap=None,
           grads=True) -> tuple[str, bool]:
  q, k, v, gates, active, dy = _inputs(1, b, t, h, hkv, d, block_q, fraction)
  segment_ids = None
  if seg:
    rng = np.random.default_rng(0)
    segment_ids = jnp.asarray(np.sort(rng.integers(0, 4, size=(b, t)), axis=1), jnp.int32)
  bs = BlockSizes.for_device(jax.devices()[0].device_kind, d)
  bs = BlockSizes(block_q, bs.block_k, bs.num_stages)
  kw = dict(active=active, segment_ids=segment_ids, logit_soft_cap=cap)
  ker = functools.partial(mk.moh_attention, block_sizes=bs, impl="pallas", **kw)
  ref = functools.partial(mk.moh_attention_reference, block_q=block_q, **kw)
  reason = mk.fallback_reason("pallas", q=q, k=k, block_sizes=bs)
  if reason is not None:
    return f"- check {name}: kernel does not apply ({reason}) FAILED", False
  try:
    if grads:
      y, g = jax.block_until_ready(_fwd_bwd(ker)(q, k, v, gates, dy))
    else:
      y, g = jax.block_until_ready(jax.jit(ker)(q, k, v, gates)), ()
  except Exception as e:  # noqa: BLE001 -- any failure must be loud
    traceback.print_exc()
    _banner(f"MOH GPU KERNEL FAILED TO COMPILE/RUN: {name}\n{type(e).__name__}: {str(e)[:2000]}")
    return f"- check {name}: FAILED to compile/run ({type(e).__name__})", False
  if grads:
    ry, rg = _fwd_bwd(ref)(q, k, v, gates, dy)
  else:
    ry, rg = jax.jit(ref)(q, k, v, gates), ()
  errs = [("y", _max_rel_err(y, ry), 2e-2)]
  errs += [(n, _max_rel_err(a, r), 6e-2) for n, a, r in zip(("dq", "dk", "dv", "dgates"), g, rg)]
  ok = all(np.isfinite(e) and e <= tol for _, e, tol in errs)
  text = ", ".join(f"{n} {e:.1e}" for n, e, _ in errs)
  return f"- check {name}: max rel err {text} {'ok' if ok else 'FAILED'}", ok


def checks() -> tuple[list[str], bool]:
  cases = [
      ("realistic b4 T4096 h16 d128 50%", dict(b=4, t=4096, h=16, hkv=16, d=128, fraction=0.5)),
      ("ragged T1000 GQA 8/2 d64 seg+cap", dict(b=2, t=1000, h=8, hkv=2, d=64, fraction=0.5,
                                                seg=True, cap=20.0)),
      ("MQA T777 block_q 64 d128 30%", dict(b=1, t=777, h=4, hkv=1, d=128, fraction=0.3,
                                            block_q=64)),
      ("all inactive T512", dict(b=1, t=512, h=4, hkv=4, d=128, fraction=0.0)),
      ("d256 T1000 forward (XLA grad)", dict(b=1, t=1000, h=4, hkv=2, d=256, fraction=0.5)),
  ]
  lines, all_ok = [], True
  for name, kw in cases:
    line, ok = _check(name, **kw)
    lines.append(line)
    print(line, flush=True)
    if not ok:
      _banner(f"MOH GPU KERNEL DISAGREES WITH THE REFERENCE: {name}")
    all_ok &= ok
  return lines, all_ok


def _time(fn, *args, rounds: int = 3) -> float:
  return seconds_per_call(fn, *args, rounds=rounds, min_time=0.05, max_calls=20)


def _time_or_none(name, fn, *args) -> float | None:
  try:
    return _time(fn, *args)
  except Exception as e:  # noqa: BLE001 -- any failure must be loud
    traceback.print_exc()
    _banner(f"MOH GPU KERNEL FAILED IN TIMING {name}: {type(e).__name__}: {str(e)[:1000]}")
    return None


def _row(cells) -> str:
  return "| " + " | ".join(str(c) for c in cells) + " |"


def _ms(sec: float | None) -> str:
  return "-" if sec is None else f"{sec * 1e3:.2f}"


def timings(lengths) -> list[str]:
  from effx.pallas_kernels.flash_attention import flash_attention
  kind = jax.devices()[0].device_kind
  bs = BlockSizes.for_device(kind, HEAD_DIM)
  lines = [f"Kernel tiles: block_q {bs.block_q} (activity granularity), block_k {bs.block_k}, "
           f"{bs.num_stages} stages. ms per call (min of 3 rounds); speed-up = XLA / kernel.",
           "",
           _row(["T", "batch", "active", "kernel fwd ms", "XLA fwd ms", "flash fwd ms",
                 "fwd speed-up", "fwd TFLOP/s", "kernel fwd+bwd ms", "XLA fwd+bwd ms",
                 "flash fwd+bwd ms", "fwd+bwd speed-up", "fwd+bwd TFLOP/s"]),
           _row(["---"] * 13)]
  for t, b in lengths:
    ker = functools.partial(mk.moh_attention, block_sizes=bs, impl="pallas")
    ker_fwd = jax.jit(lambda q, k, v, g, a: ker(q, k, v, g, active=a))
    ker_both = jax.jit(lambda q, k, v, g, a, dy: jax.vjp(
        lambda q, k, v, g: ker(q, k, v, g, active=a), q, k, v, g)[1](dy))
    ref = functools.partial(mk.moh_attention_reference, block_q=bs.block_q)
    ref_fwd = jax.jit(lambda q, k, v, g, a: ref(q, k, v, g, active=a))
    ref_both = jax.jit(lambda q, k, v, g, a, dy: jax.vjp(
        lambda q, k, v, g: ref(q, k, v, g, active=a), q, k, v, g)[1](dy))
    fa = functools.partial(flash_attention, causal=True, impl="auto")
    fa_fwd = jax.jit(fa)
    fa_both = jax.jit(lambda q, k, v, dy: jax.vjp(fa, q, k, v)[1](dy))
    xla = None
    for frac in FRACTIONS:
      q, k, v, gates, active, dy = _inputs(0, b, t, HEADS, HEADS, HEAD_DIM, bs.block_q, frac)
      flops = 2 * 2 * b * HEADS * t * t / 2 * HEAD_DIM * frac
      kf = _time_or_none(f"kernel fwd T={t}", ker_fwd, q, k, v, gates, active)
      kb = _time_or_none(f"kernel fwd+bwd T={t}", ker_both, q, k, v, gates, active, dy)
      if xla is None:   # the dense reference's time does not depend on the activity
        try:
          xla = (_time(ref_fwd, q, k, v, gates, active),
                 _time(ref_both, q, k, v, gates, active, dy))
        except Exception as e:  # noqa: BLE001 -- e.g. out of memory at long T
          print(f"XLA reference T={t}: {type(e).__name__}: {str(e)[:300]}", flush=True)
          xla = (None, None)
      ff = fb = None
      if frac == 1.0:
        ff = _time(fa_fwd, q, k, v)
        fb = _time(fa_both, q, k, v, dy)
      sp = lambda x, y: "-" if x is None or y is None else f"{x / y:.2f}x"
      tf = lambda sec, mult: "-" if sec is None else f"{flops * mult / sec / 1e12:.0f}"
      lines.append(_row([t, b, f"{frac:.0%}", _ms(kf), _ms(xla[0]), _ms(ff), sp(xla[0], kf),
                         tf(kf, 1.0), _ms(kb), _ms(xla[1]), _ms(fb), sp(xla[1], kb),
                         tf(kb, 3.5)]))
      print(lines[-1], flush=True)
  return lines


def run(quick: bool) -> str:
  """Correctness checks + timings as markdown (see the module docstring)."""
  lines, ok = checks()
  lengths = [(4096, 4)] if quick else [(4096, 4), (16384, 1)]
  body = "\n".join(lines + [""] + timings(lengths))
  if not ok:
    body = "**SOME CHECKS FAILED**\n\n" + body
  return body


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--quick", action="store_true", help="T = 4k only")
  p.add_argument("--check-only", action="store_true", help="only the correctness checks")
  p.add_argument("--write", action="store_true", help="append the section to BENCHMARKS.md")
  args = p.parse_args()
  if jax.default_backend() != "gpu":
    raise SystemExit("kernels_moh_gpu.py needs a Hopper GPU (Mosaic GPU kernels)")
  if args.check_only:
    _, ok = checks()
    sys.exit(0 if ok else 2)
  body = run(args.quick)
  print("\n" + body)
  if args.write:
    from benchmarks._report import append_section
    append_section("Head-sparse MoH attention, Mosaic GPU kernels", body)
  if body.startswith("**SOME CHECKS FAILED**"):
    sys.exit(2)


if __name__ == "__main__":
  main()
