"""The training loop: jit-compiled, sharded by logical-axis rules, checkpointed, resumable.

A run is fully determined by (config, step): the data iterator state and the optimizer state
are checkpointed, and the step's random key is `fold_in(seed, step)`, so a run killed at any
moment and restarted from its workdir continues exactly as if it had never stopped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time
from collections.abc import Iterable, Sequence
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from jax.experimental import multihost_utils
from tensorboardX import SummaryWriter

from effx import perf
from effx.checkpoint import Checkpointer
from effx.model import DecoderLM, count_params
from effx.sharding import MeshConfig, batch_sharding, logical_sharding, make_mesh, replicated

Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Optimisation, evaluation, logging and checkpointing settings.

  Attributes:
    steps: total optimizer steps.
    learning_rate: peak learning rate (AdamW).
    warmup_steps: linear warmup length.
    end_lr_ratio: final learning rate as a fraction of the peak (cosine decay).
    weight_decay: AdamW decoupled weight decay, applied to parameters of rank >= 2 only.
    b1, b2, eps: AdamW moments.
    grad_clip: global-norm clipping threshold (0 disables).
    grad_accum_steps: micro-batches per step (the batch is split along its first axis).
    eval_every: run evaluation every this many steps (0: only at the end).
    checkpoint_every: save every this many steps (0: only at the end / on SIGTERM).
    keep_checkpoints: how many checkpoints to keep.
    log_every: console/TensorBoard logging period.
    seed: parameter-init and per-step randomness seed.
    time_budget_s: stop (and checkpoint) after this many seconds of training, if set.
    progress_bar: show a tqdm progress bar.
  """

  steps: int = 1000
  learning_rate: float = 3e-3
  warmup_steps: int = 100
  end_lr_ratio: float = 0.1
  weight_decay: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  grad_clip: float = 1.0
  grad_accum_steps: int = 1
  eval_every: int = 0
  checkpoint_every: int = 200
  keep_checkpoints: int = 3
  log_every: int = 20
  seed: int = 0
  time_budget_s: float | None = None
  progress_bar: bool = True

  def __post_init__(self):
    for name in ("steps", "grad_accum_steps", "keep_checkpoints", "log_every"):
      if getattr(self, name) <= 0:
        raise ValueError(f"train.{name}: got {getattr(self, name)}; must be > 0")
    for name in ("warmup_steps", "eval_every", "checkpoint_every", "grad_clip", "weight_decay"):
      if getattr(self, name) < 0:
        raise ValueError(f"train.{name}: got {getattr(self, name)}; must be >= 0")
    if not self.learning_rate > 0:
      raise ValueError(f"train.learning_rate: got {self.learning_rate}; must be > 0")
    if not 0 <= self.end_lr_ratio <= 1:
      raise ValueError(f"train.end_lr_ratio: got {self.end_lr_ratio}; must be in [0, 1]")


@flax.struct.dataclass
class TrainState:
  """Everything a step needs and a checkpoint keeps.

  Attributes:
    step: int32 scalar, optimizer steps taken.
    params: the model parameters (unboxed).
    opt_state: optax state.
    model_state: non-trainable variable collections (e.g. "moe_state" router biases).
  """

  step: jax.Array
  params: Any
  opt_state: Any
  model_state: Any


class NonFiniteLossError(RuntimeError):
  """Raised when a step produced a NaN/Inf loss; no checkpoint of that state is written."""


def learning_rate_schedule(cfg: TrainConfig) -> optax.Schedule:
  """Linear warmup to `learning_rate`, then cosine decay to `end_lr_ratio * learning_rate`."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=cfg.warmup_steps,
      decay_steps=max(cfg.steps, cfg.warmup_steps + 1),
      end_value=cfg.learning_rate * cfg.end_lr_ratio)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
  """AdamW with global-norm clipping; weight decay only on parameters of rank >= 2."""
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  parts = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
  parts.append(optax.adamw(learning_rate_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                           weight_decay=cfg.weight_decay, mask=decay_mask))
  return optax.chain(*parts)


def sum_sown(tree: Any) -> jax.Array:
  """Sum of every leaf of a sown collection (e.g. all layers' auxiliary losses)."""
  leaves = jax.tree.leaves(tree)
  return sum((jnp.sum(x.astype(jnp.float32)) for x in leaves), jnp.zeros((), jnp.float32))


def mean_sown_metrics(tree: Any) -> dict[str, jax.Array]:
  """Averages sown metrics of the same name over layers: {"load": [E], "drop_rate": (), ...}."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(tree)) if tree else {}
  grouped: dict[str, list[jax.Array]] = {}
  for path, value in flat.items():
    for leaf in jax.tree.leaves(value):
      grouped.setdefault(str(path[-1]), []).append(leaf.reshape((-1,) + leaf.shape[-1:])
                                                   if leaf.ndim > 1 else leaf.reshape(-1, 1))
  return {name: jnp.mean(jnp.concatenate(vals, axis=0), axis=0).squeeze()
          for name, vals in grouped.items()}


class Trainer:
  """Builds the sharded state and the jitted train/eval steps for a `DecoderLM`.

  Args:
    model: the model.
    cfg: training settings.
    mesh_cfg: mesh axis sizes and logical-axis rules.
    seq_len: training sequence length (for shapes at init).
    batch_size: global batch size.
    devices: the devices of the mesh (default: all of `jax.devices()`).
  """

  def __init__(self, model: DecoderLM, cfg: TrainConfig, mesh_cfg: MeshConfig, seq_len: int,
               batch_size: int, devices: Sequence[jax.Device] | None = None):
    self.model, self.cfg, self.mesh_cfg = model, cfg, mesh_cfg
    self.seq_len, self.batch_size = seq_len, batch_size
    if batch_size % cfg.grad_accum_steps:
      raise ValueError(f"train.grad_accum_steps: {cfg.grad_accum_steps} does not divide the "
                       f"batch size {batch_size}")
    self.mesh = make_mesh(mesh_cfg, devices)
    self.rules = list(mesh_cfg.rules)
    self.tx = make_optimizer(cfg)
    self.schedule = learning_rate_schedule(cfg)
    self.base_key = jax.random.key(cfg.seed)
    abstract = jax.eval_shape(self._init_boxed, self.base_key)
    self.state_sharding = logical_sharding(abstract, self.mesh, self.rules)
    self.abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.unbox(abstract),
        self.state_sharding)
    self.batch_sharding = batch_sharding(self.mesh, self.rules)
    self.num_params = count_params(abstract.params)
    self._train_step = jax.jit(self._step, in_shardings=(self.state_sharding, self.batch_sharding),
                               out_shardings=(self.state_sharding, replicated(self.mesh)),
                               donate_argnums=(0,))
    self._eval_step = jax.jit(self._eval, in_shardings=(self.state_sharding, self.batch_sharding),
                              out_shardings=replicated(self.mesh))

  def _dummy_inputs(self, batch: int) -> tuple[jax.Array, jax.Array]:
    tokens = jnp.zeros((batch, self.seq_len), jnp.int32)
    return tokens, jnp.broadcast_to(jnp.arange(self.seq_len, dtype=jnp.int32), tokens.shape)

  def _init_boxed(self, key: jax.Array) -> TrainState:
    tokens, positions = self._dummy_inputs(1)
    variables = self.model.init({"params": key, "router": key, "dropout": key}, tokens, positions)
    params = variables["params"]
    model_state = {k: v for k, v in variables.items()
                   if k not in ("params", "aux_loss", "metrics", "intermediates")}
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=self.tx.init(params), model_state=model_state)

  def init_state(self) -> TrainState:
    """Fresh parameters and optimizer state, laid out on the mesh."""
    init = jax.jit(lambda k: nn.unbox(self._init_boxed(k)), out_shardings=self.state_sharding)
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return init(self.base_key)

  def _forward(self, params, model_state, batch, key, deterministic: bool):
    out, sown = self.model.apply(
        {"params": params, **model_state}, batch["inputs"], batch["positions"],
        batch["segment_ids"], deterministic=deterministic, rngs={"dropout": key, "router": key},
        mutable=["aux_loss", "metrics", *model_state.keys()])
    ce = optax.softmax_cross_entropy_with_integer_labels(out.logits, batch["targets"])
    weights = batch["weights"].astype(jnp.float32)
    correct = (jnp.argmax(out.logits, -1) == batch["targets"]).astype(jnp.float32)
    return ce, weights, correct, sown

  def _step(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
    key = jax.random.fold_in(self.base_key, state.step)
    accum = self.cfg.grad_accum_steps
    micro = jax.tree.map(lambda x: x.reshape((accum, x.shape[0] // accum) + x.shape[1:]), batch)
    total_weight = jnp.maximum(jnp.sum(batch["weights"].astype(jnp.float32)), 1.0)

    def micro_loss(params, mb, k):
      ce, weights, correct, sown = self._forward(params, state.model_state, mb, k,
                                                 deterministic=False)
      aux = sum_sown(sown.get("aux_loss", {}))
      loss = jnp.sum(ce * weights) / total_weight + aux / accum
      stats = dict(nll=jnp.sum(ce * weights), correct=jnp.sum(correct * weights), aux=aux)
      return loss, (stats, sown)

    def body(carry, xs):
      grads_acc, stats_acc = carry
      mb, i = xs
      (_, (stats, sown)), grads = jax.value_and_grad(micro_loss, has_aux=True)(
          state.params, mb, jax.random.fold_in(key, i))
      grads_acc = jax.tree.map(jnp.add, grads_acc, grads)
      stats_acc = jax.tree.map(jnp.add, stats_acc, stats)
      return (grads_acc, stats_acc), sown

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    stats0 = dict(nll=jnp.zeros(()), correct=jnp.zeros(()), aux=jnp.zeros(()))
    (grads, stats), sown = jax.lax.scan(body, (zeros, stats0), (micro, jnp.arange(accum)))
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    sown_last = jax.tree.map(lambda x: x[-1], sown)
    model_state = {k: sown_last[k] for k in state.model_state}
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              model_state=model_state)
    metrics = dict(loss=stats["nll"] / total_weight, accuracy=stats["correct"] / total_weight,
                   aux_loss=stats["aux"] / accum, grad_norm=optax.tree.norm(grads),
                   learning_rate=self.schedule(state.step), tokens=total_weight)
    metrics.update({f"moe/{k}": v for k, v in mean_sown_metrics(sown_last.get("metrics",
                                                                              {})).items()})
    return new_state, metrics

  def _eval(self, state: TrainState, batch: Batch) -> dict[str, jax.Array]:
    ce, weights, correct, _ = self._forward(state.params, state.model_state, batch,
                                            self.base_key, deterministic=True)
    return dict(nll=jnp.sum(ce * weights), correct=jnp.sum(correct * weights),
                tokens=jnp.sum(weights))

  def _device_batch(self, batch: Batch) -> Batch:
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(v))
            for k, v in batch.items()}

  def train_step(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, Any]]:
    """One optimizer step on a host batch (dict of [batch, seq] arrays)."""
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return self._train_step(state, self._device_batch(batch))

  def evaluate(self, state: TrainState, batches: Iterable[Batch]) -> dict[str, float]:
    """Token-weighted eval loss (nats per token) and accuracy over `batches`."""
    nll = correct = tokens = 0.0
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      for batch in batches:
        out = jax.device_get(self._eval_step(state, self._device_batch(batch)))
        nll, correct, tokens = nll + out["nll"], correct + out["correct"], tokens + out["tokens"]
    tokens = max(tokens, 1.0)
    return dict(eval_loss=float(nll / tokens), eval_accuracy=float(correct / tokens))

  def lower_train_step(self) -> jax.stages.Lowered:
    """The train step lowered from shapes and shardings only (no arrays are made), so it
    compiles ahead of time for compile-only devices too, e.g. a TPU slice described by
    `jax.experimental.topologies.get_topology_desc(...)` (needs libtpu, not a TPU):
    `Trainer(..., devices=topology.devices).lower_train_step().compile()`."""
    batch = {k: jax.ShapeDtypeStruct((self.batch_size, self.seq_len),
                                     jnp.float32 if k == "weights" else jnp.int32,
                                     sharding=self.batch_sharding)
             for k in ("inputs", "targets", "segment_ids", "positions", "weights")}
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return self._train_step.lower(self.abstract_state, batch)

  def step_flops(self, state: TrainState, batch: Batch) -> float:
    """Model FLOPs of one train step: 6·N per token (weights, forward + backward) plus
    12·layers·seq·width per token (attention scores), times the tokens of the batch.

    XLA's cost analysis is not used: it counts a scanned layer stack's loop body once.
    """
    del state, batch
    tokens = self.batch_size * self.seq_len
    return tokens * perf.transformer_flops_per_token(
        self.num_params, self.model.num_layers, self.seq_len, self.model.embed_dim)

class _Preemption:
  """Turns SIGTERM into a flag the loop checks between steps."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    def handler(signum, frame):
      self.requested = True
    try:
      self._previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: no handler
      self._previous = None
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


class MetricsLog:
  """Metrics to the console, TensorBoard event files and a `metrics.jsonl` file in the workdir."""

  def __init__(self, workdir: str, enabled: bool):
    self.enabled = enabled
    self.writer = SummaryWriter(os.path.join(workdir, "tensorboard")) if enabled else None
    self.path = os.path.join(workdir, "metrics.jsonl")

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    if not self.enabled:
      return
    scalars = {}
    for name, value in metrics.items():
      arr = np.asarray(value)
      if arr.size == 1:
        scalars[name] = float(arr)
        self.writer.add_scalar(name, float(arr), step)
      else:
        self.writer.add_histogram(name, arr, step)
        scalars[name] = arr.tolist()
    with open(self.path, "a") as f:
      f.write(json.dumps({"step": step, **scalars}) + "\n")

  def close(self) -> None:
    if self.writer is not None:
      self.writer.close()


@dataclasses.dataclass
class TrainResult:
  """Summary of a `train` call."""

  state: TrainState
  steps_done: int
  resumed_from: int | None
  eval: dict[str, float]
  tokens_per_second: float
  mfu: float | None
  stopped_by: str  # "steps", "time_budget" or "sigterm"


def train(model: DecoderLM, cfg: TrainConfig, mesh_cfg: MeshConfig, data_cfg: Any,
          workdir: str, *, log=print) -> TrainResult:
  """Trains `model` on `data_cfg`'s corpus in `workdir`, resuming from its newest checkpoint.

  Raises:
    NonFiniteLossError: a step produced a NaN/Inf loss (the step is named; nothing is saved).
  """
  from effx.data import make_eval_batches, make_train_iterator

  os.makedirs(workdir, exist_ok=True)
  trainer = Trainer(model, cfg, mesh_cfg, data_cfg.seq_len, data_cfg.batch_size)
  pid, pcount = jax.process_index(), jax.process_count()
  data_iter = make_train_iterator(data_cfg, process_index=pid, process_count=pcount)
  eval_batches = make_eval_batches(data_cfg, process_index=pid, process_count=pcount)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=cfg.keep_checkpoints)
  restored = ckpt.restore_latest(trainer.abstract_state, data_iter)
  if restored is None:
    state, resumed_from = trainer.init_state(), None
  else:
    resumed_from, state = restored
    log(f"resumed from checkpoint step {resumed_from} in {ckpt.directory}")
  metrics_log = MetricsLog(workdir, enabled=pid == 0)
  log(f"model: {trainer.num_params:,} parameters; mesh {dict(trainer.mesh.shape)}; "
      f"{jax.device_count()} {jax.devices()[0].platform} device(s)")

  step = int(jax.device_get(state.step))
  peak, peak_source = perf.peak_flops()
  flops_per_step = None
  tokens_per_step = data_cfg.batch_size * data_cfg.seq_len
  stopped_by = "steps"
  bar = tqdm.tqdm(total=cfg.steps, initial=step, disable=not (cfg.progress_bar and pid == 0),
                  desc="train", unit="step", dynamic_ncols=True)
  timed_steps, timed_seconds = 0, 0.0
  started = time.perf_counter()
  last_saved = step if restored is not None else None
  with _Preemption() as preemption:
    while step < cfg.steps:
      batch = next(data_iter)
      if flops_per_step is None:
        flops_per_step = trainer.step_flops(state, batch)
      t0 = time.perf_counter()
      state, metrics = trainer.train_step(state, batch)
      metrics = jax.device_get(metrics)
      dt = time.perf_counter() - t0
      step += 1
      if not math.isfinite(float(metrics["loss"])):
        bar.close()
        metrics_log.close()
        ckpt.close()
        raise NonFiniteLossError(f"non-finite loss {float(metrics['loss'])} at step {step}; "
                                 f"stopping without checkpointing this state "
                                 f"(last checkpoint: step {last_saved})")
      if step > 1 + (resumed_from or 0):  # the first step of a process includes compilation
        timed_steps, timed_seconds = timed_steps + 1, timed_seconds + dt
      bar.update(1)
      if step % cfg.log_every == 0 or step == cfg.steps:
        tps = tokens_per_step * timed_steps / timed_seconds if timed_seconds else 0.0
        metrics["tokens_per_second"] = tps
        if timed_seconds and flops_per_step:
          metrics["mfu"] = flops_per_step * timed_steps / timed_seconds / (
              peak * jax.device_count())
        metrics_log.write(step, metrics)
        bar.set_postfix(loss=f"{float(metrics['loss']):.3f}", tok_s=f"{tps:,.0f}")
      if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
        ev = trainer.evaluate(state, eval_batches)
        metrics_log.write(step, ev)
        log(f"step {step}: eval loss {ev['eval_loss']:.4f} nats/token, "
            f"accuracy {ev['eval_accuracy']:.3f}")
      out_of_time = cfg.time_budget_s is not None and time.perf_counter() - started > \
          cfg.time_budget_s
      preempted = preemption.requested
      if pcount > 1:  # all processes stop (and save, a collective) at the same step
        flags = multihost_utils.process_allgather(np.array([preempted, out_of_time]))
        preempted, out_of_time = (bool(f) for f in np.asarray(flags).reshape(pcount, 2).any(0))
      if preempted or out_of_time or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0):
        ckpt.save(step, state, data_iter)
        last_saved = step
      if preempted:
        stopped_by = "sigterm"
        log(f"SIGTERM: saved checkpoint at step {step}; exiting")
        break
      if out_of_time:
        stopped_by = "time_budget"
        log(f"time budget of {cfg.time_budget_s}s reached at step {step}; checkpoint saved")
        break
  bar.close()
  if stopped_by == "steps" and last_saved != step:
    ckpt.save(step, state, data_iter)
  ev = trainer.evaluate(state, eval_batches) if stopped_by != "sigterm" else {}
  if ev:
    metrics_log.write(step, ev)
  metrics_log.close()
  ckpt.close()
  tps = tokens_per_step * timed_steps / timed_seconds if timed_seconds else 0.0
  mfu = (flops_per_step * timed_steps / timed_seconds / (peak * jax.device_count())
         if timed_seconds and flops_per_step else None)
  log(f"peak FLOP/s per device: {peak:.3g} ({peak_source})")
  return TrainResult(state=state, steps_done=step, resumed_from=resumed_from, eval=ev,
                     tokens_per_second=tps, mfu=mfu, stopped_by=stopped_by)


def restore_params(model: DecoderLM, cfg: TrainConfig, mesh_cfg: MeshConfig, seq_len: int,
                   batch_size: int, workdir: str) -> TrainState:
  """The newest checkpointed train state in `workdir` (ValueError if there is none)."""
  trainer = Trainer(model, cfg, mesh_cfg, seq_len, batch_size)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=cfg.keep_checkpoints)
  restored = ckpt.restore_latest(trainer.abstract_state, None)
  ckpt.close()
  if restored is None:
    raise ValueError(f"workdir: no checkpoint found in {workdir!r}; train first (--mode train)")
  return restored[1]

