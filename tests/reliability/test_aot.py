"""Ahead-of-time compilation of the train step from shapes only (`Trainer.lower_train_step`).

On this CPU-only machine the step compiles for the local devices. Compiling for a TPU slice
without a TPU needs libtpu (the TPU PJRT plugin: `pip install "jax[tpu]"`, several hundred MB),
which is not installed here: `get_topology_desc` then refuses, as the README says; where libtpu
is installed the v5e 2x2 test compiles the step for that slice (no TPU needed).
"""

from __future__ import annotations

import importlib.util

import jax
import pytest

from effx import perf
from effx.train import Trainer
from experiments import main as launcher

TINY = ["model.embed_dim=32", "model.num_layers=2", "model.layer_pattern[0].attention.num_heads=2",
        "model.layer_pattern[0].ffn.hidden_dim=64", "data.seq_len=32", "data.batch_size=8",
        "heads=[]"]
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None


def _trainer(devices, *directives):
  exp = launcher.build_experiment(launcher.parse_config(
      ["config:lm_tiny"] + [f"set:{s}" for s in TINY] + list(directives)))
  return Trainer(exp.model, exp.train, exp.mesh, exp.data.seq_len, exp.data.batch_size,
                 devices=devices)


def test_train_step_compiles_from_shapes_only():
  trainer = _trainer(jax.devices()[:1], "fiddler:with_mesh(data=1)")
  compiled = trainer.lower_train_step().compile()
  assert perf.compiled_flops(compiled) > 0
  state_shardings, batch_shardings = compiled.input_shardings[0]
  assert sorted(batch_shardings) == ["inputs", "positions", "segment_ids", "targets", "weights"]
  assert batch_shardings["inputs"] == trainer.batch_sharding


@pytest.mark.skipif(HAS_LIBTPU, reason="libtpu is installed: the slice test below runs instead")
def test_tpu_topology_needs_libtpu():
  from jax.experimental import topologies
  with pytest.raises(RuntimeError, match="TPU support not installed"):
    topologies.get_topology_desc("v5e:2x2", "tpu")


@pytest.mark.skipif(not HAS_LIBTPU, reason="needs libtpu (pip install 'jax[tpu]'), not a TPU")
def test_train_step_compiles_for_a_v5e_2x2_slice():
  from jax.experimental import topologies
  topology = topologies.get_topology_desc(
      platform="tpu", topology_name="v5e:2x2", chip_config_name="default",
      chips_per_host_bounds=(2, 2, 1), num_slices=1)
  assert len(topology.devices) == 4
  trainer = _trainer(topology.devices, "fiddler:with_mesh(data=2,fsdp=2)")
  compiled = trainer.lower_train_step().compile()
  assert perf.compiled_flops(compiled) > 0
