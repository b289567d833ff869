"""Checkpoints that survive preemption: an Orbax wrapper plus a SIGTERM stop flag.

A NAS run on preemptible TPUs must never lose more than a few steps of work, so:

- `Checkpointer` saves two items per step with `ocp.CheckpointManager`: `arrays` (a pytree
  of jax/numpy arrays, optax states included) and `meta` (a JSON dict: populations,
  genomes, RNG state as lists, data position). Saves are asynchronous by default; `wait()`
  blocks until they are on disk.
- The meta is restored before the arrays because the parameter tree may depend on it (the
  genomes decide the shapes); the caller builds the abstract target from the meta.
- `restore_latest` skips a newest checkpoint that is partial or corrupt (a host died while
  writing, a file was truncated) with a warning and falls back to the one before. If
  none can be read it raises instead of letting the run start afresh and, through
  `max_to_keep`, delete the checkpoints a fix could still restore. Once every host has
  fallen back to the same step, `restore_or_init` deletes the unreadable newer ones, so
  that the steps trained again are saved again.
- A SIGTERM only sets a flag (saving inside a signal handler could deadlock on the locks
  the interrupted code holds). The training loop polls `should_stop()` after every step,
  saves with `force=True`, waits, and raises `Preempted`; `main` prints where and exits 143.
"""

from __future__ import annotations

import itertools
import logging
import os
import signal
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

if TYPE_CHECKING:
  from autospace_jax.parallel import DataParallel

ARRAYS = 'arrays'
META = 'meta'


class Preempted(Exception):
  """Raised by a training loop after it saved a checkpoint because of a preemption."""

  def __init__(self, directory: str, step: int):
    super().__init__(f'preempted at step {step}; checkpoint in {directory}')
    self.directory = directory
    self.step = step


class CheckpointError(RuntimeError):
  """Checkpoints exist but none of them can be restored."""


class _Manager(ocp.CheckpointManager):
  """A CheckpointManager that leaves JAX's preemption sync to `should_stop`.

  Orbax would report each save's step to the sync, overwriting the ids `should_stop`
  gives it with a loop's own step, which restarts in every loop (see `_sync_ids`). A
  preemption save needs no help from Orbax: `save_on_schedule` forces it.
  """

  def reached_preemption(self, step: int) -> bool:
    del step
    return False


class Checkpointer:
  """Numbered checkpoints of (arrays, meta) in `directory`, the newest `max_to_keep` kept."""

  def __init__(self, directory: str, max_to_keep: int = 3, async_save: bool = True):
    directory = str(directory)
    # Orbax writes arrays only under absolute paths; a relative workdir (the default
    # ./runs/<timestamp>) is taken from the current directory. URLs (gs://) stay as given.
    self.directory = directory if "://" in directory else os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                           enable_async_checkpointing=async_save)
    self._manager = _Manager(
        self.directory, options=options,
        item_handlers={ARRAYS: ocp.StandardCheckpointHandler(),
                       META: ocp.JsonCheckpointHandler()})

  def save(self, step: int, arrays: Any, meta: dict, force: bool = False) -> bool:
    """Starts saving `step`; False when nothing was saved.

    A step that is already saved is left as it is (a loop may save a step on schedule and
    again on preemption), and without `force` the manager's save policy may skip a step.
    """
    if step in self._manager.all_steps():
      return False
    return self._manager.save(
        step, args=ocp.args.Composite(**{ARRAYS: ocp.args.StandardSave(arrays),
                                         META: ocp.args.JsonSave(meta)}),
        force=force)

  def wait(self) -> None:
    """Blocks until every started save is complete on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases the manager's resources."""
    self._manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc_info: Any) -> None:
    self.close()  # a save still in flight completes, also when the loop raised

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> Sequence[int]:
    return self._manager.all_steps()

  def restore_meta(self, step: int) -> dict:
    return self._manager.restore(
        step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[META]

  def restore_arrays(self, step: int, abstract_arrays: Any) -> Any:
    """The arrays of `step` with the structure, dtypes and shardings of `abstract_arrays`.

    Build the target with `jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)` or with
    `jax.ShapeDtypeStruct(shape, dtype, sharding=...)` leaves to restore onto a mesh;
    without a target optax states would come back as plain lists and dicts.
    """
    return self._manager.restore(
        step, args=ocp.args.Composite(**{ARRAYS: ocp.args.StandardRestore(abstract_arrays)})
    )[ARRAYS]

  def restore_latest(
      self, make_abstract: Callable[[dict], Any]) -> tuple[int, Any, dict] | None:
    """(step, arrays, meta) of the newest readable checkpoint; None when there is none.

    `make_abstract(meta)` returns the abstract target for that step's arrays. A checkpoint
    that fails to read is logged as a warning and the previous one is tried. When
    checkpoints exist but none can be read, CheckpointError is raised rather than None
    returned: the same error at every step usually means a target that no longer matches
    the code, and starting afresh would let `max_to_keep` delete the saved work.
    """
    steps = sorted(self._manager.all_steps(), reverse=True)
    for step in steps:
      try:
        meta = self.restore_meta(step)
        arrays = self.restore_arrays(step, make_abstract(meta))
      except Exception as e:  # noqa: BLE001 -- any unreadable checkpoint is skipped.
        logging.warning('checkpoint step %d in %s is unreadable (%s: %s); trying an older one',
                        step, self.directory, type(e).__name__, e)
        error = e
        continue
      return step, arrays, meta
    if steps:
      raise CheckpointError(
          f'none of the checkpoints {steps} in {self.directory} can be restored; the last '
          f'error was {type(error).__name__}: {error}. Fix the cause, or move the directory '
          'away to start afresh.') from error
    return None

  def save_on_schedule(self, step: int, arrays: Any, meta: Callable[[], dict],
                       every_steps: int, total_steps: int,
                       before_save: Callable[[], None] = lambda: None) -> None:
    """A training loop's checkpoint call after each step: saves every `every_steps` and
    at the last step; after a SIGTERM saves now, waits, and raises `Preempted`. ``meta``
    builds the JSON record only when a save is due (stage 1's takes milliseconds);
    ``before_save`` runs first (it may raise to stop a bad state from being saved)."""
    if step % every_steps == 0 or step == total_steps:
      before_save()
      self.save(step, arrays, meta(), force=step == total_steps)
    if should_stop():
      before_save()
      self.save(step, arrays, meta(), force=True)
      self.wait()
      raise Preempted(self.directory, step)

  def restore_or_init(self, init: Callable[[], Any], parallel: DataParallel, name: str
                      ) -> tuple[int, Any, dict | None]:
    """(step, state, meta) of the newest checkpoint, restored replicated over the mesh
    into the structure `init` builds; `(0, init(), None)` when there is none yet. Every
    process must call it: they check that they all resume from the same step."""
    restored = None
    if self._manager.all_steps():
      abstract = jax.tree.map(
          lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=parallel.replicated),
          jax.eval_shape(init))
      restored = self.restore_latest(lambda meta: abstract)
    check_same_step_on_every_host(0 if restored is None else restored[0], self.directory)
    if restored is None:
      return 0, init(), None
    step, state, meta = restored
    self._remove_steps_after(step)
    logging.info('%s: resuming from step %d', name, step)
    return step, parallel.replicate(state), meta

  def _remove_steps_after(self, step: int) -> None:
    """Delete the unreadable checkpoints newer than ``step``, the one every host restored:
    Orbax saves no step at or below its newest, so keeping them would skip every save,
    the preemption save included, until training passed them again. A collective."""
    for newer in sorted(s for s in self._manager.all_steps() if s > step):
      logging.warning('removing the unreadable checkpoint step %d in %s: the run resumes '
                      'from step %d and saves the steps after it again', newer,
                      self.directory, step)
      self._manager.delete(newer)


def check_same_step_on_every_host(step: int, directory: str) -> None:
  """Raise `CheckpointError` unless every process resumes from ``step``: a host that could
  not read the newest checkpoint (a transient error) falls back on its own, and resuming
  then would train from different weights and data positions. A collective."""
  if jax.process_count() == 1:
    return
  steps = np.asarray(multihost_utils.process_allgather(np.int32(step))).tolist()
  if len(set(steps)) > 1:
    raise CheckpointError(
        f'the processes restored different steps {steps} (by process index) from '
        f'{directory}; some could not read the newest checkpoint. Check the warnings above, '
        'fix the storage, and rerun.')


_preemption = threading.Event()
# The step id `should_stop` gives JAX's preemption sync: its call number, which only grows
# within the process, where each loop's own step restarts at 0 (the sync point, max + 1 of
# the ids reported when a notice arrives, would then never be reached by a later loop).
_sync_ids = itertools.count(1)


def install_sigterm_handler(callback: Callable[[], None] | None = None) -> None:
  """On SIGTERM set the flag read by `preemption_requested`, then call `callback`.

  `callback` runs inside the signal handler: keep it short (log, print), never save there.
  In a multi-process job with JAX's preemption service on (the default after
  `jax.distributed.initialize`), the service's own SIGTERM handler must stay in place for
  `should_stop` to agree on a step across hosts, so nothing is installed.
  """
  if jax.process_count() > 1 and jax.config.jax_enable_preemption_service:
    logging.info('SIGTERM is handled by the JAX preemption service')
    return

  def handler(signum, frame):
    del signum, frame
    _preemption.set()
    if callback is not None:
      callback()

  signal.signal(signal.SIGTERM, handler)


def preemption_requested() -> bool:
  """Whether this process received SIGTERM since the handler was installed or cleared."""
  return _preemption.is_set()


def clear_preemption() -> None:
  _preemption.clear()


def should_stop() -> bool:
  """Whether the loop should save and stop after its current step; the same on every host.

  One process: the local SIGTERM flag. Several: JAX's preemption sync point, which picks a
  call that every host reaches, or, with the preemption service off, an all-gather of the
  local flags (any host preempted stops them all). Either way every process must call
  this after every step of every loop, so that the hosts' call counts agree.
  """
  if jax.process_count() == 1:
    return preemption_requested()
  try:
    return multihost_utils.reached_preemption_sync_point(next(_sync_ids))
  except RuntimeError:  # jax_enable_preemption_service is off.
    flags = multihost_utils.process_allgather(np.int32(preemption_requested()))
    return bool(np.any(flags))
