"""Launcher steps for draft heads: train them on the frozen backbone, then measure speedup."""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np

from effx.data import ByteTokenizer, corpus_split, make_eval_batches, make_train_iterator
from effx.decoding.evaluation import (auto_tree, compare_with_plain, generated_batches,
                                      held_out_prompts, measure_proposal_latency,
                                      measure_verify_latency)
from effx.decoding.generate import pad_prompts
from effx.decoding.head_training import (HeadTrainer, load_heads, make_proposer,
                                         proposer_params, save_heads)
from effx.decoding.speculative import SpeculativeConfig, speculative_generate, speculative_stats
from effx.decoding.tree import chain
from experiments.experiment import Experiment


def heads_dir(workdir: str, kind: str) -> str:
  return os.path.join(workdir, "heads", kind.replace("+", "p"))


def train_heads(exp: Experiment, workdir: str, base_variables: Any, log=print) -> dict:
  """Trains every head config of `exp.heads` (skipping kinds already saved in the workdir)."""
  reports = {}
  train_iter = make_train_iterator(exp.data)
  eval_batches = make_eval_batches(exp.data)
  for cfg in exp.heads:
    directory = heads_dir(workdir, cfg.kind)
    if os.path.exists(os.path.join(directory, "report.json")):
      with open(os.path.join(directory, "report.json")) as f:
        reports[cfg.kind] = json.load(f)
      log(f"heads[{cfg.kind}]: found in {directory}, not retrained")
      continue
    trainer = HeadTrainer(cfg, exp.model, base_variables)
    params, opt_state = trainer.init()
    params, _, steps = trainer.fit(params, opt_state, train_iter, log=log)
    report = trainer.evaluate(params, eval_batches)
    report["steps"] = steps
    save_heads(directory, params, report)
    log(f"heads[{cfg.kind}]: {steps} steps; top-1 agreement with the base model per head "
        f"{np.round(report['top1'], 3).tolist()}, top-{cfg.top_k} "
        f"{np.round(report['topk'], 3).tolist()}, expected accepted length (chain) "
        f"{report['expected_accept_length']:.2f}")
    reports[cfg.kind] = {k: (v.tolist() if isinstance(v, np.ndarray) else v)
                         for k, v in report.items()}
  return reports


def measure_speculative(exp: Experiment, workdir: str, base_variables: Any, log=print
                        ) -> list[dict]:
  """For each head kind and batch size: tree sized from measured latency, τ and speedup, and τ
  on one common tree (a chain as deep as there are heads), which compares the heads alone.

  The tree is sized from what one step costs here (verify latency per tree size plus the
  heads' own drafting cost per depth) and from the heads' acceptance measured on the model's
  own greedy continuations of calibration prompts cut from the *train* split (the text decoding
  drafts against; the corpus text the heads were scored on in training is harder to predict).
  """
  bench = exp.speculative
  tok = ByteTokenizer()
  split = corpus_split(exp.data.paths, exp.data.eval_fraction)
  prompts = held_out_prompts(split.files("eval"), bench.num_prompts, bench.prompt_bytes,
                             bos_id=tok.BOS_ID, offset=tok.NUM_SPECIAL)
  calibration = generated_batches(
      exp.model, base_variables,
      held_out_prompts(split.files("train"), 2 * max(bench.batch_sizes), bench.prompt_bytes,
                       seed=1, bos_id=tok.BOS_ID, offset=tok.NUM_SPECIAL),
      bench.max_new_tokens, batch_size=max(bench.batch_sizes))
  max_nodes = max(bench.candidate_tree_nodes)
  max_len = bench.prompt_bytes + 1 + bench.max_new_tokens + max_nodes
  context = bench.prompt_bytes + bench.max_new_tokens // 2
  cfg = SpeculativeConfig(max_new_tokens=bench.max_new_tokens, max_len=max_len,
                          sampling=exp.generate.sampling, eos_id=-1)
  trained = []  # (config, heads module, proposer params, acceptance table), loaded once
  for head_cfg in exp.heads:
    directory = heads_dir(workdir, head_cfg.kind)
    if not os.path.exists(os.path.join(directory, "report.json")):
      raise ValueError(f"heads: no trained {head_cfg.kind} heads in {workdir!r}; run "
                       f"--mode train_heads first")
    trainer = HeadTrainer(head_cfg, exp.model, base_variables)
    params, _ = load_heads(directory, jax.eval_shape(lambda: trainer.init()[0]))
    acceptance = trainer.evaluate(params, calibration)["acceptance"]
    log(f"heads[{head_cfg.kind}]: top-1 agreement on the model's own continuations "
        f"(calibration, train-split prompts) {np.round(acceptance[:, 0], 3).tolist()}")
    trained.append((head_cfg, trainer.heads,
                    proposer_params(trainer.heads, params, base_variables["params"]),
                    acceptance))
  rows = []
  for batch in bench.batch_sizes:
    latency = measure_verify_latency(exp.model, base_variables, batch,
                                     (1,) + bench.candidate_tree_nodes, context=context,
                                     max_len=max_len)
    log(f"batch {batch}: verify latency relative to one token: "
        + ", ".join(f"T={t}: {s / latency[1]:.2f}x" for t, s in sorted(latency.items())))
    # every prompt at every batch size: at batch 1 a single prompt is one sample of τ
    batches = [pad_prompts(prompts[i:i + batch])
               for i in range(0, len(prompts) - batch + 1, batch)]
    for head_cfg, heads, params, acceptance in trained:
      drafting = measure_proposal_latency(
          lambda d, heads=heads: make_proposer(heads, chain(d)), params, batch,
          range(1, heads.num_heads + 1), exp.model.embed_dim, context, max_len)
      budget = auto_tree(acceptance, {t: s for t, s in latency.items() if t > 1}, drafting)
      common = chain(heads.num_heads)  # the same tree for every method: τ compares the heads
      accepted = [np.asarray(speculative_generate(
          exp.model, base_variables, make_proposer(heads, common), params, tokens, lengths,
          cfg).accepted) for tokens, lengths in batches]
      tau_chain = speculative_stats(np.concatenate(accepted, axis=1), common.num_nodes,
                                    common.max_depth).tau
      result = compare_with_plain(
          exp.model, base_variables, head_cfg.kind, make_proposer(heads, budget.tree), params,
          batches, cfg, repeats=bench.repeats)
      row = dict(method=head_cfg.kind, batch=batch, tree_nodes=budget.tree.num_nodes,
                 tree_depth=budget.tree.max_depth,
                 tau=round(result.stats.tau, 3), speedup=round(result.speedup, 3),
                 tau_chain=round(tau_chain, 3),
                 tokens_per_second=round(result.tokens_per_second, 1),
                 plain_tokens_per_second=round(result.baseline_tokens_per_second, 1),
                 per_depth_acceptance=[round(x, 3) for x in result.stats.per_depth],
                 drafting_relative=[round(drafting[d] / latency[1], 2)
                                    for d in sorted(drafting)],
                 outputs_match_plain=result.outputs_match)
      log(f"batch {batch} {head_cfg.kind}: drafting cost per depth relative to one token "
          f"{row['drafting_relative']}; tree of {row['tree_nodes']} nodes (depth "
          f"{row['tree_depth']}), τ {row['tau']} (on a chain of {heads.num_heads} for every "
          f"method: {row['tau_chain']}), per-depth acceptance "
          f"{row['per_depth_acceptance']}, {row['tokens_per_second']} tok/s vs "
          f"{row['plain_tokens_per_second']} plain: {row['speedup']}x (greedy output identical: "
          f"{row['outputs_match_plain']})")
      rows.append(row)
  with open(os.path.join(workdir, "speculative.json"), "w") as f:
    json.dump(rows, f, indent=2)
  return rows
