r"""Flash-attention backward on GPU: the Mosaic GPU kernels vs XLA vs cuDNN (check + timing).

Usage (GPU; about 60-90 s on an H200 with ``--quick``):
  PYTHONPATH=. python3 benchmarks/kernels_flash_backward.py --quick
  PYTHONPATH=. python3 benchmarks/kernels_flash_backward.py --check-only   # exit 2 on failure

``run(quick)`` returns a markdown section (the caller decides where it goes):

1. Correctness on the device: dq, dk, dv of ``flash_attention_gpu`` (forward kernel + the
   ``gpu_backward`` dQ and dK/dV kernels) against ``jax.vjp`` of ``attention_reference``,
   bf16, head_dim 128: causal GQA at L=1000, sliding window + segment ids + soft-cap (MQA)
   at L=1000, and a per-head 50 % block-sparse layout at L=1024. A line per check with the
   max |err| relative to max |reference|; FAILED when above 2e-2. Each check first asserts
   that the gradient really runs the kernels (``gpu.backward_reason`` is None).
2. Timing of forward + backward: ``jax.grad`` of ``sum(o * do)`` w.r.t. q, k, v for ours,
   the XLA reference (materialises the scores) and ``jax.nn.dot_product_attention``
   (implementation "cudnn"), bf16, 16 heads, head_dim 128, batch x seq = 16k tokens, at seq
   4k and 16k (causal only with ``quick``; causal and full otherwise), ours also with other
   backward tiles ("bwd tiles 128/64": 128 query rows per dQ CTA, 64 keys per dK/dV CTA, i.e.
   one compute warpgroup with more registers). Our forward alone is timed too, so that
   backward ~ total - forward.
   TFLOP/s counts useful FLOPs: forward 4 * b * h * L^2 * d (halved for causal), backward
   2.5x that, i.e. fwd + bwd = 3.5x forward; % of the 989 TFLOP/s dense bf16 peak of
   H100/H200 SXM.
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
from benchmarks._timing import seconds_per_call, table_row  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from effx.pallas_kernels.flash_attention import gpu as fa_gpu  # noqa: E402
from effx.pallas_kernels.flash_attention.config import BlockSizes  # noqa: E402
from effx.pallas_kernels.flash_attention.reference import attention_reference  # noqa: E402

PEAK_TFLOPS = 989.0   # dense bf16, H100/H200 SXM
TOL = 2e-2


def _inputs(b, lq, lk, h, hkv, d, seed=0):
  ks = jax.random.split(jax.random.key(seed), 4)
  mk = lambda key, shape: jax.random.normal(key, shape, jnp.float32).astype(jnp.bfloat16)
  return (mk(ks[0], (b, lq, h, d)), mk(ks[1], (b, lk, hkv, d)), mk(ks[2], (b, lk, hkv, d)),
          mk(ks[3], (b, lq, h, d)))


def _blocks(d: int) -> BlockSizes:
  return BlockSizes.for_device(jax.devices()[0].device_kind, d)


def _ours(bs: BlockSizes | None = None):
  def f(q, k, v, **kw):
    return fa_gpu.flash_attention_gpu(q, k, v, block_sizes=bs or _blocks(q.shape[-1]), **kw)
  return f


def _grad_fn(attn, do):
  """jit of (q, k, v) -> grads of sum(attn(q, k, v) * do)."""
  def loss(q, k, v):
    return jnp.sum(attn(q, k, v).astype(jnp.float32) * do.astype(jnp.float32))
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


# ------------------------------------------------------------------------------------------------
# Correctness
# ------------------------------------------------------------------------------------------------


def _segments(b, n, parts):
  return jnp.asarray(np.minimum(np.arange(n) * parts // n + 1, parts)[None].repeat(b, 0),
                     jnp.int32)


def _block_sparse(heads, n, block, density, seed):
  rng = np.random.default_rng(seed)
  nb = -(-n // block)
  tiles = rng.random((heads, nb, nb)) < density
  tiles[:, np.arange(nb), np.arange(nb)] = True
  return np.ascontiguousarray(np.repeat(np.repeat(tiles, block, 1), block, 2)[:, :n, :n])


def check(quick: bool) -> tuple[list[str], bool]:
  """Kernel gradients vs the reference's; returns (markdown lines, all ok)."""
  cases = [
      ("causal, GQA 8/2, L=1000, d=128", dict(b=2, l=1000, h=8, hkv=2, d=128),
       dict(causal=True)),
      ("window 300 + segments (3 docs) + soft-cap 30, MQA 4/1, L=1000, d=128",
       dict(b=1, l=1000, h=4, hkv=1, d=128),
       dict(causal=True, window=300, logit_soft_cap=30.0, segment_ids=_segments(1, 1000, 3))),
      ("per-head block-sparse 50%, non-causal, L=1024, d=128",
       dict(b=1, l=1024, h=4, hkv=4, d=128),
       dict(causal=False, dense_mask=_block_sparse(4, 1024, 128, 0.5, seed=3))),
  ]
  if not quick:
    cases.append(("causal, GQA 4/2, L=777, d=64", dict(b=2, l=777, h=4, hkv=2, d=64),
                  dict(causal=True)))
  lines, all_ok = [], True
  for name, s, kw in cases:
    q, k, v, do = _inputs(s["b"], s["l"], s["l"], s["h"], s["hkv"], s["d"], seed=1)
    bs = _blocks(s["d"])
    reason = fa_gpu.backward_reason(q, k, block_sizes=bs, causal=kw["causal"],
                                    window=kw.get("window"), dense_mask=kw.get("dense_mask"))
    try:
      if reason is not None:
        raise RuntimeError(f"gradient would not use the kernels: {reason}")
      got = _grad_fn(lambda q, k, v: _ours(bs)(q, k, v, **kw), do)(q, k, v)
      want = _grad_fn(lambda q, k, v: attention_reference(q, k, v, **kw), do)(q, k, v)
      errs = []
      for g, r in zip(got, want):
        g, r = np.asarray(g, np.float32), np.asarray(r, np.float32)
        errs.append(float(np.abs(g - r).max()) / max(1.0, float(np.abs(r).max()))
                    if np.isfinite(g).all() else float("inf"))
      ok = max(errs) <= TOL
      msg = ", ".join(f"{n} {e:.2e}" for n, e in zip(("dq", "dk", "dv"), errs))
      lines.append(f"- check {name}: rel max |err| {msg} {'ok' if ok else 'FAILED'}")
    except Exception as e:  # noqa: BLE001 -- any failure must be loud
      traceback.print_exc()
      ok = False
      lines.append(f"- check {name}: FAILED ({type(e).__name__}: {str(e)[:300]})")
    all_ok &= ok
    print(lines[-1], flush=True)
  return lines, all_ok


# ------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------


def _time(fn, *args, rounds: int = 3) -> float:
  return seconds_per_call(fn, *args, rounds=rounds, min_time=0.05, max_calls=50)


def bench(quick: bool) -> list[str]:
  h, d, tokens = 16, 128, 16384
  header = ["seq", "batch", "causal", "impl", "pass", "ms", "TFLOP/s", "% peak"]
  rows = [table_row(header), table_row(["---"] * len(header))]

  def record(seq, b, causal, impl, what, fn, args, flops):
    try:
      t = _time(fn, *args)
      tf = flops / t / 1e12
      cells = [seq, b, causal, impl, what, f"{t * 1e3:.3f}", f"{tf:.3g}",
               f"{100 * tf / PEAK_TFLOPS:.1f}"]
    except Exception as e:  # noqa: BLE001 -- a baseline may not exist (cuDNN, OOM)
      msg = f"{type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"
      cells = [seq, b, causal, impl, what, "n/a", "n/a", msg]
    rows.append(table_row(cells))
    print(rows[-1], flush=True)

  tiles = ((128, 64),) if quick else ((128, 64), (64, 64))
  variants = [("ours (Pallas)", None)] + [
      (f"ours, bwd tiles {bq}/{bk}", BlockSizes(128, 128, block_q_bwd=bq, block_k_bwd=bk))
      for bq, bk in tiles]
  for seq in (4096, 16384):
    b = tokens // seq
    q, k, v, do = _inputs(b, seq, seq, h, h, d)
    for causal in ((True,) if quick else (False, True)):
      fwd_flops = 4.0 * b * h * seq * seq * d * (0.5 if causal else 1.0)
      for name, bs in variants:
        fn = _ours(bs)
        reason = fa_gpu.backward_reason(q, k, block_sizes=bs or _blocks(d), causal=causal,
                                        window=None)
        if reason is not None:
          print(f"{name}: gradient is XLA's ({reason})", flush=True)
        if bs is None:
          record(seq, b, causal, name, "fwd", jax.jit(
              lambda q, k, v, c=causal: fn(q, k, v, causal=c)), (q, k, v), fwd_flops)
        record(seq, b, causal, name, "fwd+bwd",
               _grad_fn(lambda q, k, v, c=causal, fn=fn: fn(q, k, v, causal=c), do),
               (q, k, v), 3.5 * fwd_flops)
      record(seq, b, causal, "XLA reference", "fwd+bwd",
             _grad_fn(lambda q, k, v, c=causal: attention_reference(q, k, v, causal=c), do),
             (q, k, v), 3.5 * fwd_flops)
      record(seq, b, causal, "jax.nn.dot_product_attention (cudnn)", "fwd+bwd",
             _grad_fn(lambda q, k, v, c=causal: jax.nn.dot_product_attention(
                 q, k, v, is_causal=c, implementation="cudnn"), do), (q, k, v), 3.5 * fwd_flops)
  return rows


def run(quick: bool) -> str:
  """Checks and timings as a markdown section (no title; see the module docstring)."""
  kind = jax.devices()[0].device_kind
  if jax.default_backend() != "gpu":
    return f"Skipped: needs a Hopper GPU (backend {jax.default_backend()}, {kind})."
  t0 = time.perf_counter()
  lines, ok = check(quick)
  rows = bench(quick)
  notes = [
      f"Device: {kind}; jax {jax.__version__}. Gradient of sum(o * do) w.r.t. q, k, v "
      "(jax.grad, jit), bf16, heads 16, head_dim 128, batch x seq = 16384 tokens; time = min "
      "over 3 rounds of back-to-back calls. TFLOP/s counts useful FLOPs: forward "
      "4 b h L^2 d (halved for causal), fwd+bwd = 3.5x forward; % of 989 TFLOP/s (dense "
      "bf16). Ours: forward kernel + Mosaic GPU dQ and dK/dV kernels (block sizes "
      f"{_blocks(128)}).",
      f"Correctness (max |err| / max(1, max |reference|), tolerance {TOL}): "
      f"{'all ok' if ok else 'SOME CHECK FAILED'}.",
  ]
  body = "\n".join(notes[:1]) + "\n\n" + "\n".join(rows) + "\n\n" + notes[1] + "\n\n"
  body += "\n".join(lines) + f"\n\n_(run took {time.perf_counter() - t0:.0f} s)_\n"
  return body


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="causal only, one tile variant")
  parser.add_argument("--check-only", action="store_true", help="only the correctness checks")
  cli = parser.parse_args()
  if cli.check_only:
    sys.exit(0 if check(cli.quick)[1] else 2)
  print(run(cli.quick))
