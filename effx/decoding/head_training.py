"""Training draft heads on a frozen base model (Medusa-1 / Hydra / Hydra++ recipes).

Targets for head k at position t (it drafts x_{t+k+2}; the base model's logits at t+k+1 score
that same token):
  "data":      the corpus token x_{t+k+2} (ground truth);
  "self":      the base model's argmax at t+k+1 (self-distillation: learn the model, not the data);
  "teacher":   soft cross-entropy against the base model's distribution at t+k+1 (Hydra++).
Hydra heads are teacher-forced with the corpus tokens x_{t+1} .. x_{t+k+1} on their path.

Metrics per head: top-1 / top-k agreement with the base model's argmax (what greedy
verification accepts), and the acceptance table acc[k, r] = P(rank-r candidate == base argmax)
from which `effx.decoding.tree.optimal_tree` builds a tree; the expected accepted length of a
chain is Σ_k Π_{i<=k} acc[i, 0].
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from effx.decoding.heads import (HydraHeads, MedusaHeads, embedding_table,
                                 init_lm_heads_from_base, zero_prefix_branches)
from effx.decoding.proposers import HydraProposer, MedusaProposer
from effx.decoding.tree import DraftTree
from effx.model import DecoderLM

KINDS = ("medusa", "hydra", "hydra++")
TARGETS = ("data", "self", "teacher")


@dataclasses.dataclass(frozen=True)
class HeadTrainConfig:
  """Draft-head training settings.

  Attributes:
    kind: "medusa", "hydra" or "hydra++".
    num_heads: K drafted tokens beyond the base model's next token.
    num_blocks: residual blocks per head (Hydra++ uses 4).
    target: "data", "self" or "teacher" (see the module docstring).
    steps / learning_rate / warmup_steps / weight_decay: AdamW with cosine decay.
    dropout: dropout on Hydra head inputs (Hydra++: 0.2).
    top_k: candidates per head measured for the acceptance table (the tree's max rank + 1).
    time_budget_s: stop early after this many seconds, if set.
    seed: initialisation seed.
  """

  kind: str = "medusa"
  num_heads: int = 4
  num_blocks: int = 1
  target: str = "self"
  steps: int = 300
  learning_rate: float = 1e-3
  warmup_steps: int = 20
  weight_decay: float = 0.0
  dropout: float = 0.0
  top_k: int = 4
  time_budget_s: float | None = None
  seed: int = 0

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"heads.kind: got {self.kind!r}; allowed: {list(KINDS)}")
    if self.target not in TARGETS:
      raise ValueError(f"heads.target: got {self.target!r}; allowed: {list(TARGETS)}")
    for name in ("num_heads", "steps", "top_k"):
      if getattr(self, name) < 1:
        raise ValueError(f"heads.{name}: got {getattr(self, name)}; must be >= 1")


def make_heads(cfg: HeadTrainConfig, model: DecoderLM) -> MedusaHeads | HydraHeads:
  """The head module for `cfg.kind` sized to `model`."""
  common = dict(num_heads=cfg.num_heads, vocab_size=model.vocab_size, num_blocks=cfg.num_blocks,
                dtype=model.dtype, param_dtype=model.param_dtype)
  if cfg.kind == "medusa":
    return MedusaHeads(**common)
  return HydraHeads(embed_dim=model.embed_dim, prefix_layer=cfg.kind == "hydra++",
                    dropout=cfg.dropout, **common)


def make_proposer(heads: MedusaHeads | HydraHeads, tree: DraftTree):
  """The proposer that drafts `tree` with `heads`."""
  return MedusaProposer(heads, tree) if isinstance(heads, MedusaHeads) else HydraProposer(heads,
                                                                                        tree)


def proposer_params(heads: MedusaHeads | HydraHeads, head_params: dict, base_params: Any) -> dict:
  """What the proposer needs at decode time: head variables (+ embedding table for Hydra)."""
  if isinstance(heads, MedusaHeads):
    return {"heads": head_params["heads"]}
  return {**head_params, "embedding": embedding_table(base_params)}


def init_head_params(cfg: HeadTrainConfig, heads, base_params: Any, width: int,
                     key: jax.Array) -> dict:
  """Fresh head variables ({"heads": ..., "prefix": ... for Hydra++}): LM heads copied from the
  base, the prefix layer's residual branches zeroed (`zero_prefix_branches`)."""
  k1, k2 = jax.random.split(key)
  hidden = jnp.zeros((1, width))
  if isinstance(heads, MedusaHeads):
    variables = heads.init(k1, hidden)
  else:
    variables = heads.init(k1, hidden, jnp.zeros((1, cfg.num_heads, width)))
  params = {"heads": init_lm_heads_from_base(variables, base_params)}
  if isinstance(heads, HydraHeads) and heads.prefix_layer:
    prefix = heads.prefix_module(parent=None)
    params["prefix"] = zero_prefix_branches(prefix.init(k2, jnp.zeros((1, 2, width)),
                                                        jnp.zeros((1, 2), jnp.int32)))
  return params


def _future(x: jax.Array, shift: int, fill) -> jax.Array:
  """x[:, t + shift] at t (fill past the end). x: [batch, seq, ...]."""
  pad = jnp.full((x.shape[0], shift) + x.shape[2:], fill, x.dtype)
  return jnp.concatenate([x[:, shift:], pad], axis=1)


def head_outputs(heads, head_params, base_params_embedding, batch, base_out, *,
                 deterministic=True, rng=None):
  """Teacher-forced head logits [batch, seq, K, V] for every position of a batch."""
  hidden = base_out.hidden
  if isinstance(heads, MedusaHeads):
    return heads.apply(head_params["heads"], hidden)
  if heads.prefix_layer:
    prefix = heads.prefix_module(parent=None)
    hidden, _ = prefix.apply(head_params["prefix"], hidden, batch["positions"],
                             segment_ids=batch["segment_ids"])
  # path tokens of head k at t: x_{t+1} .. x_{t+k+1} = inputs[t+1 .. t+k+1]
  path = jnp.stack([_future(batch["inputs"], j + 1, 0) for j in range(heads.num_heads)], axis=2)
  path_emb = jnp.take(base_params_embedding, path, axis=0).astype(heads.dtype)
  rngs = None if rng is None else {"dropout": rng}
  return heads.apply(head_params["heads"], hidden, path_emb, deterministic=deterministic,
                     rngs=rngs)


def _targets(cfg: HeadTrainConfig, batch, base_out, num_heads: int):
  """Per head k: (hard target [B, L], soft target [B, L, V] or None, valid [B, L])."""
  base_pred = jnp.argmax(base_out.logits, axis=-1)
  probs = jax.nn.softmax(base_out.logits, axis=-1)
  out = []
  for k in range(num_heads):
    shift = k + 1  # head k at t scores x_{t+k+2}: targets[t+k+1], base logits at t+k+1
    same_doc = _future(batch["segment_ids"], shift, -1) == batch["segment_ids"]
    valid = (_future(batch["weights"], shift, 0) > 0) & same_doc
    data = _future(batch["targets"], shift, 0)
    base = _future(base_pred, shift, 0)
    hard = data if cfg.target == "data" else base
    soft = _future(probs, shift, 0.0) if cfg.target == "teacher" else None
    out.append((hard, soft, base, valid.astype(jnp.float32)))
  return out


class HeadTrainer:
  """Jitted training and evaluation of draft heads with the base model frozen."""

  def __init__(self, cfg: HeadTrainConfig, model: DecoderLM, base_variables: Any):
    self.cfg, self.model = cfg, model
    self.base_variables = base_variables
    self.embedding = embedding_table(base_variables["params"])
    self.heads = make_heads(cfg, model)
    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, cfg.warmup_steps,
                                                  max(cfg.steps, cfg.warmup_steps + 1),
                                                  cfg.learning_rate * 0.1)
    self.tx = optax.chain(optax.clip_by_global_norm(1.0),
                          optax.adamw(schedule, weight_decay=cfg.weight_decay))
    self._step = jax.jit(self._train_step, donate_argnums=(0, 1))
    self._eval = jax.jit(self._eval_step)

  def init(self) -> tuple[dict, Any]:
    params = init_head_params(self.cfg, self.heads, self.base_variables["params"],
                              self.model.embed_dim, jax.random.key(self.cfg.seed))
    return params, self.tx.init(params)

  def _base(self, batch):
    out = self.model.apply(self.base_variables, batch["inputs"], batch["positions"],
                           batch["segment_ids"])
    return jax.tree.map(jax.lax.stop_gradient, out)

  def _loss(self, params, batch, base_out, rng):
    logits = head_outputs(self.heads, params, self.embedding, batch, base_out,
                          deterministic=self.cfg.dropout == 0, rng=rng)
    total, per_head = 0.0, []
    for k, (hard, soft, _, valid) in enumerate(_targets(self.cfg, batch, base_out,
                                                        self.cfg.num_heads)):
      if soft is None:
        ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :, k], hard)
      else:
        ce = optax.softmax_cross_entropy(logits[:, :, k], soft)
      loss_k = jnp.sum(ce * valid) / jnp.maximum(jnp.sum(valid), 1.0)
      total, per_head = total + loss_k, per_head + [loss_k]
    return total, (logits, jnp.stack(per_head))

  def _train_step(self, params, opt_state, batch, step):
    base_out = self._base(batch)
    rng = jax.random.fold_in(jax.random.key(self.cfg.seed + 1), step)
    (loss, (_, per_head)), grads = jax.value_and_grad(self._loss, has_aux=True)(
        params, batch, base_out, rng)
    updates, opt_state = self.tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, per_head

  def _eval_step(self, params, batch):
    base_out = self._base(batch)
    logits = head_outputs(self.heads, params, self.embedding, batch, base_out)
    cand = jax.lax.top_k(logits, self.cfg.top_k)[1]  # [B, L, K, top_k]
    hits, counts = [], []
    for k, (_, _, base, valid) in enumerate(_targets(self.cfg, batch, base_out,
                                                     self.cfg.num_heads)):
      match = (cand[:, :, k] == base[..., None]).astype(jnp.float32)  # [B, L, top_k]
      hits.append(jnp.sum(match * valid[..., None], axis=(0, 1)))
      counts.append(jnp.sum(valid))
    return jnp.stack(hits), jnp.stack(counts)

  def evaluate(self, params, batches) -> dict:
    """Acceptance table acc[k, r] (rank-r candidate == base argmax), top-1/top-k, E[len]."""
    hits = counts = 0.0
    for batch in batches:
      h, c = jax.device_get(self._eval(params, batch))
      hits, counts = hits + h, counts + c
    acc = np.asarray(hits) / np.maximum(np.asarray(counts), 1.0)[:, None]  # [K, top_k]
    top1 = acc[:, 0]
    return dict(acceptance=acc, top1=top1.tolist(), topk=acc.sum(axis=1).tolist(),
                expected_accept_length=float(np.sum(np.cumprod(top1))))

  def fit(self, params, opt_state, batches: Iterator[dict], log=print, log_every: int = 50):
    """Runs `cfg.steps` steps (or until the time budget); returns (params, opt_state, steps)."""
    started, step = time.perf_counter(), 0
    while step < self.cfg.steps:
      batch = next(batches)
      params, opt_state, loss, per_head = self._step(params, opt_state, batch, step)
      step += 1
      if step % log_every == 0 or step == self.cfg.steps:
        loss = float(loss)
        if not np.isfinite(loss):
          raise FloatingPointError(f"heads: non-finite loss {loss} at step {step}")
        log(f"heads[{self.cfg.kind}] step {step}: loss {loss:.3f} per head "
            f"{np.round(np.asarray(per_head), 3).tolist()}")
      if self.cfg.time_budget_s and time.perf_counter() - started > self.cfg.time_budget_s:
        log(f"heads[{self.cfg.kind}]: time budget reached at step {step}")
        break
    return params, opt_state, step


def save_heads(directory: str, params: dict, report: dict) -> None:
  """Writes head parameters (orbax) and the evaluation report (JSON) under `directory`."""
  directory = os.path.abspath(directory)
  checkpointer = ocp.StandardCheckpointer()
  path = os.path.join(directory, "params")
  checkpointer.save(path, params, force=True)
  checkpointer.wait_until_finished()
  serializable = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in report.items()}
  with open(os.path.join(directory, "report.json"), "w") as f:
    json.dump(serializable, f, indent=2)


def load_heads(directory: str, abstract_params: dict) -> tuple[dict, dict]:
  """Reads what `save_heads` wrote: (params, report)."""
  directory = os.path.abspath(directory)
  params = ocp.StandardCheckpointer().restore(os.path.join(directory, "params"), abstract_params)
  with open(os.path.join(directory, "report.json")) as f:
    report = json.load(f)
  report["acceptance"] = np.asarray(report["acceptance"])
  return params, report
