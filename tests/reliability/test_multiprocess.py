"""Multi-process training on one machine: two local processes with two CPU devices each
(`XLA_FLAGS=--xla_force_host_platform_device_count=2`), joined by the launcher's `--distributed`
flag from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, CPU collectives through
gloo (`JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo`, jax 0.12's default once distributed).

* the 2 x 2-device run logs the same losses as a 1 x 4-device run (same mesh {'data': 4});
  each process reads its own half of every global batch (`make_train_iterator(...,
  process_index, process_count)` in effx/train.py), so reading the wrong shard would change the
  losses. Tolerance: rtol 1e-4 (the rows of a batch sit on other devices, so the float32
  reductions run in another order);
* SIGTERM to ONE process stops both at the same step with one orbax checkpoint (every process's
  data-iterator state in it); rerunning both resumes there and ends with the same losses;
* a batch that does not split over the processes is refused by both, before any compute.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 16
TINY = ["model.embed_dim=32", "model.num_layers=2", "model.layer_pattern[0].attention.num_heads=2",
        "model.layer_pattern[0].ffn.hidden_dim=64", "data.seq_len=32", "data.batch_size=8",
        f"train.steps={STEPS}", "train.checkpoint_every=4", "train.log_every=1",
        "train.warmup_steps=2", "train.time_budget_s=None", "train.progress_bar=False",
        "data.eval_batches=1", "heads=[]"]
WAIT_S = 420
RTOL = 1e-4

pytestmark = pytest.mark.slow


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _cmd(workdir, *extra_sets, distributed=False):
  args = [sys.executable, "-m", "experiments.main", "--config", "config:lm_tiny"]
  for item in TINY + list(extra_sets):
    args += ["--config", f"set:{item}"]
  args += ["--workdir", str(workdir), "--mode", "train"]
  return args + (["--distributed"] if distributed else [])


def _env(devices: int, **extra) -> dict:
  env = {k: v for k, v in os.environ.items()
         if k not in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")}
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             **extra)
  return env


def _start_pair(workdir, *extra_sets):
  """Starts processes 0 and 1 of a 2-process job (2 CPU devices each)."""
  address = f"127.0.0.1:{_free_port()}"
  return [subprocess.Popen(
      _cmd(workdir, *extra_sets, distributed=True), cwd=REPO, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True,
      env=_env(2, JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES="2",
               JAX_PROCESS_ID=str(i), JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo"))
          for i in range(2)]


def _finish(procs, timeout=WAIT_S):
  """(returncode, stdout, stderr) of each process; kills the others if one hangs."""
  results = []
  try:
    for p in procs:
      out, err = p.communicate(timeout=timeout)
      results.append((p.returncode, out, err))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.communicate()
  return results


def _records(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  out = []
  with open(path) as f:
    for line in f.read().splitlines():
      try:
        out.append(json.loads(line))
      except json.JSONDecodeError:
        pass
  return [r for r in out if "loss" in r]


def _losses(workdir):
  return {r["step"]: r["loss"] for r in _records(workdir)}  # later records win


def test_two_processes_match_one_and_resume_after_sigterm_to_one(tmp_path):
  reference = tmp_path / "one_process"
  ref_proc = subprocess.Popen(_cmd(reference), cwd=REPO, env=_env(4), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
  workdir = tmp_path / "two_processes"
  procs = _start_pair(workdir)
  try:
    deadline = time.monotonic() + WAIT_S
    while not any(r["step"] >= 3 for r in _records(workdir)):
      assert time.monotonic() < deadline, "timed out waiting for step 3"
      assert all(p.poll() is None for p in procs), _finish(procs)
      time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)  # one process only: both must stop at one step
  finally:
    results = _finish(procs)
  for code, out, err in results:
    assert code == 0, err[-3000:]
    assert "stopped_by: sigterm" in out, out[-2000:]
  stops = {out.split("SIGTERM: saved checkpoint at step ")[1].split(";")[0]
           for _, out, _ in results}
  assert len(stops) == 1, stops
  stopped = int(stops.pop())
  assert 3 <= stopped < STEPS
  data_dir = workdir / "checkpoints" / str(stopped) / "data"
  assert sorted(os.listdir(data_dir)) == ["commit_success.txt", "process_0-of-2.json",
                                          "process_1-of-2.json"]
  first = _losses(workdir)
  assert sorted(first) == list(range(1, stopped + 1))

  for code, out, err in _finish(_start_pair(workdir)):
    assert code == 0, err[-3000:]
    assert f"resumed from checkpoint step {stopped}" in out, out[-2000:]
    assert "stopped_by: steps" in out
    assert "mesh {'data': 4, 'fsdp': 1, 'tensor': 1, 'expert': 1}; 4 cpu device(s)" in out

  (code, out, err), = _finish([ref_proc])
  assert code == 0, err[-3000:]
  assert "4 cpu device(s)" in out
  ref = _losses(reference)
  got = _losses(workdir)
  assert sorted(ref) == sorted(got) == list(range(1, STEPS + 1))
  np.testing.assert_allclose([got[s] for s in sorted(got)], [ref[s] for s in sorted(ref)],
                             rtol=RTOL)
  assert ref[STEPS] < ref[1] - 0.1  # the loss moved: equal losses are not a constant's


def test_two_processes_refuse_a_batch_that_does_not_split(tmp_path):
  workdir = tmp_path / "run"
  for code, out, err in _finish(_start_pair(workdir, "data.batch_size=3"), timeout=240):
    assert code != 0
    last = err.strip().splitlines()[-1]
    assert last == ("effx: config error: data.batch_size: got 3; must be divisible by the "
                    "process count 2"), err[-2000:]
  assert not workdir.exists()
