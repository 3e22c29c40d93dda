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
import os
import time

import jax
import jax.numpy as jnp

import flax.linen as nn

from benchmarks._report import append_section
from effx.layers.mlp import GatedMLP
from effx.moe import MoEFeedForward, Router
from effx.moe import dispatch as dispatch_lib


class BatchedBlocksMoE(nn.Module):
  """The alternative that "blocked" was measured against (kept here, not in the library):
  the same block-padded layout, run as ONE batched matmul over all blocks of the static bound
  round_up(T*k + E*(block-1), block), each block with its expert's weights gathered
  ([num_blocks, d, f] copies). Same routing/parameters as MoEFeedForward (no aux losses)."""

  num_experts: int
  top_k: int
  expert_dim: int
  block: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, s, d = x.shape
    tokens = x.reshape(b * s, d)
    routing = Router(self.num_experts, self.top_k, name="router")(tokens)
    wi = self.param("wi", nn.initializers.lecun_normal(batch_axis=(0,)),
                    (self.num_experts, d, 2, self.expert_dim))
    wo = self.param("wo", nn.initializers.lecun_normal(batch_axis=(0,)),
                    (self.num_experts, self.expert_dim, d))
    n, e, blk = b * s * self.top_k, self.num_experts, self.block
    key = routing.expert_index.reshape(-1)
    rank, counts = dispatch_lib._rank_in_group(key, e, None)
    padded = (counts + blk - 1) // blk * blk
    ends = jnp.cumsum(padded)
    rows = -(-(n + e * (blk - 1)) // blk) * blk
    slot_row = ends[key] - padded[key] + rank
    xb = dispatch_lib._gather_rows(tokens, jnp.arange(n) // self.top_k, slot_row, rows)
    block_expert = jnp.minimum(jnp.searchsorted(ends, jnp.arange(rows // blk) * blk, "right"),
                               e - 1)
    yb = dispatch_lib.gated_mlp_batched(xb.reshape(rows // blk, blk, d), wi[block_expert],
                                        wo[block_expert], nn.silu)
    y_slots = dispatch_lib._read_rows(yb.reshape(rows, d), slot_row)
    return dispatch_lib.combine(y_slots, routing, routing.mask, x.dtype).reshape(b, s, d)


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
      "(alternative) dropless, batched matmul over bound blocks, gathered weights":
          (BatchedBlocksMoE(args.experts, args.top_k, args.expert_dim, args.block_size), {}),
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


def _time(fn, *args) -> tuple[float, float]:
  """(wall seconds, CPU seconds of this process, all threads)."""
  t0, c0 = time.perf_counter(), time.process_time()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - t0, time.process_time() - c0


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
  # best[name] = [fwd wall, fwd cpu, fwd+bwd wall, fwd+bwd cpu], minimum over rounds.
  best = {name: [float("inf")] * 4 for name in compiled}
  for _ in range(args.rounds):
    for name, (params, fwd, fwd_bwd) in compiled.items():
      times = _time(fwd, params, x) + _time(fwd_bwd, params, x)
      best[name] = [min(a, b) for a, b in zip(best[name], times)]
  ref = best[next(iter(best))]
  lines = [
      f"{args.tokens} tokens (batch {args.tokens // args.seq} x seq {args.seq}), embed "
      f"{args.embed}, {args.experts} experts of width {args.expert_dim}, top-{args.top_k}, "
      f"SwiGLU experts vs a dense SwiGLU of width {args.top_k * args.expert_dim} (same active "
      f"parameters and FLOPs), float32, MoE in training mode (train capacity factor, aux "
      f"losses in the loss); min over {args.rounds} interleaved rounds of wall time and of "
      f"process CPU time (all threads; steadier than wall time on a shared machine); `auto` "
      f"dropless backend here: {dispatch_lib.resolve_impl('auto')}; block size "
      f"{args.block_size}. Load average during the run: "
      f"{', '.join(f'{v:.1f}' for v in os.getloadavg())} (1/5/15 min).",
      "",
      "| layer | fwd ms | x dense | fwd CPU x dense | fwd+bwd ms | x dense | fwd+bwd CPU x dense |",
      "|---|---:|---:|---:|---:|---:|---:|",
  ]
  for name, (fw, fc, bw, bc) in best.items():
    lines.append(f"| {name} | {fw * 1e3:.1f} | {fw / ref[0]:.2f} | {fc / ref[1]:.2f} | "
                 f"{bw * 1e3:.1f} | {bw / ref[2]:.2f} | {bc / ref[3]:.2f} |")
  body = "\n".join(lines)
  print(body)
  if not args.no_write:
    append_section("MoE layer step time", body)


if __name__ == "__main__":
  main()
