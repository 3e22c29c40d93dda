"""Resumability of `python -m experiments.main --mode train` (subprocesses on CPU):

* kill -9 mid-run, rerun in the same workdir: every loss logged after the resume equals the
  uninterrupted run's, bit for bit;
* SIGTERM: a checkpoint of the current step is written and the process exits 0;
* a corrupt newest checkpoint: the restore falls back to the previous one with a warning naming
  the skipped step, and the run completes (re-saving that step) with the same losses.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 24
TINY = ["model.embed_dim=32", "model.num_layers=2", "model.layer_pattern[0].attention.num_heads=2",
        "model.layer_pattern[0].ffn.hidden_dim=64", "data.seq_len=32", "data.batch_size=4",
        f"train.steps={STEPS}", "train.checkpoint_every=3", "train.log_every=1",
        "train.warmup_steps=2", "train.time_budget_s=None", "train.progress_bar=False",
        "data.eval_batches=1", "generate.max_new_tokens=8"]
WAIT_S = 600


def _cmd(workdir, *extra):
  args = [sys.executable, "-m", "experiments.main", "--config", "config:lm_tiny"]
  for item in TINY + list(extra):
    args += ["--config", f"set:{item}"]
  return args + ["--workdir", str(workdir), "--mode", "train"]


def _env():
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  env["JAX_PLATFORMS"] = "cpu"
  return env


def _run(workdir, *extra):
  proc = subprocess.run(_cmd(workdir, *extra), cwd=REPO, env=_env(), capture_output=True,
                        text=True, timeout=WAIT_S)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def _records(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    lines = f.read().splitlines()
  out = []
  for line in lines:
    try:
      out.append(json.loads(line))
    except json.JSONDecodeError:  # a line cut by kill -9
      pass
  return [r for r in out if "loss" in r]


def _last_loss_per_step(workdir):
  return {r["step"]: r["loss"] for r in _records(workdir)}  # later records win


def _start_and_wait(workdir, min_step):
  """Starts a run and returns (process, step seen) once metrics show a step >= min_step."""
  proc = subprocess.Popen(_cmd(workdir), cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  deadline = time.monotonic() + WAIT_S
  while time.monotonic() < deadline:
    steps = [r["step"] for r in _records(workdir)]
    if steps and max(steps) >= min_step:
      assert proc.poll() is None, "the run finished before it could be interrupted"
      return proc, max(steps)
    if proc.poll() is not None:
      pytest.fail(f"run exited early ({proc.returncode}): {proc.stderr.read()[-3000:]}")
    time.sleep(0.05)
  proc.kill()
  pytest.fail("timed out waiting for the run to reach step %d" % min_step)


def _checkpoint_steps(workdir):
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit())


@pytest.mark.slow
def test_kill9_then_resume_matches_uninterrupted_run(tmp_path):
  reference = tmp_path / "reference"
  _run(reference)
  ref = _last_loss_per_step(reference)
  assert sorted(ref) == list(range(1, STEPS + 1))

  workdir = tmp_path / "killed"
  proc, seen = _start_and_wait(workdir, min_step=5)
  proc.send_signal(signal.SIGKILL)
  proc.communicate(timeout=60)
  assert proc.returncode == -signal.SIGKILL
  killed_at = max(r["step"] for r in _records(workdir))
  assert 5 <= killed_at < STEPS

  resumed = _run(workdir)
  assert "resumed from checkpoint step" in resumed.stdout
  resumed_from = int(resumed.stdout.split("resumed from checkpoint step ")[1].split()[0])
  assert 3 <= resumed_from <= killed_at and resumed_from % 3 == 0
  losses = _last_loss_per_step(workdir)
  assert sorted(losses) == list(range(1, STEPS + 1))
  for step in range(resumed_from + 1, STEPS + 1):
    assert losses[step] == ref[step], (step, losses[step], ref[step])  # bit-exact on CPU
  # Steps that ran twice (after the last checkpoint, before the kill) agree too.
  first = {}
  for r in _records(workdir):
    if r["step"] in first:
      assert r["loss"] == first[r["step"]], r
    first.setdefault(r["step"], r["loss"])


@pytest.mark.slow
def test_sigterm_checkpoints_then_corrupt_checkpoint_falls_back(tmp_path):
  workdir = tmp_path / "run"
  proc, _ = _start_and_wait(workdir, min_step=5)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=WAIT_S)
  assert proc.returncode == 0, err[-3000:]
  stopped = max(r["step"] for r in _records(workdir))
  assert f"SIGTERM: saved checkpoint at step {stopped}" in out, out[-2000:]
  assert "stopped_by: sigterm" in out
  assert stopped < STEPS and stopped in _checkpoint_steps(workdir)
  before = _last_loss_per_step(workdir)

  # Corrupt the newest checkpoint (the SIGTERM one): empty its array data files.
  state_dir = os.path.join(workdir, "checkpoints", str(stopped), "state")
  data_files = [os.path.join(root, f) for root, _, files in os.walk(state_dir) for f in files
                if os.sep + "d" + os.sep in os.path.join(root, f) + os.sep]
  assert data_files
  for f in data_files:
    with open(f, "w"):
      pass
  previous = max(s for s in _checkpoint_steps(workdir) if s < stopped)

  # checkpoint_every=1 makes the resumed run save the corrupt step again (it must replace it).
  resumed = _run(workdir, "train.checkpoint_every=1")
  text = resumed.stdout + resumed.stderr
  assert f"skipped unreadable checkpoint step {stopped}" in text, text[-3000:]
  assert f"resumed from checkpoint step {previous}" in resumed.stdout
  after = _last_loss_per_step(workdir)
  assert sorted(after) == list(range(1, STEPS + 1))
  for step in range(previous + 1, stopped + 1):  # ran twice: identical losses
    assert after[step] == before[step], (step, after[step], before[step])
  assert _checkpoint_steps(workdir)[-1] == STEPS
