"""effx/moe: mixture-of-experts FFNs (routers, dispatch, expert parallelism, the layer)."""

from effx.moe.dispatch import (DispatchInfo, compute_capacity, grouped_matmul, moe_forward)
from effx.moe.layer import MoEFeedForward
from effx.moe.parallel import expert_parallel_moe
from effx.moe.routers import (Router, Routing, expert_bias_update, expert_choice_routing,
                              expert_load, load_balance_loss, router_entropy, router_z_loss,
                              top_k_routing, update_moe_state)

__all__ = ["DispatchInfo", "MoEFeedForward", "Router", "Routing", "compute_capacity",
           "expert_bias_update", "expert_choice_routing", "expert_load", "expert_parallel_moe",
           "grouped_matmul", "load_balance_loss", "moe_forward", "router_entropy",
           "router_z_loss", "top_k_routing", "update_moe_state"]
