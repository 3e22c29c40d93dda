"""Orbax checkpointing of the train state and the data-iterator state, with safe fallback."""

from __future__ import annotations

import logging
import os
from typing import Any

import orbax.checkpoint as ocp

log = logging.getLogger("effx.checkpoint")


class Checkpointer:
  """Keeps the newest `keep` checkpoints of (train state, data iterator) under `directory`.

  Saves are synchronous and atomic (orbax writes a temporary folder and renames it), so a
  process killed mid-save leaves the previous checkpoints intact. `restore_latest` falls back
  to older checkpoints when the newest cannot be read, logging what it skipped.
  """

  def __init__(self, directory: str, keep: int = 3):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=False)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def all_steps(self) -> list[int]:
    self.manager.reload()
    return sorted(self.manager.all_steps())

  def save(self, step: int, state: Any, data_iterator: Any | None) -> None:
    """Writes `state` (a pytree of arrays) and the grain iterator state at `step`.

    An existing checkpoint of the same step (one `restore_latest` skipped as unreadable, which
    the resumed run has now reached again) is replaced.
    """
    from effx.data import iterator_checkpoint_args
    if step in self.all_steps():  # e.g. an unreadable one that restore_latest skipped
      log.warning("replacing the existing checkpoint step %d in %s", step, self.directory)
      self.manager.delete(step)
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items["data"] = iterator_checkpoint_args(data_iterator, restore=False)
    self.manager.save(step, args=ocp.args.Composite(**items), force=True)
    self.manager.wait_until_finished()

  def restore_latest(self, abstract_state: Any, data_iterator: Any | None
                     ) -> tuple[int, Any] | None:
    """Restores the newest readable checkpoint into `abstract_state`'s shapes and shardings.

    The data iterator (if given) is restored in place. Returns (step, state), or None when no
    checkpoint exists. Unreadable checkpoints are skipped with a warning naming them.
    """
    from effx.data import iterator_checkpoint_args
    for step in reversed(self.all_steps()):
      items = {"state": ocp.args.StandardRestore(abstract_state)}
      if data_iterator is not None:
        items["data"] = iterator_checkpoint_args(data_iterator, restore=True)
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
      except Exception as err:  # corrupt or truncated checkpoint: try an older one
        log.warning("checkpoint step %d in %s is unreadable (%s: %s); falling back to an older one",
                    step, self.directory, type(err).__name__, str(err).splitlines()[0][:200])
        print(f"WARNING: skipped unreadable checkpoint step {step} in {self.directory} "
              f"({type(err).__name__})", flush=True)
        continue
      return step, restored["state"]
    return None

  def close(self) -> None:
    self.manager.close()
