"""Shared pytest setup: compiled programs are dropped after each test module.

Every XLA:CPU executable keeps memory mappings alive; an xdist worker that compiles for half
the suite passed Linux's default limit of 65,530 mappings per process (vm.max_map_count) and
crashed inside the next compile. Tests of one module reuse each other's programs; tests of
different modules rarely do.
"""

import gc

import jax
import pytest


@pytest.fixture(autouse=True, scope="module")
def _drop_compiled_programs_after_module():
  yield
  jax.clear_caches()
  gc.collect()
