r"""Flash-attention forward: our Pallas kernel vs the XLA reference vs jax.nn.dot_product_attention.

Usage:
  python benchmarks/kernels.py --platform gpu --quick     # H200: ~2.5 minutes
  python benchmarks/kernels.py --platform gpu             # all lengths 1k..16k, extra variants
  python benchmarks/kernels.py --platform cpu             # XLA paths only (see below)
  options: --no-write (do not append to BENCHMARKS.md), --check-only
  python benchmarks/kernels.py --decode-gmm               # decode attention + grouped matmul
  python benchmarks/kernels.py --op flash_bwd|linear|moh|gmm [--quick]   # GPU kernel sections

``--op`` runs one of the Mosaic GPU kernel benchmarks (each module's docstring says what it
measures): ``flash_bwd`` (benchmarks/kernels_flash_backward.py, flash attention forward +
backward), ``linear`` (kernels_linear_gpu.py, chunked linear attention), ``moh``
(kernels_moh_gpu.py, head-sparse mixture-of-heads attention), ``gmm`` (kernels_gmm_gpu.py,
grouped matmul vs ragged_dot). Each prints correctness checks first, then timings, and its
section is appended to BENCHMARKS.md.

On a GPU/TPU the script first checks the kernel against the reference on a few awkward
configurations (lengths that are not tile multiples, GQA, window + soft-cap + segment ids, a
per-head block-sparse layout) and exits with status 2 and a banner if the kernel fails to
compile or disagrees. Then, per shape (bf16, 16 heads, head_dim 128, batch x seq = 16k
tokens), it times the forward of: our kernel, the XLA reference (``attention_reference``,
which materialises the scores) and ``jax.nn.dot_product_attention`` (implementation "cudnn" on
GPU, XLA elsewhere), causal and not, and our kernel on random block-sparse layouts of 100 / 50
/ 25 % tile density (the XLA reference applies the same mask densely; cuDNN has no such mode).

TFLOP/s counts useful work only: 4 * batch * heads * q_len * kv_len * head_dim * (fraction of
visible (query, key) tiles), i.e. halved for causal, scaled by density for block-sparse, the
same count for every implementation. % of peak uses the dense bf16 tensor-core peak of the
device kind (H100/H200 SXM 989 TFLOP/s; table below); CPU: n/a.

On CPU the Pallas kernels only run in interpret mode, whose timing is not meaningful, so only
the XLA paths are timed (small shapes, float32).
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

PEAK_BF16 = {  # dense bf16 TFLOP/s by device-kind substring (vendor datasheets)
    "h100": 989.0, "h200": 989.0, "h800": 989.0, "gh200": 989.0, "a100": 312.0,
    "tpu v6": 918.0, "tpu v5p": 459.0, "tpu v5 lite": 197.0, "tpu v5e": 197.0, "tpu v4": 275.0,
}


GPU_OPS = {  # --op -> (benchmark module, BENCHMARKS.md section title)
    "flash_bwd": ("benchmarks.kernels_flash_backward", "Flash attention forward + backward"),
    "linear": ("benchmarks.kernels_linear_gpu", "Chunked linear attention kernels"),
    "moh": ("benchmarks.kernels_moh_gpu", "Head-sparse MoH attention kernels"),
    "gmm": ("benchmarks.kernels_gmm_gpu", "Grouped matmul kernels"),
}


def _parse():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--platform", choices=["cpu", "gpu", "tpu"], default=None,
                 help="JAX platform to run on (default: JAX's default)")
  p.add_argument("--quick", action="store_true", help="fewer shapes (< 3 min on an H200)")
  p.add_argument("--no-write", action="store_true", help="do not append to BENCHMARKS.md")
  p.add_argument("--check-only", action="store_true", help="only the correctness checks")
  p.add_argument("--decode-gmm", action="store_true",
                 help="only the decode-attention and grouped-matmul section (see its docstring)")
  p.add_argument("--op", choices=sorted(GPU_OPS), default=None,
                 help="one Mosaic GPU kernel benchmark instead of the flash forward")
  p.add_argument("--budget", type=float, default=None,
                 help="with --op gmm/linear: no new timing row starts after this many seconds")
  return p.parse_args()


ARGS = _parse()
if ARGS.platform is not None:
  os.environ["JAX_PLATFORMS"] = {"gpu": "cuda", "cpu": "cpu", "tpu": "tpu"}[ARGS.platform]

import jax  # noqa: E402
from benchmarks._timing import seconds_per_call, table_row  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks._report import append_section  # noqa: E402
from effx.pallas_kernels.flash_attention import gpu as fa_gpu  # noqa: E402
from effx.pallas_kernels.flash_attention import layout as fa_layout  # noqa: E402
from effx.pallas_kernels.flash_attention import tpu as fa_tpu  # noqa: E402
from effx.pallas_kernels.flash_attention.config import BlockSizes  # noqa: E402
from effx.pallas_kernels.flash_attention.reference import attention_reference  # noqa: E402


def _peak(kind: str) -> float | None:
  kind = kind.lower()
  for key, val in PEAK_BF16.items():
    if key in kind:
      return val
  return None


def _kernel(platform: str, block_sizes: BlockSizes | None = None, **extra):
  """Our kernel for the platform, called directly (no silent XLA fallback)."""
  def run(q, k, v, **kw):
    bs = block_sizes or BlockSizes.for_device(jax.devices()[0].device_kind, q.shape[-1])
    if platform == "gpu":
      return fa_gpu.flash_attention_gpu(q, k, v, block_sizes=bs, **extra, **kw)
    return fa_tpu.flash_attention_tpu(q, k, v, block_sizes=bs, **kw)
  return run


def _inputs(b, lq, lk, h, hkv, d, dtype, seed=0):
  ks = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(ks[0], (b, lq, h, d), jnp.float32).astype(dtype),
          jax.random.normal(ks[1], (b, lk, hkv, d), jnp.float32).astype(dtype),
          jax.random.normal(ks[2], (b, lk, hkv, d), jnp.float32).astype(dtype))


def _block_sparse(heads, lq, lk, bq, bk, density, seed=0, aligned=True):
  """Random tile layout with the given density (diagonal tiles kept), as a dense mask."""
  rng = np.random.default_rng(seed)
  nq, nk = -(-lq // bq), -(-lk // bk)
  tiles = rng.random((heads, nq, nk)) < density
  tiles[:, np.arange(min(nq, nk)), np.arange(min(nq, nk))] = True
  dense = np.repeat(np.repeat(tiles, bq, 1), bk, 2)[:, :lq, :lk]
  return np.ascontiguousarray(dense)


def _banner(msg: str) -> None:
  line = "=" * 78
  print(f"\n{line}\n{msg}\n{line}\n", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------
# Correctness on the accelerator
# ------------------------------------------------------------------------------------------------


def check(platform: str, quick: bool) -> list[str]:
  """Kernel vs reference on awkward configs; exits with status 2 on any failure."""
  lines = []
  seg = lambda b, n, parts: jnp.asarray(
      np.minimum(np.arange(n) * parts // n + 1, parts)[None].repeat(b, 0), jnp.int32)
  cases = [
      ("causal, GQA 4/2, L=1000, d=128", dict(b=2, lq=1000, lk=1000, h=4, hkv=2, d=128),
       dict(causal=True), {}),
      ("window 300 + cap 30 + segments, Lq=777 Lk=1300, MQA, d=64",
       dict(b=1, lq=777, lk=1300, h=2, hkv=1, d=64),
       dict(causal=False, window=300, logit_soft_cap=30.0), {"seg": 3}),
      ("per-head block-sparse 50%, L=1024, d=128", dict(b=1, lq=1024, lk=1024, h=4, hkv=4, d=128),
       dict(causal=False), {"sparse": 0.5}),
      ("causal, d=256, L=640", dict(b=1, lq=640, lk=640, h=2, hkv=2, d=256), dict(causal=True),
       {}),
  ]
  variants = [("", {})]
  if platform == "gpu" and not quick:
    variants.append((" [P via smem, block_q=64]",
                     dict(extra=dict(p_via_smem=True), bs=BlockSizes(64, 128))))
  for name, shape, kw, opts in cases:
    q, k, v = _inputs(shape["b"], shape["lq"], shape["lk"], shape["h"], shape["hkv"],
                      shape["d"], jnp.bfloat16, seed=1)
    kw = dict(kw)
    if "seg" in opts:
      kw["segment_ids"] = (seg(shape["b"], shape["lq"], opts["seg"]),
                           seg(shape["b"], shape["lk"], opts["seg"]))
    if "sparse" in opts:
      kw["dense_mask"] = _block_sparse(shape["h"], shape["lq"], shape["lk"], 128, 128,
                                       opts["sparse"], seed=3)
    want = attention_reference(q, k, v, **kw).astype(jnp.float32)
    for vname, vopt in variants:
      bs = vopt.get("bs")
      if shape["d"] == 256 and bs is None and platform == "gpu":
        bs = BlockSizes(128, 64)
      if shape["d"] == 256 and bs is not None and platform == "gpu":
        bs = BlockSizes(bs.block_q, 64)
      try:
        got = jax.block_until_ready(
            jax.jit(lambda q, k, v: _kernel(platform, bs, **vopt.get("extra", {}))(
                q, k, v, **kw))(q, k, v))
      except Exception as e:  # noqa: BLE001 -- any failure must be loud
        traceback.print_exc()
        _banner(f"FLASH ATTENTION {platform.upper()} KERNEL FAILED TO COMPILE/RUN: {name}{vname}\n"
                f"{type(e).__name__}: {str(e)[:2000]}")
        sys.exit(2)
      err = float(jnp.abs(got.astype(jnp.float32) - want).max())
      ok = np.isfinite(err) and err <= 2e-2 * max(1.0, float(jnp.abs(want).max()))
      lines.append(f"- check {name}{vname}: max |err| = {err:.2e} {'ok' if ok else 'FAILED'}")
      print(lines[-1], flush=True)
      if not ok:
        _banner(f"FLASH ATTENTION {platform.upper()} KERNEL DISAGREES WITH THE REFERENCE: "
                f"{name}{vname}: max |err| {err}")
        sys.exit(2)
  return lines


# ------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------


def _time(fn, *args, rounds: int = 3) -> float:
  return seconds_per_call(fn, *args, rounds=rounds, min_time=0.05, max_calls=50)


def bench(platform: str, quick: bool) -> tuple[str, list[str]]:
  kind = jax.devices()[0].device_kind
  peak = _peak(kind) if platform != "cpu" else None
  notes = []
  if platform == "cpu":
    dtype, h, d, tokens = jnp.float32, 4, 64, 2048
    seqs = (256, 512, 1024) if not quick else (256, 1024)
    notes.append("CPU: the Pallas kernels run only in interpret mode here, whose timing is not "
                 "meaningful; only the XLA paths are timed (float32, 4 heads, head_dim 64).")
  else:
    dtype, h, d, tokens = jnp.bfloat16, 16, 128, 16384
    seqs = (1024, 4096, 16384) if quick else (1024, 2048, 4096, 8192, 16384)
  header = ["seq", "batch", "causal", "density", "impl", "ms", "TFLOP/s", "% peak"]
  rows = [table_row(header), table_row(["---"] * len(header))]

  def record(seq, b, causal, density, impl, fn, args, flops):
    try:
      t = _time(fn, *args)
      tf = flops / t / 1e12
      pct = f"{100 * tf / peak:.1f}" if peak else "n/a"
      cells = [seq, b, causal, f"{density:.0%}", impl, f"{t * 1e3:.3f}", f"{tf:.3g}", pct]
    except Exception as e:  # noqa: BLE001 -- a baseline may not exist (e.g. cuDNN, OOM)
      msg = f"{type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"
      cells = [seq, b, causal, f"{density:.0%}", impl, "n/a", "n/a", msg]
    rows.append(table_row(cells))
    print(rows[-1], flush=True)

  ours = _kernel(platform) if platform != "cpu" else None
  for seq in seqs:
    b = max(1, tokens // seq)
    q, k, v = _inputs(b, seq, seq, h, h, d, dtype)
    for causal in (False, True):
      flops = 4.0 * b * h * seq * seq * d * (0.5 if causal else 1.0)
      if ours is not None:
        record(seq, b, causal, 1.0, "ours (Pallas)",
               jax.jit(lambda q, k, v, c=causal: ours(q, k, v, causal=c)), (q, k, v), flops)
        if not quick and platform == "gpu":
          for vname, bs, extra in (("ours block_q=64", BlockSizes(64, 128), {}),
                                   ("ours P via smem", None, {"p_via_smem": True})):
            fn = _kernel(platform, bs, **extra)
            record(seq, b, causal, 1.0, vname,
                   jax.jit(lambda q, k, v, c=causal, fn=fn: fn(q, k, v, causal=c)), (q, k, v),
                   flops)
      record(seq, b, causal, 1.0, "XLA reference",
             jax.jit(lambda q, k, v, c=causal: attention_reference(q, k, v, causal=c)),
             (q, k, v), flops)
      impl = "cudnn" if platform == "gpu" else "xla"
      record(seq, b, causal, 1.0, f"jax.nn.dot_product_attention ({impl})",
             jax.jit(lambda q, k, v, c=causal, i=impl: jax.nn.dot_product_attention(
                 q, k, v, is_causal=c, implementation=i)), (q, k, v), flops)
    if ours is not None and (seq == 4096 or (not quick and seq == 16384)):
      for density in (1.0, 0.5, 0.25):
        dense = _block_sparse(1, seq, seq, 128, 128, density, seed=seq)
        lay = fa_layout.make_layout(seq, seq, 128, 128, causal=False, window=None,
                                    dense_mask=dense)
        flops = 4.0 * b * h * seq * seq * d * lay.density
        record(seq, b, False, lay.density, "ours block-sparse",
               jax.jit(lambda q, k, v, m=dense: ours(q, k, v, causal=False, dense_mask=m)),
               (q, k, v), flops)
        if density < 1.0:
          record(seq, b, False, lay.density, "XLA reference (dense mask)",
                 jax.jit(lambda q, k, v, m=dense: attention_reference(
                     q, k, v, causal=False, dense_mask=m)), (q, k, v), flops)
  notes.append(f"Forward only, {jnp.dtype(dtype).name}, heads {h}, head_dim {d}, batch x seq = "
               f"{tokens} tokens; time = min over 3 rounds of back-to-back calls. TFLOP/s counts "
               "useful FLOPs (causal halves them, block-sparse scales by tile density). "
               f"Peak: {peak if peak else 'n/a'} TFLOP/s (dense bf16, {kind}).")
  return "\n".join(rows), notes


# ------------------------------------------------------------------------------------------------
# Decode attention and grouped matmul (--decode-gmm)
# ------------------------------------------------------------------------------------------------


def bench_decode_gmm(platform: str) -> str:
  """Split-K decode attention and grouped matmul: ours vs the XLA paths, with max |error|.

  Decode: T new tokens (1 = a decode step, 16 = a draft tree) of 32 query heads over a cache of
  8 kv heads x 128 (GQA 4), per-row lengths at 3/4 of max_len; GB/s counts the K/V bytes of the
  visible slots. Grouped matmul: 8 groups of uneven sizes (one empty), TFLOP/s = 2 M K N.
  "XLA dense mask" is MultiHeadAttention's own cached path (dense [b, h, T, max_len] scores);
  effx.moe "blocked" is the dropless CPU path. On CPU the Pallas kernels only run in interpret
  mode, whose timing is not meaningful: only the XLA paths are timed (smaller shapes, float32).
  On GPU the grouped-matmul kernel vs ragged_dot comparison is ``--op gmm``.
  """
  from effx.attention.dot_product import dot_product_attention
  from effx.moe.dispatch import grouped_matmul as moe_grouped_matmul
  from effx.pallas_kernels import decode_attention as da
  from effx.pallas_kernels import grouped_matmul as gm
  cpu = platform == "cpu"
  dtype = jnp.float32 if cpu else jnp.bfloat16
  impl = "xla" if cpu else "pallas"
  rows = [table_row(["op", "shape", "impl", "ms", "rate", "max err vs XLA"]),
          table_row(["---"] * 6)]

  def record(op, shape, name, fn, args, rate_fn, ref=None):
    try:
      out = fn(*args)
      err = "" if ref is None else f"{float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref))):.2e}"
      t = _time(fn, *args)
      cells = [op, shape, name, f"{t * 1e3:.3f}", rate_fn(t), err]
    except Exception as e:  # noqa: BLE001 -- report and go on
      cells = [op, shape, name, "n/a", "n/a", f"{type(e).__name__}: {str(e)[:60]}"]
    rows.append(table_row(cells))
    print(rows[-1], flush=True)

  b, h, hkv, d, max_len = (2, 8, 2, 64, 1024) if cpu else (8, 32, 8, 128, 8192)
  for t in (1, 16):
    q, k, v = _inputs(b, t, max_len, h, hkv, d, dtype)
    lengths = jnp.full((b,), max_len * 3 // 4 - t, jnp.int32)
    vis = da.visible_mask(lengths, jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)),
                                                    (b, t, t)), max_len)
    ref = jax.jit(da.decode_attention_reference)(q, k, v, lengths).astype(jnp.float32)
    gbs = lambda s: f"{2 * b * (max_len * 3 // 4) * hkv * d * jnp.dtype(dtype).itemsize / s / 1e9:.1f} GB/s"
    shape = f"b{b} T{t} h{h}/{hkv} d{d} L{max_len}"
    if not cpu:
      record("decode", shape, "ours (Pallas)",
             jax.jit(lambda q, k, v, n: da.decode_attention(q, k, v, n, impl=impl)),
             (q, k, v, lengths), gbs, ref)
    record("decode", shape, "XLA reference", jax.jit(da.decode_attention_reference),
           (q, k, v, lengths), gbs, ref)
    record("decode", shape, "XLA dense mask (MHA path)",
           jax.jit(lambda q, k, v, m: dot_product_attention(q, k, v, m[:, None])),
           (q, k, v, vis), gbs, ref)

  m, kk, n, g = (2048, 256, 512, 8) if cpu else (16384, 2048, 4096, 8)
  sizes = np.array([3, 1, 0, 2, 5, 1, 2, 2], np.float64)
  sizes = np.floor(sizes / sizes.sum() * m).astype(np.int32)
  sizes[-1] += m - sizes.sum()
  gs = jnp.asarray(sizes)
  ks = jax.random.split(jax.random.key(1), 2)
  lhs = jax.random.normal(ks[0], (m, kk), jnp.float32).astype(dtype)
  rhs = (jax.random.normal(ks[1], (g, kk, n), jnp.float32) / np.sqrt(kk)).astype(dtype)
  ref = jax.jit(gm.grouped_matmul_reference)(lhs, rhs, gs).astype(jnp.float32)
  tfs = lambda s: f"{2 * m * kk * n / s / 1e12:.3g} TFLOP/s"
  shape = f"M{m} K{kk} N{n} G{g}"
  if platform == "tpu":
    record("grouped matmul", shape, "ours (Pallas)",
           jax.jit(lambda x, w, s: gm.grouped_matmul(x, w, s, impl="pallas")), (lhs, rhs, gs),
           tfs, ref)
  record("grouped matmul", shape, "jax.lax.ragged_dot", jax.jit(gm.grouped_matmul_reference),
         (lhs, rhs, gs), tfs, ref)
  if cpu:
    record("grouped matmul", shape, "effx.moe blocked (block 128)",
           jax.jit(lambda x, w, s: moe_grouped_matmul(x, w, s, impl="blocked", block=128)),
           (lhs, rhs, gs), tfs, ref)
  note = bench_decode_gmm.__doc__.split("\n\n")[0].replace("\n  ", " ").strip()
  return (f"{note} {jnp.dtype(dtype).name}; time = min over 3 rounds of back-to-back calls. "
          + ("CPU: Pallas kernels only run interpreted here (timing not meaningful), so only the "
             "XLA paths are timed." if cpu else "") + "\n\n" + "\n".join(rows))


def main():
  try:
    platform = jax.default_backend()
  except Exception as e:  # noqa: BLE001 -- e.g. --platform gpu on a machine without one
    _banner(f"JAX could not start platform {os.environ.get('JAX_PLATFORMS')!r}: "
            f"{type(e).__name__}: {e}")
    sys.exit(2)
  if ARGS.platform is not None and platform != ARGS.platform:
    _banner(f"asked for --platform {ARGS.platform} but JAX runs on {platform}")
    sys.exit(2)
  print(f"jax {jax.__version__} on {platform}: {jax.devices()[0].device_kind}", flush=True)
  if ARGS.op is not None:
    module_name, title = GPU_OPS[ARGS.op]
    import importlib
    run = importlib.import_module(module_name).run
    body = run(ARGS.quick) if ARGS.budget is None else run(ARGS.quick, ARGS.budget)
    print("\n" + body, flush=True)
    if not ARGS.no_write:
      append_section(f"{title} ({platform}{', quick' if ARGS.quick else ''})", body)
    return
  if ARGS.decode_gmm:
    body = bench_decode_gmm(platform)
    print("\n" + body)
    if not ARGS.no_write:
      append_section(f"Decode attention and grouped matmul ({platform})", body)
    return
  check_lines = []
  if platform in ("gpu", "tpu"):
    check_lines = check(platform, ARGS.quick)
  if ARGS.check_only:
    return
  table, notes = bench(platform, ARGS.quick)
  body = "\n".join(notes) + "\n\n" + table + ("\n\n" + "\n".join(check_lines)
                                              if check_lines else "")
  print("\n" + body)
  if not ARGS.no_write:
    try:
      append_section(f"Flash attention forward ({platform}{', quick' if ARGS.quick else ''})",
                     body)
    except Exception as e:  # noqa: BLE001 -- the table is printed above either way
      print(f"could not append to BENCHMARKS.md: {type(e).__name__}: {e}", file=sys.stderr)


if __name__ == "__main__":
  main()
