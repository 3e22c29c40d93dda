"""MoE routers: token-choice top-k, expert choice, aux-loss-free balancing, router losses.

All router math runs in float32 whatever the compute dtype. A router maps tokens `x [T, embed]`
to a `Routing`: which experts each token's k slots go to, with which combine weights.

Token choice (Switch k=1, GShard k=2):
  * "softmax_topk": p = softmax(logits); the k largest p are chosen; gates = those p, divided by
    their sum when `renormalize` (then they sum to 1).
  * "topk_softmax": the k largest logits are chosen; gates = softmax over those k logits (they
    always sum to 1; `renormalize` has nothing left to do).
Expert choice (Zhou et al. 2022): p = softmax(logits) per token; every expert takes the
  `capacity` tokens with the largest p for it; gates = p. A token gets 0..E experts, so the
  `Routing` has one slot per expert (`k = E`) and `mask` says which slots were taken. A token's
  routing depends on other tokens of the batch (also later ones): non-causal.
Aux-loss-free balancing (DeepSeek-V3): a per-expert bias `b` (variable collection "moe_state",
  not a parameter) is added to the scores used to *select* the top-k ("softmax_topk": to p,
  "topk_softmax": to the logits); gates are computed from the unbiased scores. After a step,
  `b_i += u * sign(mean_j load_j - load_i)` (`expert_bias_update`), outside the gradient.

Losses (plain values; the layer multiplies them by its coefficients):
  * `load_balance_loss` (Switch): E * sum_i f_i P_i with f_i = (number of the T*k slots routed
    to expert i) / (T*k) (all k slots counted, before capacity drops, over the whole batch) and
    P_i = mean_t p_{t,i}. Equals 1 for perfectly uniform routing, E when collapsed to one expert.
  * `router_z_loss`: mean_t (logsumexp_i logits_{t,i})^2.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

ROUTINGS = ("softmax_topk", "topk_softmax", "expert_choice")


@flax.struct.dataclass
class Routing:
  """A routing decision for T tokens, k slots each.

  Attributes:
    expert_index: int32 [T, k] expert of each slot.
    gates: float32 [T, k] combine weight of each slot (0 where `mask` is False).
    mask: bool [T, k] slot in use (all True for token choice; expert choice and padding tokens
      use it).
    probs: float32 [T, E] router probabilities softmax(logits) (for losses and metrics).
    logits: float32 [T, E] router logits.
  """

  expert_index: jax.Array
  gates: jax.Array
  mask: jax.Array
  probs: jax.Array
  logits: jax.Array

  @property
  def num_experts(self) -> int:
    return self.probs.shape[-1]


# ------------------------------------------------------------------------------------------
# Pure routing functions.


def top_k_routing(logits: jax.Array, k: int, *, mode: str = "softmax_topk",
                  renormalize: bool = True, bias: jax.Array | None = None) -> Routing:
  """Token-choice top-k. logits: [T, E] -> Routing with k slots (see module docstring).

  `bias` ([E], optional) is added to the selection scores only.
  """
  logits = logits.astype(jnp.float32)
  probs = jax.nn.softmax(logits, axis=-1)
  if mode == "softmax_topk":
    scores = probs if bias is None else probs + jax.lax.stop_gradient(bias)
    _, index = jax.lax.top_k(scores, k)
    gates = jnp.take_along_axis(probs, index, axis=-1)
    if renormalize:
      gates = gates / jnp.maximum(jnp.sum(gates, axis=-1, keepdims=True), 1e-9)
  elif mode == "topk_softmax":
    scores = logits if bias is None else logits + jax.lax.stop_gradient(bias)
    _, index = jax.lax.top_k(scores, k)
    gates = jax.nn.softmax(jnp.take_along_axis(logits, index, axis=-1), axis=-1)
  else:
    raise ValueError(f"top_k_routing.mode: got {mode!r}; allowed: 'softmax_topk', "
                     "'topk_softmax'")
  return Routing(expert_index=index.astype(jnp.int32), gates=gates,
                 mask=jnp.ones(index.shape, bool), probs=probs, logits=logits)


def expert_choice_routing(logits: jax.Array, capacity: int) -> Routing:
  """Expert choice: each expert takes its `capacity` highest-probability tokens.

  logits: [T, E] -> Routing with E slots per token (slot e = expert e; `mask` = chosen).
  """
  logits = logits.astype(jnp.float32)
  num_tokens, num_experts = logits.shape
  capacity = min(capacity, num_tokens)
  probs = jax.nn.softmax(logits, axis=-1)
  _, token_index = jax.lax.top_k(probs.T, capacity)  # [E, C]
  chosen = jnp.zeros((num_experts, num_tokens), bool).at[
      jnp.arange(num_experts)[:, None], token_index].set(True).T  # [T, E]
  index = jnp.broadcast_to(jnp.arange(num_experts, dtype=jnp.int32), (num_tokens, num_experts))
  return Routing(expert_index=index, gates=jnp.where(chosen, probs, 0.0), mask=chosen,
                 probs=probs, logits=logits)


# ------------------------------------------------------------------------------------------
# Losses and metrics (float32 scalars / vectors).


def expert_counts(routing: Routing) -> jax.Array:
  """float32 [E]: number of used slots routed to each expert (before capacity drops)."""
  onehot = jax.nn.one_hot(routing.expert_index, routing.num_experts, dtype=jnp.float32)
  return jnp.sum(onehot * routing.mask[..., None], axis=(0, 1))


def expert_load(routing: Routing) -> jax.Array:
  """float32 [E]: fraction of the used slots routed to each expert (sums to 1)."""
  counts = expert_counts(routing)
  return counts / jnp.maximum(jnp.sum(counts), 1.0)


def load_balance_loss(routing: Routing) -> jax.Array:
  """Switch load-balance loss E * sum_i f_i P_i (f over all used slots; 1 when uniform).

  Only P_i carries a gradient (f_i comes from a discrete choice).
  """
  f = jax.lax.stop_gradient(expert_load(routing))
  p = jnp.mean(routing.probs, axis=0)
  return routing.num_experts * jnp.sum(f * p)


def router_z_loss(logits: jax.Array) -> jax.Array:
  """mean_t (logsumexp_i logits[t, i])^2. logits: [T, E]."""
  z = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
  return jnp.mean(jnp.square(z))


def router_entropy(probs: jax.Array) -> jax.Array:
  """Mean over tokens of the entropy of the router distribution (nats). probs: [T, E]."""
  return jnp.mean(-jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-30)), axis=-1))


# ------------------------------------------------------------------------------------------
# Aux-loss-free balancing: the bias update, outside the gradient.


def expert_bias_update(bias: jax.Array, load: jax.Array, rate: float) -> jax.Array:
  """DeepSeek-V3 update `bias + rate * sign(mean(load) - load)` over the last axis.

  bias, load: [..., E] (a leading "layers" axis from scanned layers is fine); load may be
  counts or fractions. Overloaded experts get a lower bias, underloaded ones a higher one.
  """
  load = jax.lax.stop_gradient(load.astype(jnp.float32))
  step = jnp.sign(jnp.mean(load, axis=-1, keepdims=True) - load)
  return (bias + rate * step).astype(bias.dtype)


def update_moe_state(moe_state: Mapping[str, Any], rate: float) -> Any:
  """Applies `expert_bias_update` to every router in a "moe_state" collection.

  Every sub-dict holding both "expert_bias" and "expert_load" (what `Router` keeps when
  `bias_balancing`; "expert_load" is the last forward's per-expert slot counts) gets
  `expert_bias <- expert_bias_update(expert_bias, expert_load, rate)`. Pure and jit-able; a
  train step calls it on the "moe_state" returned by `apply(..., mutable=[..., "moe_state"])`:

      out, state = model.apply({"params": p, **model_state}, x, mutable=[..., "moe_state"])
      model_state = {"moe_state": update_moe_state(state["moe_state"], rate=1e-3)}

  (Or set `MoEFeedForward.bias_update_rate` and the forward applies the same update itself.)
  """

  def walk(node: Any) -> Any:
    if isinstance(node, Mapping):
      node = dict(node)
      if "expert_bias" in node and "expert_load" in node:
        node["expert_bias"] = expert_bias_update(node["expert_bias"], node["expert_load"], rate)
      return {k: walk(v) if isinstance(v, Mapping) else v for k, v in node.items()}
    return node

  return walk(moe_state)


# ------------------------------------------------------------------------------------------
# The router module.


class Router(nn.Module):
  """Linear router `logits = x W` (float32) + a routing rule.

  Call: `router(x [T, embed], *, deterministic=True, capacity=None) -> Routing`.
  `capacity` (tokens per expert) is required for "expert_choice".

  Attributes:
    num_experts: E.
    top_k: k (token choice); for expert choice the slots are E and k only sets the capacity.
    routing: one of ROUTINGS.
    renormalize: "softmax_topk": divide the k gates by their sum.
    jitter: multiplicative input noise x * U(1 - jitter, 1 + jitter) (Switch) when
      `deterministic=False`; draws from the "router" rng stream.
    bias_balancing: aux-loss-free balancing bias in collection "moe_state" (also keeps
      "expert_load", the last batch's slot counts, when the collection is mutable).
    bias_update_rate: when > 0 and "moe_state" is mutable (not at init), the forward itself
      applies `expert_bias_update` with this rate after routing.
    param_dtype: dtype of the router kernel (the math is float32 regardless).
    kernel_init: initialiser of the [embed, E] kernel.
  """

  num_experts: int
  top_k: int
  routing: str = "softmax_topk"
  renormalize: bool = True
  jitter: float = 0.0
  bias_balancing: bool = False
  bias_update_rate: float = 0.0
  param_dtype: jnp.dtype = jnp.float32
  kernel_init: Callable[..., jax.Array] = nn.initializers.normal(stddev=0.02)

  def __post_init__(self):
    if self.routing not in ROUTINGS:
      raise ValueError(f"Router.routing: got {self.routing!r}; allowed: {ROUTINGS}")
    if self.num_experts < 1:
      raise ValueError(f"Router.num_experts: got {self.num_experts}; must be >= 1")
    if not 1 <= self.top_k <= self.num_experts:
      raise ValueError(f"Router.top_k: got {self.top_k}; must be in [1, num_experts="
                       f"{self.num_experts}]")
    if self.jitter < 0:
      raise ValueError(f"Router.jitter: got {self.jitter}; must be >= 0")
    if self.bias_balancing and self.routing == "expert_choice":
      raise ValueError("Router.bias_balancing: got True with routing='expert_choice'; allowed "
                       "only with token-choice routings (expert choice is balanced already)")
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, *, deterministic: bool = True,
               capacity: int | None = None) -> Routing:
    x = x.astype(jnp.float32)
    if self.jitter > 0 and not deterministic:
      x = x * jax.random.uniform(self.make_rng("router"), x.shape, jnp.float32,
                                 1.0 - self.jitter, 1.0 + self.jitter)
    kernel = self.param("kernel", nn.with_logical_partitioning(self.kernel_init, ("embed", None)),
                        (x.shape[-1], self.num_experts), self.param_dtype)
    logits = jnp.dot(x, kernel.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    if self.routing == "expert_choice":
      if capacity is None:
        raise ValueError("Router.capacity: got None; expert_choice routing needs a capacity")
      return expert_choice_routing(logits, capacity)
    bias = None
    if self.bias_balancing:
      bias_var = self.variable("moe_state", "expert_bias", jnp.zeros, (self.num_experts,),
                               jnp.float32)
      load_var = self.variable("moe_state", "expert_load", jnp.zeros, (self.num_experts,),
                               jnp.float32)
      bias = bias_var.value
    routing = top_k_routing(logits, self.top_k, mode=self.routing,
                            renormalize=self.renormalize, bias=bias)
    if (self.bias_balancing and self.is_mutable_collection("moe_state")
        and not self.is_initializing()):
      counts = jax.lax.stop_gradient(expert_counts(routing))
      load_var.value = counts
      if self.bias_update_rate > 0:
        bias_var.value = expert_bias_update(bias_var.value, counts, self.bias_update_rate)
    return routing
