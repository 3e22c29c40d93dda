"""Mixture-of-head attention (MoH, Jin et al. 2024) behind the one attention interface.

Multi-head attention is a sum over heads, `y = sum_i H_i W_O^i`; MoH gates it per token,
`y = sum_i g_i H_i W_O^i`, with `g_i = 0` for heads the token did not select. The first
`num_shared_heads` heads are always active; of the remaining `E = num_heads - num_shared_heads`
routed heads each token activates its `top_k`. Gates (router math in float32, `x` the token):

    [a_s, a_r] = 2 * softmax(W_h x)                        two-stage weights between the groups
    g_i        = a_s * h_s * softmax(W_s x)_i              shared head i   (i < h_s)
    p          = softmax(W_r x)  or  sigmoid(W_r x)        routed scores   (`router_fn`)
    g_{h_s+j}  = a_r * K * p_j m_j / sum_l p_l m_l          routed head j, m = top-K mask of W_r x

so uniform router logits give every active head the gate 1 and MoH reduces to the plain sum
of MultiHeadAttention. With only one group (`h_s = 0` or `h_s = num_heads`) there is no W_h and
its weight is 1; with `h_s = 1` there is no W_s (a softmax over one head is 1). As in the paper
the routed gates are renormalised over the top-K, so with K = 1 the routed gate is `a_r` whatever
the scores and W_r learns only from the balance loss. `routing="all"` has no router at all:
every head active with gate 1, i.e. exactly MultiHeadAttention with the same weights.

Load balance over the routed heads (sown as `aux_loss/moh_balance`, already multiplied by
`balance_coef`): `E * sum_j f_j P_j`, `f_j` = fraction of tokens that selected routed head j,
`P_j` = mean over tokens of the router distribution `p / sum(p)` (= p for softmax). Tokens with
`segment_ids == 0` (padding) are left out of both means. Perfect balance gives `K`.
Metrics: `metrics/active_head_fraction` (mean over tokens of active heads / num_heads, always
`(h_s + K) / num_heads`) and `metrics/head_load` float32 [num_heads] (fraction of tokens that
use each head; 1 for shared heads).

Implementations (`impl`):
* "xla" (the reference), "cudnn", "blockwise": dense, exactly MultiHeadAttention's
  paths: every head is computed, then multiplied by its gate (0 for inactive heads) before the
  output projection. No compute is saved.
* "pallas": without a cache and with a plain causal mask, the head-sparse flash kernel
  (`effx.pallas_kernels.moh_attention`): a (query block of `block_q` tokens, head) pair is
  computed only if some token of the block selected the head (run-time activity map, skipped
  in the forward and backward kernels), and the head outputs are multiplied by the gates.
  Other masks and the cached call patterns use MultiHeadAttention's dense "pallas" path.
* "head_sparse": only the (token, active head) pairs are computed. The B*T*(h_s + K) pairs are
  sorted by (batch row, head), as dropless MoE sorts tokens by expert, and laid out in blocks
  of `block_q` rows that share one head (each head's run padded to a multiple of `block_q`;
  a static bound on the block count keeps shapes static). Per block: the query projection uses
  only that head's slice of W_Q, attention reads that head's keys/values ([S, head_dim]), the
  gate multiplies the head output and that head's slice of W_O projects it; the rows are then
  summed back per token. Query-side work (q projection, logits, softmax, PV, output
  projection) is proportional to `(h_s + K) / num_heads` plus at most one padded block per
  (row, head). Keys and values are projected for every KV head (all are needed by some query).
  Causal work is skipped too, exactly for any mask (run-time checks): schedule "loop" (CPU)
  runs the blocks one after another (`lax.map`), skips blocks without a real row and lets
  each block stop at the first of <= 8 static key lengths covering its allowed keys;
  "batched" (GPU/TPU) runs all blocks of a `query_chunk`-token chunk at once, reading the keys
  up to the chunk's end and the later ones only if the chunk's mask allows one.
  Serves all three call patterns (sequence, decode, tree verification).
"""

from __future__ import annotations

from typing import Callable, ClassVar, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from effx.attention import masks as masks_lib
from effx.attention.dot_product import dot_product_attention
from effx.attention.kv_cache import KVCache
from effx.attention.mha import IMPLS as MHA_IMPLS
from effx.attention.mha import MultiHeadAttention
from effx.layers.initializers import fan_in_normal, partitioned
from effx.layers.rotary import RotaryConfig, apply_rotary

IMPLS = MHA_IMPLS + ("head_sparse",)
ROUTINGS = ("topk", "all")
ROUTER_FNS = ("softmax", "sigmoid")
SCHEDULES = ("auto", "loop", "batched")


class HeadRouting(NamedTuple):
  """Which heads each token uses and with which gate (float32).

  heads: int32 [batch, T, A] active head indices, A = h_s + K (shared heads first).
  head_gates: float32 [batch, T, A] the gate of each active head.
  router_probs: float32 [batch, T, E] routed-head scores p (softmax or sigmoid), or None.
  routed_mask: bool [batch, T, E] top-K selection among routed heads, or None.
  """

  heads: jax.Array
  head_gates: jax.Array
  router_probs: jax.Array | None
  routed_mask: jax.Array | None

  def dense_gates(self, num_heads: int) -> jax.Array:
    """float32 [batch, T, num_heads]: the gate of every head, 0 where inactive."""
    one_hot = jax.nn.one_hot(self.heads, num_heads, dtype=jnp.float32)  # [b, t, A, H]
    return jnp.einsum("btah,bta->bth", one_hot, self.head_gates)


def route_heads(x: jax.Array, w_shared: jax.Array | None, w_routed: jax.Array | None,
                w_groups: jax.Array | None, top_k: int, router_fn: str = "softmax",
                num_shared: int | None = None) -> HeadRouting:
  """MoH gates (module docstring) in float32.

  Args:
    x: [batch, T, embed] tokens (cast to float32).
    w_shared: [embed, h_s] W_s, or None: then `num_shared` heads get h_s * softmax = 1.
    w_routed: [embed, E] W_r, or None when there are no routed heads.
    w_groups: [embed, 2] W_h, or None (then both group weights are 1); ignored unless both
      groups exist.
    top_k: K, routed heads per token (1 <= K <= E).
    router_fn: "softmax" or "sigmoid" scores p over the routed heads.
    num_shared: h_s (default: w_shared's width, 0 without w_shared).

  Returns:
    HeadRouting with heads ordered shared (0..h_s-1) then the routed picks (h_s + index).
  """
  x = x.astype(jnp.float32)
  batch, t = x.shape[:2]
  heads, gates = [], []
  probs = routed_mask = None
  if num_shared is None:
    num_shared = 0 if w_shared is None else w_shared.shape[1]
  alpha = None
  if num_shared and w_routed is not None and w_groups is not None:
    alpha = 2.0 * jax.nn.softmax(x @ w_groups.astype(jnp.float32), axis=-1)  # [b, t, 2]
  if num_shared:
    if w_shared is None:
      shared = jnp.ones((batch, t, num_shared), jnp.float32)
    else:
      shared = num_shared * jax.nn.softmax(x @ w_shared.astype(jnp.float32), axis=-1)
    if alpha is not None:
      shared = shared * alpha[..., :1]
    heads.append(jnp.broadcast_to(jnp.arange(num_shared, dtype=jnp.int32),
                                  (batch, t, num_shared)))
    gates.append(shared)
  if w_routed is not None:
    logits = x @ w_routed.astype(jnp.float32)  # [b, t, E]
    probs = jax.nn.softmax(logits, axis=-1) if router_fn == "softmax" else jax.nn.sigmoid(logits)
    _, top = jax.lax.top_k(logits, top_k)  # monotone scores: top-K of logits = top-K of p
    picked = jnp.take_along_axis(probs, top, axis=-1)
    routed = top_k * picked / jnp.sum(picked, axis=-1, keepdims=True)
    if alpha is not None:
      routed = routed * alpha[..., 1:]
    routed_mask = jnp.any(top[..., None] == jnp.arange(logits.shape[-1]), axis=-2)
    heads.append(num_shared + top.astype(jnp.int32))
    gates.append(routed)
  return HeadRouting(jnp.concatenate(heads, -1), jnp.concatenate(gates, -1), probs, routed_mask)


def balance_loss(router_probs: jax.Array, routed_mask: jax.Array,
                 token_weights: jax.Array | None = None) -> jax.Array:
  """`E * sum_j f_j P_j` over routed heads (float32 scalar, without the coefficient).

  Args:
    router_probs: [batch, T, E] scores p; P_j is the weighted mean of p_j / sum_l p_l.
    routed_mask: bool [batch, T, E] selections; f_j is the weighted mean of the mask.
    token_weights: [batch, T] (e.g. 1 for real tokens, 0 for padding); None = all ones.
  """
  num_routed = router_probs.shape[-1]
  w = (jnp.ones(router_probs.shape[:2], jnp.float32) if token_weights is None
       else token_weights.astype(jnp.float32))
  total = jnp.maximum(jnp.sum(w), 1.0)
  dist = router_probs / jnp.sum(router_probs, axis=-1, keepdims=True)
  f = jnp.einsum("bt,bte->e", w, routed_mask.astype(jnp.float32)) / total
  p = jnp.einsum("bt,bte->e", w, dist.astype(jnp.float32)) / total
  return num_routed * jnp.sum(f * p)


class PairBlocks(NamedTuple):
  """(token, head) pairs laid out in blocks of rows that share one (batch row, head).

  For B*T*A pairs (pair p = ((b * T) + t) * A + a) and NB blocks of `block` rows:
  block_batch, block_head: int32 [NB]; row_pair: int32 [NB * block] the pair in each row (n =
  B*T*A for padding rows); row_valid: bool [NB * block]; pair_row: int32 [n] the row of each pair.
  """

  block_batch: jax.Array
  block_head: jax.Array
  row_pair: jax.Array
  row_valid: jax.Array
  pair_row: jax.Array


def num_pair_blocks(num_pairs: int, num_groups: int, block: int) -> int:
  """Static bound on sum_g ceil(n_g / block) over groups with sum n_g = num_pairs."""
  return (num_pairs + min(num_groups, num_pairs) * (block - 1)) // block


def pair_blocks(heads: jax.Array, num_heads: int, block: int) -> PairBlocks:
  """Sorts the pairs of `heads` int32 [batch, T, A] by (batch row, head) into `block`-row blocks.

  Each (row, head) run keeps token order and is padded to a multiple of `block`.
  """
  batch, t, a = heads.shape
  n = batch * t * a
  num_groups = batch * num_heads
  nb = num_pair_blocks(n, num_groups, block)
  group = (jnp.arange(batch, dtype=jnp.int32)[:, None, None] * num_heads + heads).reshape(n)
  order = jnp.argsort(group, stable=True).astype(jnp.int32)
  sorted_group = group[order]
  counts = jnp.bincount(group, length=num_groups).astype(jnp.int32)
  pair_start = jnp.cumsum(counts) - counts
  group_blocks = (counts + block - 1) // block
  block_start = jnp.cumsum(group_blocks) - group_blocks
  rows = block_start[sorted_group] * block + jnp.arange(n, dtype=jnp.int32) - pair_start[
      sorted_group]
  row_pair = jnp.full((nb * block,), n, jnp.int32).at[rows].set(order, unique_indices=True)
  pair_row = jnp.zeros((n,), jnp.int32).at[order].set(rows, unique_indices=True)
  block_group = jnp.zeros((nb,), jnp.int32).at[rows // block].set(sorted_group)
  return PairBlocks(block_batch=block_group // num_heads, block_head=block_group % num_heads,
                    row_pair=row_pair, row_valid=row_pair < n, pair_row=pair_row)


def head_sparse_attention(
    x: jax.Array, positions: jax.Array, routing: HeadRouting, q_kernel: jax.Array,
    q_bias: jax.Array | None, k: jax.Array, v: jax.Array, out_kernel: jax.Array,
    allowed_rows: Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array], *,
    rotary: RotaryConfig, block_q: int = 128, schedule: str = "loop", key_block: int = 128,
    query_chunk: int | None = None, logit_soft_cap: float | None = None,
    dtype: jnp.dtype = jnp.float32) -> jax.Array:
  """sum over active heads i of g_i H_i W_O^i, computing only the active (token, head) pairs.

  Args:
    x: [batch, T, embed] new tokens; positions: int32 [batch, T].
    routing: active heads and gates per token (A = heads.shape[-1]).
    q_kernel: [embed, heads, head_dim] W_Q; q_bias: [heads, head_dim] or None.
    k, v: [batch, S, kv_heads, head_dim] every key/value the tokens may read (rotary applied).
    out_kernel: [heads, head_dim, embed] W_O.
    allowed_rows: f(batch_idx [NB, R], token_idx [NB, R], block_batch [NB], block_head [NB])
      -> bool [NB, R, S]: which of the S keys each row (token `token_idx` under the block's
      head) may read.
    rotary: rotary config for the queries; block_q: rows per block (capped at T).
    schedule: "loop" (`lax.map` over blocks: a block with no real row is skipped, and a block
      reads only the keys up to its last allowed one, rounded up to `key_block`-multiples
      (at most 8 lengths) through `lax.switch`; `jax.checkpoint`-ed, so the backward keeps
      O(block) residuals; best on CPU) or "batched" (all blocks of a chunk at once; for
      GPU/TPU). Both are exact for any mask.
    key_block: "loop": granularity of the key lengths a block may stop at (>= S/8).
    query_chunk: "batched": None (one chunk), or the tokens are processed in chunks of this
      many, chunk [lo, hi) reading keys [0, hi) and the keys >= hi only when `allowed_rows`
      permits one of them (`lax.cond`): causal self-attention (S = T) does about half the work.
    logit_soft_cap, dtype: as in MultiHeadAttention.

  Returns:
    [batch, T, embed] in `dtype`.
  """
  t = x.shape[1]
  if schedule == "loop":
    return _head_sparse_chunk(x, positions, routing, q_kernel, q_bias, k, v, out_kernel,
                              allowed_rows, 0, t, prefix=None, loop_key_block=key_block,
                              rotary=rotary, block_q=block_q, logit_soft_cap=logit_soft_cap,
                              dtype=dtype)
  step = t if query_chunk is None else query_chunk
  return jnp.concatenate([
      _head_sparse_chunk(x, positions, routing, q_kernel, q_bias, k, v, out_kernel, allowed_rows,
                         lo, min(lo + step, t), prefix=min(lo + step, t), loop_key_block=None,
                         rotary=rotary, block_q=block_q, logit_soft_cap=logit_soft_cap,
                         dtype=dtype)
      for lo in range(0, t, step)], axis=1)


def _key_lengths(s: int, key_block: int, max_lengths: int = 8) -> list[int]:
  """Static key prefix lengths a "loop" block may stop at (ascending, the last is s)."""
  step = max(key_block, -(-s // max_lengths))
  return sorted({min(s, j * step) for j in range(1, -(-s // step) + 1)})


def _head_sparse_chunk(x, positions, routing, q_kernel, q_bias, k, v, out_kernel, allowed_rows,
                       lo, hi, *, prefix, loop_key_block, rotary, block_q, logit_soft_cap, dtype):
  """head_sparse_attention for tokens [lo, hi): "loop" if loop_key_block else "batched"."""
  batch, _, embed = x.shape
  t = hi - lo
  num_heads, head_dim = q_kernel.shape[1:]
  kv_heads, s = k.shape[2], k.shape[1]
  a = routing.heads.shape[-1]
  rows = max(1, min(block_q, t))
  lay = pair_blocks(routing.heads[:, lo:hi], num_heads, rows)
  nb = lay.block_head.shape[0]
  n = batch * t * a
  pair = jnp.minimum(lay.row_pair, n - 1)
  token = pair // a  # [NB * R] flat (b * t + local token)
  b_idx = (token // t).reshape(nb, rows)
  t_idx = (token % t).reshape(nb, rows) + lo
  valid = lay.row_valid.reshape(nb, rows)
  gate = jnp.where(lay.row_valid, routing.head_gates[:, lo:hi].reshape(n)[pair], 0.0)
  gate = gate.reshape(nb, rows)
  kv_index = lay.block_batch * kv_heads + lay.block_head // (num_heads // kv_heads)
  k_heads = jnp.swapaxes(k, 1, 2).reshape(batch * kv_heads, s, head_dim)
  v_heads = jnp.swapaxes(v, 1, 2).reshape(batch * kv_heads, s, head_dim)
  w_q = jnp.moveaxis(q_kernel, 1, 0)  # [heads, embed, head_dim]

  def blocks(b_idx, t_idx, block_batch, block_head, kv_index, gate, valid, lengths):
    """[NB', R] rows of NB' blocks -> float32 [NB', R, embed] gated, W_O-projected outputs."""
    q = jnp.einsum("nre,ned->nrd", x[b_idx, t_idx].astype(dtype), w_q[block_head].astype(dtype))
    if q_bias is not None:
      q = q + q_bias[block_head][:, None].astype(dtype)
    q = apply_rotary(q[:, :, None], positions[b_idx, t_idx], rotary)  # [NB', R, 1, D]
    allowed = allowed_rows(b_idx, t_idx, block_batch, block_head) & valid[..., None]

    def attend(num_keys):
      def run():
        def per_head(u):  # -> [NB', num_keys, 1, D]
          return u[kv_index, :num_keys][:, :, None].astype(q.dtype)
        return dot_product_attention(q, per_head(k_heads), per_head(v_heads),
                                     allowed[:, None, :, :num_keys],
                                     logit_soft_cap=logit_soft_cap)
      return run

    if len(lengths) == 1:
      out = attend(lengths[0])()
    elif len(lengths) == 2:  # "batched": keys [0, prefix), and the rest only if allowed
      out = jax.lax.cond(jnp.any(allowed[..., lengths[0]:]), attend(lengths[1]),
                         attend(lengths[0]))
    else:  # "loop" (one block): stop at the first static length covering its allowed keys
      last = jnp.max(jnp.where(allowed, jnp.arange(s), -1))
      which = jnp.searchsorted(jnp.asarray(lengths), last + 1)
      out = jax.lax.switch(jnp.minimum(which, len(lengths) - 1), [attend(m) for m in lengths])
    out = (out[:, :, 0].astype(jnp.float32) * gate[..., None]).astype(dtype)
    return jnp.einsum("nrd,nde->nre", out, out_kernel[block_head].astype(dtype),
                      preferred_element_type=jnp.float32)

  per_block = (b_idx, t_idx, lay.block_batch, lay.block_head, kv_index, gate, valid)
  if loop_key_block is None:
    lengths = [s] if prefix is None or prefix >= s else [prefix, s]
    contrib = blocks(*per_block, lengths)
  else:
    lengths = _key_lengths(s, loop_key_block)
    one = jax.checkpoint(lambda *xs: blocks(*(u[None] for u in xs), lengths)[0])
    skip = lambda *xs: jnp.zeros((rows, embed), jnp.float32)  # noqa: E731
    contrib = jax.lax.map(lambda xs: jax.lax.cond(jnp.any(xs[-1]), one, skip, *xs), per_block)
  y = contrib.reshape(nb * rows, embed)[lay.pair_row].reshape(batch, t, a, embed)
  return jnp.sum(y, axis=2).astype(dtype)


class MixtureOfHeadsAttention(MultiHeadAttention):
  """Mixture-of-head attention: shared heads + top-K routed heads per token (module docstring).

  Call: `y, cache = attn(x, positions, segment_ids=None, cache=None, new_token_mask=None)`,
  exactly as MultiHeadAttention (same params `query/key/value/out_kernel` (+ biases), same
  KVCache, `init_cache(batch, max_len, embed_dim, dtype)`), plus router params
  `router_shared` [embed, h_s] (if h_s > 1), `router_routed` [embed, E] (if E > 0) and
  `router_groups` [embed, 2] (if both groups exist), all used in float32, and the sown
  `aux_loss/moh_balance`, `metrics/active_head_fraction`, `metrics/head_load`. Routing is per
  token, so every call pattern stays causal.

  Attributes (beyond MultiHeadAttention's num_heads, num_kv_heads, head_dim, mask, rotary,
    use_qkv_bias, logit_soft_cap, block_size, dtype, param_dtype):
    num_shared_heads: h_s, always-active heads (the first h_s heads), 0..num_heads.
    top_k: K routed heads per token, 1..E (None = max(1, E // 2)); unused when E = 0.
    routing: "topk" (MoH) or "all" (every head, gate 1: MultiHeadAttention; no router).
    router_fn: routed scores "softmax" (paper) or "sigmoid" before top-K renormalisation.
    balance_coef: coefficient of the load-balance loss (0 = not sown).
    impl: "head_sparse" (compute only active (token, head) pairs) or a dense path of
      MultiHeadAttention ("xla" reference, "cudnn", "blockwise", "pallas").
    block_q: rows per (row, head) block of "head_sparse" (capped at the chunk length); with
      impl="pallas", the kernel's query tile, i.e. the activity granularity (a multiple of 8).
    sparse_schedule: "head_sparse" block schedule: "loop" (blocks one after another, each
      skipping keys past its last allowed one; CPU), "batched" (all blocks at once; GPU/TPU),
      "auto" = "loop" on CPU, else "batched". See `head_sparse_attention`.
    sparse_key_block: "loop": key-length granularity a block may stop at (>= S / 8).
    query_chunk: "batched" without a cache processes the sequence in chunks of this many
      tokens; chunk [lo, hi) reads keys [0, hi) and the later keys only if its mask allows one
      (checked at run time, so exact for any positions): causal work about halves. None = one
      chunk. With a cache all T new tokens are one chunk.
  """

  num_shared_heads: int = 0
  top_k: int | None = None
  routing: str = "topk"
  router_fn: str = "softmax"
  balance_coef: float = 0.01
  block_q: int = 128
  sparse_schedule: str = "auto"
  sparse_key_block: int = 128
  query_chunk: int | None = 512

  _impls: ClassVar[tuple[str, ...]] = IMPLS

  def __post_init__(self):
    super().__post_init__()  # MultiHeadAttention's checks (num_heads, num_kv_heads, impl, ...)
    if not 0 <= self.num_shared_heads <= self.num_heads:
      raise ValueError(f"moh.num_shared_heads: got {self.num_shared_heads}; must be in "
                       f"[0, num_heads={self.num_heads}]")
    if self.routing not in ROUTINGS:
      raise ValueError(f"moh.routing: got {self.routing!r}; allowed: {list(ROUTINGS)}")
    if self.router_fn not in ROUTER_FNS:
      raise ValueError(f"moh.router_fn: got {self.router_fn!r}; allowed: {list(ROUTER_FNS)}")
    routed = self.num_heads - self.num_shared_heads
    if self.top_k is not None and routed and not 1 <= self.top_k <= routed:
      raise ValueError(f"moh.top_k: got {self.top_k}; must be in [1, routed heads={routed}] "
                       f"(num_heads - num_shared_heads)")
    if self.top_k is not None and not routed and self.top_k != 0:
      raise ValueError(f"moh.top_k: got {self.top_k}; must be 0 or None when every head is "
                       f"shared (num_shared_heads = num_heads = {self.num_heads})")
    if not self.balance_coef >= 0:
      raise ValueError(f"moh.balance_coef: got {self.balance_coef}; must be >= 0")
    if self.block_q < 1:
      raise ValueError(f"moh.block_q: got {self.block_q}; must be >= 1")
    if self.impl == "pallas" and self.block_q % 8:
      raise ValueError(f"moh.block_q: got {self.block_q}; must be a multiple of 8 with "
                       f"impl='pallas' (the kernel's query tile)")
    if self.sparse_schedule not in SCHEDULES:
      raise ValueError(f"moh.sparse_schedule: got {self.sparse_schedule!r}; allowed: "
                       f"{list(SCHEDULES)}")
    if self.sparse_key_block < 1:
      raise ValueError(f"moh.sparse_key_block: got {self.sparse_key_block}; must be >= 1")
    if self.query_chunk is not None and self.query_chunk < 1:
      raise ValueError(f"moh.query_chunk: got {self.query_chunk}; must be >= 1 or None")

  @property
  def num_routed_heads(self) -> int:
    return self.num_heads - self.num_shared_heads

  @property
  def resolved_top_k(self) -> int:
    """K, routed heads active per token (0 without routed heads)."""
    routed = self.num_routed_heads
    if not routed:
      return 0
    return max(1, routed // 2) if self.top_k is None else self.top_k

  @property
  def resolved_schedule(self) -> str:
    """The "head_sparse" block schedule: "loop" or "batched" ("auto": loop on CPU)."""
    if self.sparse_schedule != "auto":
      return self.sparse_schedule
    return "loop" if jax.default_backend() == "cpu" else "batched"

  @property
  def active_heads(self) -> int:
    """Heads active per token: h_s + K (num_heads for routing="all")."""
    if self.routing == "all":
      return self.num_heads
    return self.num_shared_heads + self.resolved_top_k

  def _router_param(self, name: str, embed_dim: int, width: int) -> jax.Array:
    return self.param(name, partitioned(fan_in_normal(), ("embed", None)), (embed_dim, width),
                      self.param_dtype)

  def _route(self, x: jax.Array, segment_ids: jax.Array | None) -> HeadRouting:
    """Router params, gates and the sown balance loss / metrics for tokens x [batch, T, embed]."""
    batch, t, embed = x.shape
    if self.routing == "all":
      every = jnp.arange(self.num_heads, dtype=jnp.int32)
      routing = HeadRouting(jnp.broadcast_to(every, (batch, t, self.num_heads)),
                            jnp.ones((batch, t, self.num_heads), jnp.float32), None, None)
    else:
      hs, e = self.num_shared_heads, self.num_routed_heads
      w_s = self._router_param("router_shared", embed, hs) if hs > 1 else None
      w_r = self._router_param("router_routed", embed, e) if e else None
      w_h = self._router_param("router_groups", embed, 2) if hs and e else None
      routing = route_heads(x, w_s, w_r, w_h, self.resolved_top_k, self.router_fn, hs)
    weights = (None if segment_ids is None else (segment_ids > 0).astype(jnp.float32))
    if routing.router_probs is not None and self.balance_coef > 0:
      self.sow("aux_loss", "moh_balance",
               self.balance_coef * balance_loss(routing.router_probs, routing.routed_mask, weights))
    w = jnp.ones((batch, t), jnp.float32) if weights is None else weights
    active = jax.nn.one_hot(routing.heads, self.num_heads, dtype=jnp.float32).sum(2)  # [b, t, H]
    load = jnp.einsum("bt,bth->h", w, active) / jnp.maximum(jnp.sum(w), 1.0)
    self.sow("metrics", "active_head_fraction", jnp.sum(load) / self.num_heads)
    self.sow("metrics", "head_load", load)
    return routing

  @nn.compact
  def __call__(self, x: jax.Array, positions: jax.Array, *, segment_ids: jax.Array | None = None,
               cache: KVCache | None = None, new_token_mask: jax.Array | None = None
               ) -> tuple[jax.Array, KVCache | None]:
    """x [batch, T, embed] (dtype), positions int32 [batch, T] -> (y [batch, T, embed], cache)."""
    self._check_inputs(x, positions)
    embed = x.shape[-1]
    head_dim = self.resolved_head_dim(embed)
    # Parameters are created in MultiHeadAttention's order (query, key, value, out), routers last.
    sparse = self.impl == "head_sparse"
    if sparse:
      q_kernel, q_bias = self._projection_params(embed, self.num_heads, "heads", "query")
    else:
      q = apply_rotary(self._project(x, self.num_heads, "heads", "query"), positions, self.rotary)
    k = apply_rotary(self._project(x, self.kv_heads, "kv_heads", "key"), positions, self.rotary)
    v = self._project(x, self.kv_heads, "kv_heads", "value")
    out_kernel = self._out_kernel(head_dim, embed)
    routing = self._route(x, segment_ids)

    kernel = (self.impl == "pallas" and cache is None
              and self._kernel_mask_args(x.shape[1]) == dict(causal=True, window=None))
    if kernel:  # head-sparse kernel: skips (query block, head) pairs no token selected
      from effx.pallas_kernels import moh_attention as moh_kernel
      gates = (routing.dense_gates(self.num_heads) if self.routing != "all"
               else jnp.ones(q.shape[:3], jnp.float32))
      blocks = moh_kernel.default_block_sizes("pallas", head_dim=head_dim)
      out = moh_kernel.moh_attention(
          q, k, v, gates, segment_ids=segment_ids, logit_soft_cap=self.logit_soft_cap,
          block_sizes=moh_kernel.BlockSizes(self.block_q, blocks.block_k), impl="pallas")
      y = jnp.einsum("bthd,hde->bte", out.astype(self.dtype), out_kernel.astype(self.dtype))
      return y, None
    if not sparse:
      if cache is None:
        out, new_cache = self._attend_sequence(q, k, v, positions, segment_ids), None
      else:
        out, new_cache = self._attend_cache(q, k, v, positions, cache, new_token_mask)
      if self.routing != "all":
        gates = routing.dense_gates(self.num_heads)[..., None]
        out = (out.astype(jnp.float32) * gates).astype(self.dtype)
      y = jnp.einsum("bthd,hde->bte", out.astype(self.dtype), out_kernel.astype(self.dtype))
      return y, new_cache

    if cache is None:
      new_cache, keys, values = None, k, v

      def allowed_rows(b_idx, t_idx, block_batch, block_head):
        q_pos, kv_pos = positions[b_idx, t_idx], positions[block_batch]
        allowed = self._head_rows(self.mask(q_pos, kv_pos), block_head)
        if segment_ids is not None:
          allowed = allowed & masks_lib.segment_mask(segment_ids[b_idx, t_idx],
                                                     segment_ids[block_batch])[:, 0]
        return allowed
    else:
      new_cache, full = self._append_to_cache(k, v, positions, cache, new_token_mask)
      keys, values = new_cache.k, new_cache.v

      def allowed_rows(b_idx, t_idx, block_batch, block_head):
        h = (0 if full.shape[1] == 1 else block_head[:, None])
        return full[b_idx, h, t_idx]

    y = head_sparse_attention(x, positions, routing, q_kernel, q_bias, keys, values, out_kernel,
                              allowed_rows, rotary=self.rotary, block_q=self.block_q,
                              schedule=self.resolved_schedule, key_block=self.sparse_key_block,
                              query_chunk=self.query_chunk if cache is None else None,
                              logit_soft_cap=self.logit_soft_cap, dtype=self.dtype)
    return y, new_cache

  @staticmethod
  def _head_rows(allowed: jax.Array, block_head: jax.Array) -> jax.Array:
    """bool [NB, 1 or heads, R, S] -> [NB, R, S] (the block's head for per-head masks)."""
    if allowed.shape[1] == 1:
      return allowed[:, 0]
    return jnp.take_along_axis(allowed, block_head[:, None, None, None], axis=1)[:, 0]
