"""The device mesh and the logical-axis rules that map parameter/activation names onto it."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor", "expert")

# Logical axis name -> mesh axes. Parameters: "embed" is FSDP-sharded, the wide dims of
# matmuls ("mlp", "heads", "vocab") are tensor-parallel, "expert" goes to the expert axis.
# Activations: "batch" spreads over every data-like axis.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp", "expert")),
    ("length", None),
    ("act_embed", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("vocab", "tensor"),
    ("expert", "expert"),
    ("layers", None),
    ("norm", None),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Mesh axis sizes; exactly one may be -1 ("all remaining devices").

  Attributes:
    data, fsdp, tensor, expert: sizes of the named mesh axes.
    rules: logical-axis rules (logical name, mesh axis or axes or None).
  """

  data: int = -1
  fsdp: int = 1
  tensor: int = 1
  expert: int = 1
  rules: tuple[tuple[str, Any], ...] = DEFAULT_RULES

  def axis_sizes(self, num_devices: int) -> tuple[int, ...]:
    """Resolved sizes for `num_devices` devices; ValueError naming the fields otherwise."""
    sizes = [self.data, self.fsdp, self.tensor, self.expert]
    for name, size in zip(MESH_AXES, sizes):
      if size == 0 or size < -1:
        raise ValueError(f"mesh.{name}: got {size}; must be a positive size or -1")
    if sizes.count(-1) > 1:
      raise ValueError(f"mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
      if num_devices % known:
        raise ValueError(f"mesh: fixed axis sizes {dict(zip(MESH_AXES, sizes))} (product {known}) "
                         f"do not divide the device count {num_devices}")
      sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
      raise ValueError(f"mesh: axis sizes {dict(zip(MESH_AXES, sizes))} multiply to "
                       f"{math.prod(sizes)}, but there are {num_devices} devices")
    return tuple(sizes)


def make_mesh(config: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A `Mesh` over `devices` (default: all) with axes ("data", "fsdp", "tensor", "expert")."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = config.axis_sizes(len(devices))
  return jax.make_mesh(sizes, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(sizes),
                       devices=devices)


def logical_sharding(tree: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> Any:
  """NamedShardings for a tree of (possibly boxed) arrays or ShapeDtypeStructs.

  Leaves carrying logical names (`nn.LogicallyPartitioned`) are sharded by `rules`; other
  leaves are replicated.
  """
  specs = nn.get_partition_spec(tree)
  return nn.logical_to_mesh_sharding(specs, mesh, list(rules))


def batch_sharding(mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> NamedSharding:
  """Sharding of a [batch, seq] input array: batch over the data-like axes."""
  spec = nn.logical_to_mesh_axes(("batch", "length"), list(rules))
  return NamedSharding(mesh, spec)


def replicated(mesh: Mesh) -> NamedSharding:
  """A fully replicated sharding on `mesh`."""
  return NamedSharding(mesh, PartitionSpec())


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
  """Starts JAX's multi-process runtime (`jax.distributed.initialize`) on every process.

  Explicit arguments win, then the variables JAX_COORDINATOR_ADDRESS ("host:port" of process
  0), JAX_NUM_PROCESSES and JAX_PROCESS_ID (set them per process, like a torchrun-style
  launcher does); whatever is still unset comes from JAX's own cluster detection (Cloud TPU VMs
  and GKE, SLURM, Open MPI, Kubernetes). ValueError (one line) when neither gives a cluster.
  """
  env = os.environ
  coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS") or None
  values = {"JAX_NUM_PROCESSES": num_processes, "JAX_PROCESS_ID": process_id}
  for name in values:
    if values[name] is None and env.get(name, "") != "":
      try:
        values[name] = int(env[name])
      except ValueError:
        raise ValueError(f"{name}: got {env[name]!r}; must be an integer") from None
  try:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=values["JAX_NUM_PROCESSES"],
                               process_id=values["JAX_PROCESS_ID"])
  except (ValueError, RuntimeError) as err:
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    raise ValueError(f"--distributed: {first} (set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES "
                     "and JAX_PROCESS_ID, or run where JAX detects the cluster)") from err
