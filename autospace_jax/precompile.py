"""Compile the supernet's programs on background threads while training runs.

The supernet runs every op of the sampled cells as its own small jitted program (see
supernet.py): a few hundred programs in all, each compiled the first time its op kind and
shape is reached (0.05-0.3 s each on XLA:CPU; a later process loads what passes compiled
from `program_store`, ~2 ms each). Rather than stop the training loop for
each one, a `Precompiler` compiles them ahead, in compile-only passes
(`SupernetTrainer.compile_path`: the step's programs are lowered and compiled from the
shapes of the state and batch, and nothing runs on the devices, so the passes are safe on
any mesh and on every host, and a queued pass keeps no device memory alive), on worker
threads. Passes the loop waits for (each step only for the earliest pass over each of its
cells) come first: the first step's own path, one path through each of the current
candidates, and in stage 1 the cells each coming evolution round is likely to bring in
(`SpaceSearch.precompile_next_round`). Covering passes for stage 1's later cells,
queued after its first step, run when none of those is queued: together they make every
program call a feasible cell of each layer can make. Used as a context manager, it drops
unstarted passes on exit.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import threading
import time
from typing import Any, Callable, Sequence

from autospace_jax import supernet

Cell = tuple  # (layer index, genome, train_alpha)
# (state, batch, candidates, path, train_alpha, cancelled=...) -> None: compiles a step's
# programs, e.g. `SupernetTrainer.compile_path`; stops once ``cancelled()`` is true.
CompilePass = Callable[..., None]


def _path_cells(candidates: Sequence[Sequence[supernet.Op]], path: Sequence[int],
                train_alpha: bool) -> set[Cell]:
  return {(i, ops[c], train_alpha) for i, (ops, c) in enumerate(zip(candidates, path))}


def covering_cells(genomes: Sequence[supernet.Op]) -> list[supernet.Op]:
  """A few of ``genomes`` that together make every program call any of them makes
  (`supernet.cell_calls`), chosen greedily: the one adding the most new calls first."""
  calls = {g: frozenset(supernet.cell_calls(g)) for g in genomes}
  uncovered = set().union(*calls.values())
  chosen = []
  while uncovered:
    best = max(genomes, key=lambda g: len(uncovered & calls[g]))
    chosen.append(best)
    uncovered -= calls[best]
  return chosen


@dataclasses.dataclass(eq=False)
class _Pass:
  """A queued compile-only pass: its arguments, the cells it compiles, its outcome."""

  args: tuple  # (state, batch, candidates, path, train_alpha); shapes, not arrays
  cells: set
  waited_for: bool
  future: concurrent.futures.Future = dataclasses.field(
      default_factory=concurrent.futures.Future)


class Precompiler:
  """Runs compile-only passes over supernet paths on ``threads`` worker threads (0: none;
  every program then compiles when a step first calls it).

  Passes the loop may wait for run first, in the order queued; covering passes (for cells
  to come) only while none of those is queued or running: on few cores they would only
  slow down the passes that steps are waiting for.
  """

  def __init__(self, compile_pass: CompilePass, threads: int):
    self._compile_pass = compile_pass
    self._threads = threads
    self._changed = threading.Condition()  # guards the fields below
    self._workers: list[threading.Thread] = []
    self._generation = 0  # `close` ends a generation of workers and passes
    self._waited_for: collections.deque[_Pass] = collections.deque()  # not started
    self._covering: collections.deque[_Pass] = collections.deque()  # not started
    self._running_waited_for = 0
    self._compiled: set[Cell] = set()
    self._queued: list[_Pass] = []  # waited-for passes, until a `wait_for` sees them done
    self.seconds_waited = 0.0  # the training loop's time spent waiting in `wait_for`

  def submit(self, state: supernet.TrainState, batch: dict,
             candidates: Sequence[Sequence[supernet.Op]], path: Sequence[int],
             train_alpha: bool) -> None:
    """Queue a pass that compiles what a step on ``path`` would call (unless every cell on
    it is compiled or queued already). ``state`` and ``batch`` are `supernet.shapes_of`
    them, made once by the caller: a queued pass holds no arrays."""
    cells = _path_cells(candidates, path, train_alpha)
    with self._changed:
      if cells <= self._compiled.union(*(p.cells for p in self._queued)):
        return
    self._enqueue(_Pass((state, batch, candidates, path, train_alpha), cells, True))

  def submit_candidates(self, state: supernet.TrainState, batch: dict,
                        candidates: Sequence[Sequence[supernet.Op]], train_alpha: bool
                        ) -> None:
    """Queue one pass per candidate index: together they compile every candidate."""
    for j in range(max(map(len, candidates), default=0)):
      self.submit(state, batch, candidates, [min(j, len(c) - 1) for c in candidates],
                  train_alpha)

  def submit_covering(self, state: supernet.TrainState, batch: dict,
                      candidates: Sequence[Sequence[supernet.Op]],
                      layer_genomes: Sequence[Sequence[supernet.Op]]) -> None:
    """Queue passes that together make every program call of `covering_cells` of
    ``layer_genomes``, with α trained. Each compiles one layer's covering cell, the other
    layers running ``candidates`` (whose programs the passes before compile), so that
    each pass is short: one does not hold a thread long once a pass that steps wait for
    is queued. Steps never wait for these: a step that needs one of their programs
    first compiles it itself."""
    if not self._threads:
      return
    covers = [covering_cells(genomes) for genomes in layer_genomes]
    for rank in range(max(map(len, covers), default=0)):  # every layer's best cells first
      for layer, cover in enumerate(covers):
        if rank < len(cover):
          cells = [list(ops) for ops in candidates]
          cells[layer] = [cover[rank]] * len(cells[layer])
          path = [0] * len(cells)
          self._enqueue(_Pass((state, batch, cells, path, True),
                              _path_cells(cells, path, True), False))

  def _enqueue(self, queued: _Pass) -> None:
    if not self._threads:
      return
    with self._changed:
      if queued.waited_for:
        self._waited_for.append(queued)
        self._queued.append(queued)
      else:
        self._covering.append(queued)
      while len(self._workers) < self._threads:
        worker = threading.Thread(target=self._work, args=(self._generation,),
                                  name=f"autospace-precompile-{len(self._workers)}")
        worker.start()
        self._workers.append(worker)
      self._changed.notify()

  def _next(self, generation: int) -> _Pass | None:
    """The pass to run next, once there is one; None once ``generation`` is closed."""
    with self._changed:
      while generation == self._generation:
        if self._waited_for:
          self._running_waited_for += 1
          return self._waited_for.popleft()
        if self._covering and not self._running_waited_for:
          return self._covering.popleft()
        self._changed.wait()
      return None

  def _work(self, generation: int) -> None:
    while (queued := self._next(generation)) is not None:
      try:
        if queued.future.set_running_or_notify_cancel():
          self._run(queued, lambda: generation != self._generation)
      finally:
        if queued.waited_for:
          with self._changed:
            self._running_waited_for -= 1
            self._changed.notify_all()

  def _run(self, queued: _Pass, cancelled: Callable[[], bool]) -> None:
    """Run a pass, which stops at its next program once ``cancelled()`` (its generation
    closed). A pass that fails leaves its programs to the steps that need them, which
    compile them themselves (and raise if that fails)."""
    try:
      self._compile_pass(*queued.args, cancelled=cancelled)
    except concurrent.futures.CancelledError as error:
      queued.future.set_exception(error)
      return
    except BaseException as error:  # pylint: disable=broad-except
      # Even a SystemExit: raised here it would only end this thread, silently.
      logging.warning("precompiling a supernet path failed: %r", error)
      queued.future.set_exception(error)
      return
    with self._changed:
      self._compiled |= queued.cells
    queued.future.set_result(None)

  def wait_for(self, candidates: Sequence[Sequence[supernet.Op]], path: Sequence[int],
               train_alpha: bool) -> None:
    """Before a step on ``path``: wait for queued passes that compile its cells, instead
    of compiling them a second time on this thread."""
    cells = _path_cells(candidates, path, train_alpha)
    with self._changed:
      missing = cells - self._compiled
      self._queued = [p for p in self._queued if not p.future.done()]
      needed = []
      for queued in self._queued:  # the earliest pass compiling each cell
        if queued.cells & missing:
          needed.append(queued.future)
          missing -= queued.cells
    if needed:
      start = time.perf_counter()
      concurrent.futures.wait(needed)
      self.seconds_waited += time.perf_counter() - start
    with self._changed:
      self._compiled |= cells  # the step compiles whatever is still missing

  def __enter__(self) -> "Precompiler":
    return self

  def __exit__(self, *exc_info: Any) -> None:
    self.close()

  def close(self) -> None:
    """Drop passes not yet started, stop running ones at their next program and drop their
    compiles not yet started (`supernet.cancel_queued_compiles`)."""
    with self._changed:
      for queued in (*self._waited_for, *self._covering):
        queued.future.cancel()
      self._waited_for.clear()
      self._covering.clear()
      self._queued = []
      self._workers = []
      self._generation += 1
      self._changed.notify_all()
    supernet.cancel_queued_compiles()
