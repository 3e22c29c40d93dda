r"""MoE layer step time vs a dense gated MLP with the same active parameters.

Usage: python -m benchmarks.moe [--tokens 4096] [--embed 256] [--experts 8] [--top-k 2]
                                [--expert-dim 512] [--rounds 7] [--no-write]

Every variant (dense, MoE capacity 1.0 / 1.25, dropless blocked, dropless ragged_dot) is
compiled first, then timed in interleaved rounds (each round runs every variant once, forward
and forward+backward); the figure kept is the minimum over rounds, so the ratios to the dense
layer are measured side by side in one process. Appends "## MoE layer step time" to
BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from benchmarks._report import append_section
from effx.layers.mlp import GatedMLP
from effx.moe import MoEFeedForward
from effx.moe.dispatch import resolve_impl


def _variants(args) -> dict[str, tuple[object, dict]]:
  """name -> (module, call kwargs): MoE runs in training mode (train capacity factor)."""
  moe = lambda **kw: MoEFeedForward(num_experts=args.experts, top_k=args.top_k,
                                    expert_dim=args.expert_dim, expert_axis=None, **kw)
  return {
      f"dense gated MLP (width {args.top_k * args.expert_dim})":
          (GatedMLP(hidden_dim=args.top_k * args.expert_dim), {}),
      "MoE capacity 1.0": (moe(dispatch="capacity", capacity_factor=1.0), {"deterministic": False}),
      "MoE capacity 1.25": (moe(dispatch="capacity", capacity_factor=1.25), {"deterministic": False}),
      "MoE dropless, blocked": (moe(dispatch="dropless", impl="blocked",
                                    block_size=args.block_size), {"deterministic": False}),
      "MoE dropless, ragged_dot": (moe(dispatch="dropless", impl="ragged"), {"deterministic": False}),
  }


def _compile(module, call_kwargs: dict, x: jax.Array):
  variables = module.init(jax.random.key(0), x)
  params = variables["params"]

  def loss(p, x):
    y, sown = module.apply({"params": p}, x, **call_kwargs,
                           mutable=["aux_loss", "metrics"])
    aux = sum(jnp.sum(a) for a in jax.tree.leaves(sown.get("aux_loss", {})))
    return jnp.mean(jnp.square(y)) + aux

  fwd = jax.jit(lambda p, x: module.apply({"params": p}, x, **call_kwargs,
                                          mutable=["aux_loss", "metrics"])[0])
  fwd_bwd = jax.jit(jax.grad(loss, argnums=(0, 1)))
  jax.block_until_ready(fwd(params, x))
  jax.block_until_ready(fwd_bwd(params, x))
  return params, fwd, fwd_bwd


def _time(fn, *args) -> float:
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - t0


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--tokens", type=int, default=4096)
  parser.add_argument("--seq", type=int, default=512, help="tokens are batch x seq")
  parser.add_argument("--embed", type=int, default=256)
  parser.add_argument("--experts", type=int, default=8)
  parser.add_argument("--top-k", type=int, default=2)
  parser.add_argument("--expert-dim", type=int, default=512)
  parser.add_argument("--block-size", type=int, default=256)
  parser.add_argument("--rounds", type=int, default=7)
  parser.add_argument("--skip-ragged", action="store_true", help="skip plain ragged_dot")
  parser.add_argument("--no-write", action="store_true", help="print only")
  args = parser.parse_args()

  x = jax.random.normal(jax.random.key(1), (args.tokens // args.seq, args.seq, args.embed))
  variants = _variants(args)
  if args.skip_ragged:
    variants = {k: v for k, v in variants.items() if "ragged" not in k}
  compiled = {name: _compile(m, kw, x) for name, (m, kw) in variants.items()}
  best = {name: [float("inf"), float("inf")] for name in compiled}
  for _ in range(args.rounds):
    for name, (params, fwd, fwd_bwd) in compiled.items():
      best[name][0] = min(best[name][0], _time(fwd, params, x))
      best[name][1] = min(best[name][1], _time(fwd_bwd, params, x))
  dense_name = next(iter(best))
  d_f, d_fb = best[dense_name]
  lines = [
      f"{args.tokens} tokens (batch {args.tokens // args.seq} x seq {args.seq}), embed "
      f"{args.embed}, {args.experts} experts of width {args.expert_dim}, top-{args.top_k}, "
      f"SwiGLU experts vs a dense SwiGLU of width {args.top_k * args.expert_dim} (same active "
      f"parameters and FLOPs), float32; min of {args.rounds} interleaved rounds; `auto` dropless "
      f"backend here: {resolve_impl('auto')}; blocked block size {args.block_size}.",
      "",
      "| layer | forward ms | x dense | forward+backward ms | x dense |",
      "|---|---:|---:|---:|---:|",
  ]
  for name, (f, fb) in best.items():
    lines.append(f"| {name} | {f * 1e3:.1f} | {f / d_f:.2f} | {fb * 1e3:.1f} | {fb / d_fb:.2f} |")
  body = "\n".join(lines)
  print(body)
  if not args.no_write:
    append_section("MoE layer step time", body)


if __name__ == "__main__":
  main()
