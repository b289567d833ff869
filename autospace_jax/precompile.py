"""Compile the supernet's programs on background threads while training runs.

The supernet runs every op of the sampled cells as its own small jitted program (see
supernet.py): a few hundred programs in all, each compiled the first time its op kind and
shape is reached (0.05-0.3 s each on XLA:CPU). Rather than stop the training loop for
each one, a `Precompiler` compiles them ahead, in compile-only passes
(`SupernetTrainer.compile_path`: the step's programs are lowered and compiled, none of
them runs; only the batch's copy to the devices and a few local scalar and zeros
computations do, none with a collective, so the passes are safe on any mesh and on every
host), on worker threads: first (stage 1) the first step's own path, then one path
through each of the current candidates, which the loop waits for (each step only for the
earliest pass over each of its cells); then (stage 1) a few paths that together make
every program call a feasible cell of each layer can make, so the cells that mutation
brings in later find their programs compiled. Used as a context manager, it drops
unstarted passes on exit.
"""

from __future__ import annotations

import concurrent.futures
import functools
import itertools
import logging
import threading
import time
from typing import Any, Callable, Iterator, Sequence

from autospace_jax import supernet

Cell = tuple  # (layer index, genome, train_alpha)
# (state, batch, candidates, path, train_alpha) -> None: compiles a step's programs, e.g.
# `SupernetTrainer.compile_path`.
CompilePass = Callable[[Any, dict, Sequence[Sequence[supernet.Op]], Sequence[int], bool],
                       None]


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


def covering_paths(layer_genomes: Sequence[Sequence[supernet.Op]]
                   ) -> list[list[supernet.Op]]:
  """Paths (one genome per layer) whose cells make every call of `covering_cells` in every
  layer; layers with fewer covering cells repeat their last one."""
  covers = [covering_cells(genomes) for genomes in layer_genomes]
  return [[cover[min(p, len(cover) - 1)] for cover in covers]
          for p in range(max(map(len, covers), default=0))]


def first_batch(data: Iterator[dict]) -> tuple[dict, Iterator[dict]]:
  """The next batch, and the iterator with it put back: passes need a batch's shapes
  before the first step takes it."""
  batch = next(data)
  return batch, itertools.chain([batch], data)


class Precompiler:
  """Queues compile-only passes over supernet paths on ``threads`` worker threads
  (0: none; every program then compiles when a step first calls it)."""

  def __init__(self, compile_pass: CompilePass, threads: int):
    self._compile_pass = compile_pass
    self._threads = threads
    self._pool: concurrent.futures.ThreadPoolExecutor | None = None
    self._lock = threading.Lock()
    self._compiled: set[Cell] = set()
    self._queued: list[tuple[set[Cell], concurrent.futures.Future]] = []
    self.seconds_waited = 0.0  # the training loop's time spent waiting in `wait_for`

  def submit(self, state: supernet.TrainState, batch: dict,
             candidates: Sequence[Sequence[supernet.Op]], path: Sequence[int],
             train_alpha: bool) -> None:
    """Queue a pass that compiles what a step on ``path`` would call; ``state`` and
    ``batch`` give the shapes only."""
    if self._threads:
      self._submit(self._open_pool(), state, batch, candidates, path, train_alpha,
                   waited_for=True)

  def submit_candidates(self, state: supernet.TrainState, batch: dict,
                        candidates: Sequence[Sequence[supernet.Op]], train_alpha: bool
                        ) -> None:
    """Queue one pass per candidate index: together they compile every candidate."""
    for j in range(max(map(len, candidates), default=0)):
      self.submit(state, batch, candidates, [min(j, len(c) - 1) for c in candidates],
                  train_alpha)

  def submit_covering(self, state: supernet.TrainState, batch: dict,
                      layer_genomes: Sequence[Sequence[supernet.Op]], num_candidates: int
                      ) -> None:
    """Queue passes over `covering_paths` of ``layer_genomes``, with α trained, to start
    once the passes queued so far are done: those are for the steps about to run, these
    for cells to come, and on few cores they would only slow those down. Steps never
    wait for these: a step that needs one of their programs first compiles it itself."""
    if not self._threads:
      return
    pool = self._open_pool()
    paths = covering_paths(layer_genomes)
    with self._lock:
      earlier = [f for _, f in self._queued]

    def queue_when_earlier_done():
      concurrent.futures.wait(earlier)
      for path in paths:
        self._submit(pool, state, batch, [[g] * num_candidates for g in path],
                     [0] * len(path), True, waited_for=False)

    threading.Thread(target=queue_when_earlier_done, daemon=True).start()

  def _open_pool(self) -> concurrent.futures.ThreadPoolExecutor:
    if self._pool is None:
      self._pool = concurrent.futures.ThreadPoolExecutor(self._threads,
                                                         "autospace-precompile")
    return self._pool

  def _submit(self, pool: concurrent.futures.ThreadPoolExecutor, state: Any, batch: Any,
              candidates: Sequence[Sequence[supernet.Op]], path: Sequence[int],
              train_alpha: bool, waited_for: bool) -> None:
    cells = _path_cells(candidates, path, train_alpha)
    try:
      future = pool.submit(self._compile_pass, state, batch, candidates, path,
                           train_alpha)
    except RuntimeError:  # closed since the pass was planned
      return
    future.add_done_callback(functools.partial(self._finished, cells))
    if waited_for:
      with self._lock:
        self._queued.append((cells, future))

  def _finished(self, cells: set[Cell], future: concurrent.futures.Future) -> None:
    if future.cancelled():
      return
    if future.exception() is not None:
      # The step that needs these programs compiles them itself (and raises if it fails).
      logging.warning("precompiling a supernet path failed: %r", future.exception())
      return
    with self._lock:
      self._compiled |= cells

  def wait_for(self, candidates: Sequence[Sequence[supernet.Op]], path: Sequence[int],
               train_alpha: bool) -> None:
    """Before a step on ``path``: wait for queued passes that compile its cells, instead
    of compiling them a second time on this thread."""
    cells = _path_cells(candidates, path, train_alpha)
    with self._lock:
      missing = cells - self._compiled
      self._queued = [(c, f) for c, f in self._queued if not f.done()]
      needed = []
      for queued_cells, future in self._queued:  # the earliest pass compiling each cell
        if queued_cells & missing:
          needed.append(future)
          missing -= queued_cells
    if needed:
      start = time.perf_counter()
      concurrent.futures.wait(needed)
      self.seconds_waited += time.perf_counter() - start
    with self._lock:
      self._compiled |= cells  # the step compiles whatever is still missing

  def __enter__(self) -> "Precompiler":
    return self

  def __exit__(self, *exc_info: Any) -> None:
    self.close()

  def close(self) -> None:
    """Drop passes not yet started (one already running finishes in the background)."""
    if self._pool is not None:
      self._pool.shutdown(wait=False, cancel_futures=True)
      self._pool = None
      with self._lock:
        self._queued = []
