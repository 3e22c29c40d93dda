"""Expert parallelism: experts sharded over a mesh axis, tokens exchanged with all-to-all.

Inside `jax.shard_map` (manual over the expert axis only; other mesh axes stay automatic) each
of the P devices holds T/P tokens (with their routing) and E/P experts (E/P consecutive experts
per device). Fixed-size `jax.lax.all_to_all` exchanges are used: `jax.lax.ragged_all_to_all`
is not implemented by XLA:CPU (jax 0.12: "HLO opcode ragged-all-to-all is not supported by
XLA:CPU"), so buffers have static sizes:

* capacity: each source device gives every expert C_l = ceil(capacity_factor * (T/P) * k / E)
  rows (the local capacity; drops are decided per source device with the same priority rule as
  on one device, so results match the single-device layer only when nothing is dropped). The
  buffer [E * C_l, embed] is sent device-major; each device runs its E/P experts on
  [E/P, P * C_l, embed] with a batched matmul and sends the rows back.
* dropless: each source device sends every destination device a buffer of S = (T/P) *
  min(k, E/P) rows (a token cannot send more slots to one device: its experts are distinct), with
  each row's local expert id; the receiver runs the dropless grouped matmul over its P * S rows
  and sends them back. Never drops; costs up to P / k times the rows of a ragged exchange.

Expert-choice routing always uses the dropless exchange (its per-source loads are uneven).
The routing itself (and every loss) is computed outside, on the global token set, so it is the
same as on one device. T is padded to a multiple of P with unused slots (decoding batch 1).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from effx.moe.dispatch import (Activation, DispatchInfo, _gather_rows, _rank_in_group, _read_rows,
                               combine, compute_capacity, drop_priority, dropless_expert_outputs,
                               gated_mlp_batched)
from effx.moe.routers import Routing


def expert_axis_size(axis: str | None) -> int:
  """Size of mesh axis `axis` in the current abstract mesh (`jax.set_mesh`); 1 if absent or
  already manual (the layer is called inside the caller's own shard_map over it)."""
  if axis is None:
    return 1
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or axis not in mesh.axis_names or axis in mesh.manual_axes:
    return 1
  return int(mesh.shape[axis])


def _constrain(x: jax.Array, spec: P) -> jax.Array:
  """Puts x on `spec` when the mesh axes are Explicit (shard_map then requires it)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh._any_axis_explicit:
    return jax.sharding.reshard(x, spec)
  return x


def expert_parallel_moe(x: jax.Array, routing: Routing, wi: jax.Array, wo: jax.Array,
                        act: Activation, *, axis: str, execution: str,
                        capacity_factor: float = 1.25, drop_policy: str = "gate",
                        impl: str = "auto", block_size: int = 256
                        ) -> tuple[jax.Array, DispatchInfo]:
  """Routed experts over the mesh axis `axis`. Same arguments as `dispatch.moe_forward` except
  the capacity, given as a factor (the per-source capacity is derived inside).

  x [T, d] -> ([T, d], DispatchInfo). Requires E % P == 0 (P = size of `axis`).
  """
  num_devices = expert_axis_size(axis)
  num_experts = wi.shape[0]
  if num_experts % num_devices:
    raise ValueError(f"num_experts: got {num_experts}; must be a multiple of the '{axis}' mesh "
                     f"axis size {num_devices}")
  experts_local = num_experts // num_devices
  t, k = routing.expert_index.shape
  pad = -t % num_devices
  index, gates, mask = routing.expert_index, routing.gates, routing.mask
  if pad:
    x = jnp.pad(x, ((0, pad), (0, 0)))
    index, gates, mask = (jnp.pad(a, ((0, pad), (0, 0))) for a in (index, gates, mask))
  t_local = (t + pad) // num_devices
  d = x.shape[-1]

  def local(x_l, index_l, gates_l, mask_l, wi_l, wo_l):
    n = t_local * k
    expert = index_l.reshape(-1)
    valid = mask_l.reshape(-1)
    src = jnp.arange(n, dtype=jnp.int32) // k
    local_routing = Routing(expert_index=index_l, gates=gates_l, mask=mask_l, probs=gates_l,
                            logits=gates_l)
    a2a = lambda a: jax.lax.all_to_all(a, axis, 0, 0, tiled=True)
    if execution == "capacity":
      cap = compute_capacity(t_local, k, num_experts, capacity_factor)
      key = jnp.where(valid, expert, num_experts).astype(jnp.int32)
      rank, _ = _rank_in_group(key, num_experts, drop_priority(local_routing, drop_policy))
      kept = valid & (rank < cap)
      slot_row = jnp.where(kept, key * cap + rank, num_experts * cap)
      xb = _gather_rows(x_l, src, slot_row, num_experts * cap)
      xr = a2a(xb.reshape(num_devices, experts_local * cap, d))
      xr = xr.reshape(num_devices, experts_local, cap, d).transpose(1, 0, 2, 3)
      yr = gated_mlp_batched(xr.reshape(experts_local, num_devices * cap, d), wi_l, wo_l, act)
      yr = yr.reshape(experts_local, num_devices, cap, d).transpose(1, 0, 2, 3)
      yb = a2a(yr.reshape(num_devices, experts_local * cap, d))
      y_slots = _read_rows(yb.reshape(num_experts * cap, d), slot_row)
    elif execution == "dropless":
      per_dest = t_local * min(k, experts_local)
      dest = jnp.where(valid, expert // experts_local, num_devices).astype(jnp.int32)
      rank, _ = _rank_in_group(dest, num_devices, None)
      kept = valid
      slot_row = jnp.where(valid, dest * per_dest + rank, num_devices * per_dest)
      rows = num_devices * per_dest
      xb = _gather_rows(x_l, src, slot_row, rows)
      eb = jnp.full((rows,), -1, jnp.int32).at[slot_row].set(
          (expert % experts_local).astype(jnp.int32), mode="drop")
      xr = a2a(xb.reshape(num_devices, per_dest, d)).reshape(rows, d)
      er = a2a(eb.reshape(num_devices, per_dest)).reshape(rows)
      yr = dropless_expert_outputs(xr, jnp.arange(rows, dtype=jnp.int32), jnp.maximum(er, 0),
                                   er >= 0, wi_l, wo_l, act, impl=impl, block_size=block_size)
      yb = a2a(yr.reshape(num_devices, per_dest, d)).reshape(rows, d)
      y_slots = _read_rows(yb, slot_row)
    else:
      raise ValueError(f"expert_parallel_moe.execution: got {execution!r}; allowed: "
                       "'capacity', 'dropless'")
    y = combine(y_slots, local_routing, kept, x_l.dtype)
    used = jax.lax.psum(jnp.sum(valid.astype(jnp.float32)), axis)
    done = jax.lax.psum(jnp.sum((valid & kept).astype(jnp.float32)), axis)
    return y, 1.0 - done / jnp.maximum(used, 1.0)

  tok, rep = P(axis), P()
  fn = jax.shard_map(local, in_specs=(tok, tok, tok, tok, tok, tok), out_specs=(tok, rep),
                     axis_names={axis})
  in_spec = jax.typeof(x).sharding.spec
  args = (x, index, gates, mask, wi, wo)
  y, rate = fn(*(_constrain(a, P(axis)) for a in args))
  return _constrain(y, in_spec)[:t], DispatchInfo(drop_rate=rate)
