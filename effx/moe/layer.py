"""`MoEFeedForward`: a mixture-of-experts drop-in for the dense FFN slot (`y = ffn(x)`)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from effx.layers.mlp import GatedMLP, activation
from effx.moe import dispatch as dispatch_lib
from effx.moe import routers
from effx.moe.parallel import expert_axis_size, expert_parallel_moe


def _expert_init(in_axis: int, out_axis: int | tuple[int, ...]) -> jax.nn.initializers.Initializer:
  """fan-in truncated normal per expert (axis 0 is the expert batch axis)."""
  return nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=in_axis,
                                          out_axis=out_axis, batch_axis=(0,))


class MoEFeedForward(nn.Module):
  """Routed gated-MLP experts (+ optional always-on shared experts).

  Call: `y = moe(x, deterministic=True)`, x and y `[batch, seq, embed]` (compute `dtype`).
  `deterministic=False` (training) uses `capacity_factor` and router jitter;
  `deterministic=True` (eval, decoding) uses `eval_capacity_factor` and no jitter.

  Parameters (logical axes): "router/kernel" [embed, E] ("embed", None);
  "wi" [E, embed, 2, expert_dim] ("expert", "embed", None, "mlp") (gate, up);
  "wo" [E, expert_dim, embed] ("expert", "mlp", "embed"); with shared experts a `GatedMLP`
  "shared_experts" of width num_shared_experts * shared_expert_dim.
  Sown: "aux_loss" {"load_balance_loss", "router_z_loss"} (already times their coefficients,
  only when the coefficient is > 0); "metrics" {"expert_load" [E] (fraction of slots per
  expert before drops), "drop_rate", "load_balance_unscaled", "router_z_unscaled",
  "router_entropy"} (raw values; named apart from the "aux_loss" ones because tools keying
  variables by name alone, e.g. `nnx.bridge.ToNNX`, refuse duplicates). With
  `bias_balancing` the router keeps "moe_state" {"expert_bias",
  "expert_load"} (see `routers.update_moe_state`).

  Expert parallelism: when the current abstract mesh (`jax.set_mesh(mesh)`) has an axis named
  `expert_axis` of size > 1, experts are split over it and tokens exchanged with all-to-all
  (effx/moe/parallel.py); otherwise everything runs where the arrays live.

  Attributes:
    num_experts: E routed experts.
    top_k: experts per token (token choice); for expert choice it sets the capacity.
    expert_dim: hidden width of each routed expert (fine-grained experts: many small ones).
    num_shared_experts: always-on experts (DeepSeekMoE), fused into one gated MLP.
    shared_expert_dim: hidden width of each shared expert (default: expert_dim).
    activation: gate activation name (effx.layers.mlp.ACTIVATIONS): "silu" = SwiGLU.
    routing: "softmax_topk" | "topk_softmax" | "expert_choice" (routers.ROUTINGS).
    renormalize: renormalise the k gates to sum to 1 ("softmax_topk").
    router_jitter: multiplicative router input noise in training (rng stream "router").
    bias_balancing: DeepSeek-V3 aux-loss-free bias for top-k selection.
    bias_update_rate: > 0: the forward updates that bias itself when "moe_state" is mutable.
    dispatch: "dropless" | "capacity" (expert choice always executes as "capacity" on one
      device: every expert takes exactly its capacity, nothing is dropped).
    impl: dropless grouped-matmul backend, "auto" | "blocked" | "ragged" | "pallas".
    block_size: rows per block of the "blocked" backend.
    capacity_factor / eval_capacity_factor: capacity C = ceil(f * T * k / E) (train / eval).
    drop_policy: which slots a full expert drops: "gate" (lowest gates) | "position".
    load_balance_coef / z_loss_coef: coefficients of the sown auxiliary losses.
    causal: the model is a causal LM (expert choice leaks future tokens into routing).
    allow_noncausal_routing: permit expert choice in a causal model anyway.
    expert_axis: mesh axis for expert parallelism (None: never).
    dtype / param_dtype: compute and parameter dtypes (router math is float32).
  """

  num_experts: int = 8
  top_k: int = 2
  expert_dim: int = 1024
  num_shared_experts: int = 0
  shared_expert_dim: int | None = None
  activation: str = "silu"
  routing: str = "softmax_topk"
  renormalize: bool = True
  router_jitter: float = 0.0
  bias_balancing: bool = False
  bias_update_rate: float = 0.0
  dispatch: str = "dropless"
  impl: str = "auto"
  block_size: int = 256
  capacity_factor: float = 1.25
  eval_capacity_factor: float = 2.0
  drop_policy: str = "gate"
  load_balance_coef: float = 1e-2
  z_loss_coef: float = 1e-3
  causal: bool = True
  allow_noncausal_routing: bool = False
  expert_axis: str | None = "expert"
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def __post_init__(self):
    name = type(self).__name__
    if self.num_experts < 1:
      raise ValueError(f"{name}.num_experts: got {self.num_experts}; must be >= 1")
    if not 1 <= self.top_k <= self.num_experts:
      raise ValueError(f"{name}.top_k: got {self.top_k}; must be in [1, num_experts="
                       f"{self.num_experts}]")
    if self.expert_dim < 1:
      raise ValueError(f"{name}.expert_dim: got {self.expert_dim}; must be >= 1")
    if self.num_shared_experts < 0:
      raise ValueError(f"{name}.num_shared_experts: got {self.num_shared_experts}; must be >= 0")
    if self.shared_expert_dim is not None and self.shared_expert_dim < 1:
      raise ValueError(f"{name}.shared_expert_dim: got {self.shared_expert_dim}; must be >= 1 "
                       "or None")
    activation(self.activation)
    if self.routing not in routers.ROUTINGS:
      raise ValueError(f"{name}.routing: got {self.routing!r}; allowed: {routers.ROUTINGS}")
    if self.routing == "expert_choice" and self.causal and not self.allow_noncausal_routing:
      raise ValueError(f"{name}.routing: 'expert_choice' is non-causal (a token's experts depend "
                       "on later tokens) and causal=True; set allow_noncausal_routing=True or "
                       "causal=False")
    if self.bias_balancing and self.routing == "expert_choice":
      raise ValueError(f"{name}.bias_balancing: got True with routing='expert_choice'; allowed "
                       "only with token-choice routings")
    if self.router_jitter < 0:
      raise ValueError(f"{name}.router_jitter: got {self.router_jitter}; must be >= 0")
    if self.bias_update_rate < 0:
      raise ValueError(f"{name}.bias_update_rate: got {self.bias_update_rate}; must be >= 0")
    if self.dispatch not in dispatch_lib.EXECUTIONS:
      raise ValueError(f"{name}.dispatch: got {self.dispatch!r}; allowed: "
                       f"{dispatch_lib.EXECUTIONS}")
    if self.impl not in dispatch_lib.DROPLESS_IMPLS:
      raise ValueError(f"{name}.impl: got {self.impl!r}; allowed: {dispatch_lib.DROPLESS_IMPLS}")
    if self.block_size < 1:
      raise ValueError(f"{name}.block_size: got {self.block_size}; must be >= 1")
    for field in ("capacity_factor", "eval_capacity_factor"):
      if not getattr(self, field) > 0:
        raise ValueError(f"{name}.{field}: got {getattr(self, field)}; must be > 0")
    if self.drop_policy not in dispatch_lib.DROP_POLICIES:
      raise ValueError(f"{name}.drop_policy: got {self.drop_policy!r}; allowed: "
                       f"{dispatch_lib.DROP_POLICIES}")
    for field in ("load_balance_coef", "z_loss_coef"):
      if getattr(self, field) < 0:
        raise ValueError(f"{name}.{field}: got {getattr(self, field)}; must be >= 0")
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, *, deterministic: bool = True) -> jax.Array:
    """x: [batch, seq, embed] -> [batch, seq, embed] (dtype)."""
    batch, seq, embed = x.shape
    x = x.astype(self.dtype)
    tokens = x.reshape(batch * seq, embed)
    num_tokens = batch * seq
    factor = self.eval_capacity_factor if deterministic else self.capacity_factor
    capacity = dispatch_lib.compute_capacity(num_tokens, self.top_k, self.num_experts, factor)

    routing = routers.Router(
        num_experts=self.num_experts, top_k=self.top_k, routing=self.routing,
        renormalize=self.renormalize, jitter=self.router_jitter,
        bias_balancing=self.bias_balancing, bias_update_rate=self.bias_update_rate,
        param_dtype=self.param_dtype, name="router")(
            tokens, deterministic=deterministic, capacity=capacity)

    wi = self.param("wi", nn.with_logical_partitioning(_expert_init(1, (2, 3)),
                                                       ("expert", "embed", None, "mlp")),
                    (self.num_experts, embed, 2, self.expert_dim), self.param_dtype)
    wo = self.param("wo", nn.with_logical_partitioning(_expert_init(1, 2),
                                                       ("expert", "mlp", "embed")),
                    (self.num_experts, self.expert_dim, embed), self.param_dtype)
    wi, wo = wi.astype(self.dtype), wo.astype(self.dtype)
    act = activation(self.activation)
    execution = "capacity" if self.routing == "expert_choice" else self.dispatch

    if expert_axis_size(self.expert_axis) > 1:
      y, info = expert_parallel_moe(
          tokens, routing, wi, wo, act, axis=self.expert_axis,
          execution="dropless" if self.routing == "expert_choice" else self.dispatch,
          capacity_factor=factor, drop_policy=self.drop_policy, impl=self.impl,
          block_size=self.block_size)
    else:
      y, info = dispatch_lib.moe_forward(
          tokens, routing, wi, wo, act, execution=execution, capacity=capacity,
          drop_policy=self.drop_policy, impl=self.impl, block_size=self.block_size)
    y = y.reshape(batch, seq, embed)

    if self.num_shared_experts:
      width = self.num_shared_experts * (self.shared_expert_dim or self.expert_dim)
      y = y + GatedMLP(hidden_dim=width, activation=self.activation, dtype=self.dtype,
                       param_dtype=self.param_dtype, name="shared_experts")(x)

    lb = routers.load_balance_loss(routing)
    z = routers.router_z_loss(routing.logits)
    if self.load_balance_coef > 0:
      self.sow("aux_loss", "load_balance_loss", self.load_balance_coef * lb)
    if self.z_loss_coef > 0:
      self.sow("aux_loss", "router_z_loss", self.z_loss_coef * z)
    self.sow("metrics", "expert_load", jax.lax.stop_gradient(routers.expert_load(routing)))
    self.sow("metrics", "drop_rate", jax.lax.stop_gradient(info.drop_rate))
    self.sow("metrics", "load_balance_unscaled", jax.lax.stop_gradient(lb))
    self.sow("metrics", "router_z_unscaled", jax.lax.stop_gradient(z))
    self.sow("metrics", "router_entropy",
             jax.lax.stop_gradient(routers.router_entropy(routing.probs)))
    return y.astype(self.dtype)
