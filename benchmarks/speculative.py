r"""Speculative decoding vs plain decoding on a trained model: τ, tokens/s, speedup, tree size.

Usage (after the main job trained lm_tiny and its heads in runs/lm_tiny):
  python -m benchmarks.speculative --workdir runs/lm_tiny [--draft-seconds 90]

For AR, Medusa, Hydra, Hydra++ and a small draft LM (trained here for --draft-seconds on the
same corpus, then kept in WORKDIR/draft_model), at batch 1 and 8, on held-out prompts, greedy.
Trees are sized from verify latency measured on this machine. Appends a table to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os

import fiddle as fdl

from benchmarks._report import append_section
from effx.data import ByteTokenizer, corpus_split
from effx.decoding.evaluation import compare_with_plain, held_out_prompts
from effx.decoding.generate import pad_prompts
from effx.decoding.proposers import DraftModelProposer
from effx.decoding.speculative import SpeculativeConfig
from effx.train import restore_params, train
from experiments import configs
from experiments.draft_heads import measure_speculative


def draft_model_experiment(seconds: float):
  """A 1-layer, 128-wide draft LM trained for `seconds` on the same corpus."""
  cfg = configs.lm_tiny()
  cfg.model.embed_dim = 128
  cfg.model.num_layers = 1
  cfg.model.layer_pattern[0].attention.num_heads = 2
  cfg.model.layer_pattern[0].ffn.hidden_dim = 384
  cfg.train.time_budget_s = seconds
  cfg.train.progress_bar = False
  cfg.heads = []
  return fdl.build(cfg)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--workdir", default="runs/lm_tiny")
  parser.add_argument("--draft-seconds", type=float, default=90.0)
  parser.add_argument("--num-draft", type=int, default=3, help="chain length of the draft LM")
  parser.add_argument("--no-write", action="store_true")
  args = parser.parse_args()

  exp = fdl.build(configs.lm_tiny())
  state = restore_params(exp.model, exp.train, exp.mesh, exp.data.seq_len, exp.data.batch_size,
                         args.workdir)
  variables = {"params": state.params, **state.model_state}
  rows = measure_speculative(exp, args.workdir, variables)

  draft = draft_model_experiment(args.draft_seconds)
  draft_dir = os.path.join(args.workdir, "draft_model")
  draft_state = train(draft.model, draft.train, draft.mesh, draft.data, draft_dir).state
  bench = exp.speculative
  tok = ByteTokenizer()
  prompts = held_out_prompts(corpus_split(exp.data.paths, exp.data.eval_fraction).files("eval"),
                             bench.num_prompts, bench.prompt_bytes, bos_id=tok.BOS_ID,
                             offset=tok.NUM_SPECIAL)
  max_len = bench.prompt_bytes + 1 + bench.max_new_tokens + max(bench.candidate_tree_nodes)
  cfg = SpeculativeConfig(max_new_tokens=bench.max_new_tokens, max_len=max_len)
  proposer = DraftModelProposer(draft.model, args.num_draft)
  for batch in bench.batch_sizes:
    batches = [pad_prompts(prompts[i:i + batch])
               for i in range(0, len(prompts) - batch + 1, batch)]
    result = compare_with_plain(exp.model, variables, "draft LM", proposer,
                                {"params": draft_state.params}, batches, cfg,
                                repeats=bench.repeats)
    rows.append(dict(method="draft LM", batch=batch, tree_nodes=proposer.tree.num_nodes,
                     tau=round(result.stats.tau, 3), speedup=round(result.speedup, 3),
                     tokens_per_second=round(result.tokens_per_second, 1),
                     plain_tokens_per_second=round(result.baseline_tokens_per_second, 1),
                     outputs_match_plain=result.outputs_match))

  lines = ["| method | batch | tree nodes | τ | τ, chain of 4 | tokens/s | AR tokens/s | speedup | "
           "greedy == AR |", "|---|---|---|---|---|---|---|---|---|"]
  for r in sorted(rows, key=lambda r: (r["batch"], r["method"])):
    chain_tau = f"{r['tau_chain']:.2f}" if "tau_chain" in r else "–"
    lines.append(f"| {r['method']} | {r['batch']} | {r['tree_nodes']} | {r['tau']:.2f} | "
                 f"{chain_tau} | "
                 f"{r['tokens_per_second']:,.0f} | {r['plain_tokens_per_second']:,.0f} | "
                 f"{r['speedup']:.2f}x | {r['outputs_match_plain']} |")
  body = (f"lm_tiny backbone from `{args.workdir}`; greedy; {bench.num_prompts} held-out stdlib "
          f"prompts of {bench.prompt_bytes} bytes, {bench.max_new_tokens} new tokens; AR and "
          "speculative timed alternately in one process (best of "
          f"{bench.repeats}; every prompt at every batch size). Draft LM: 1 layer x 128, trained {args.draft_seconds:.0f} s, chain "
          f"of {args.num_draft}. Head trees are sized from measured verify + drafting latency and "
          "the heads' agreement on the model's own continuations of train-split prompts; \"τ, "
          "chain of 4\": each head method on the same 4-deep chain.\n\n" + "\n".join(lines))
  print(body)
  if not args.no_write:
    append_section("Speculative decoding (lm_tiny, CPU)", body)


if __name__ == "__main__":
  main()
