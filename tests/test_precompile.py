"""Background precompiling: the programs a step needs are compiled before it runs, the loop
waits only for what its path needs, and results do not depend on it."""

import concurrent.futures
import copy
import json
import logging
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from autospace_jax import genome as genome_lib
from autospace_jax import precompile
from autospace_jax import program_store
from autospace_jax import space_search
from autospace_jax import supernet
from conftest import short_schedule, tiny_config
from test_supernet import ATTENTION_CELL, batch, candidates_for, make_trainer, step

ROOT = Path(__file__).resolve().parents[1]
OP_PROGRAMS = ("jit(forward)", "jit(apply)", "jit(<lambda>)", "jit(_backward)",
               "jit(_backward_to_inputs)",
               "jit(backward_update)", "jit(update)", "jit(add_all)", "jit(_gate_vjp)",
               "jit(_subsample_vjp)", "jit(_cross_entropy_and_grad)")


def compiled_programs():
  """Names of the programs compiled on this thread from now on (without the salt that
  `program_store.renamed` adds to stored programs' names)."""
  names = []
  thread = threading.current_thread()
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, duration, **kw: names.append(
          kw.get("fun_name").replace(f"_{program_store.salt()}", ""))
      if event == "/jax/core/compile/backend_compile_duration"
      and threading.current_thread() is thread else None)
  return names


@pytest.mark.parametrize("estimator", ["sampled", "proxyless"])
def test_after_a_compile_only_pass_a_step_on_that_path_compiles_no_supernet_program(
    estimator):
  spec, trainer = make_trainer(estimator)
  state = trainer.init(0, 3)
  # One real step compiles what every step shares; the other cells stay uncompiled.
  state, _ = step(trainer, state, [[genome_lib.irb(3, 3)] * 3 for _ in spec.layers],
                  [0] * 6, 0)
  cands = candidates_for(spec)
  path = [0, 1, 2, 2, 1, 0]
  trainer.compile_path(trainer.init(1, 3), batch(5), cands, path, True)
  names = compiled_programs()
  state, _ = step(trainer, state, cands, path, 1)
  jax.block_until_ready(state)
  assert [n for n in names if n in OP_PROGRAMS] == []


@pytest.mark.parametrize("estimator", ["sampled", "proxyless"])
def test_after_a_compile_only_pass_the_first_step_of_a_trainer_compiles_nothing(estimator):
  # Not even the step's glue: the metrics, the learning rate and step count, α's update.
  # The pass gets shapes only, as the precompile threads give it.
  spec, trainer = make_trainer(estimator)
  cands = candidates_for(spec)
  path = [0, 1, 2, 2, 1, 0]
  state = trainer.init(0, 3)
  trainer.compile_path(supernet.shapes_of(state), supernet.shapes_of(batch(5)), cands, path,
                       True)
  names = compiled_programs()
  state, _ = step(trainer, state, cands, path, 1)
  jax.block_until_ready(state)
  assert names == []


def test_a_compile_only_pass_tells_apart_two_identical_ops_on_one_input():
  # Edges 0>1 and 0>2 run the same program on the same node: the pass must tape both
  # outputs (and compile the sum of their cotangents) as a step does.
  identity, none = genome_lib.IDENTITY, genome_lib.NONE
  fork = genome_lib.Genome((3, 3, identity, none, none, identity), 2, (1, 1))
  spec, trainer = make_trainer()
  state = trainer.init(0, 3)
  state, _ = step(trainer, state, [[genome_lib.irb(3, 3)] * 3 for _ in spec.layers],
                  [0] * 6, 0)
  cands = [[fork] * 3 for _ in spec.layers]
  trainer.compile_path(trainer.init(1, 3), batch(5), cands, [0] * 6, True)
  names = compiled_programs()
  state, _ = step(trainer, state, cands, [0] * 6, 1)
  jax.block_until_ready(state)
  assert [n for n in names if n in OP_PROGRAMS] == []


_ON_EIGHT_DEVICES = textwrap.dedent('''
    import json, threading
    import jax
    from autospace_jax.parallel import DataParallel
    from test_precompile import OP_PROGRAMS, compiled_programs
    from test_supernet import batch, candidates_for, make_trainer, step

    spec, trainer = make_trainer(parallel=DataParallel())
    state = trainer.init(0, 3)
    cands = candidates_for(spec)
    state, _ = step(trainer, state, cands, [0] * 6, 0)
    pass_thread = threading.Thread(target=trainer.compile_path,
                                   args=(state, batch(1), cands, [1, 2, 1, 2, 1, 2], True))
    pass_thread.start()
    pass_thread.join()
    names = compiled_programs()
    state, _ = step(trainer, state, cands, [1, 2, 1, 2, 1, 2], 1)
    jax.block_until_ready(state)
    print(json.dumps({"devices": len(state.alpha.sharding.device_set),
                      "compiled": [n for n in names if n in OP_PROGRAMS]}))
''')


def test_a_pass_on_another_thread_compiles_the_programs_of_an_eight_device_step():
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
         "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
         "PJRT_NPROC": "16"}  # see test_data_parallel.py
  result = subprocess.run([sys.executable, "-c", _ON_EIGHT_DEVICES], env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-5000:]
  out = json.loads(result.stdout.strip().splitlines()[-1])
  assert out == {"devices": 8, "compiled": []}


def test_a_compile_only_pass_changes_no_state():
  spec, trainer = make_trainer()
  state = trainer.init(0, 3)
  before = jax.device_get(state)
  trainer.compile_path(state, batch(0), candidates_for(spec), [2] * 6, True)
  after = jax.device_get(state)
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
    assert (a == b).all()


def test_covering_cells_make_every_call_any_genome_makes():
  genomes = list(genome_lib.all_genomes((1, 2, 3, 5)))
  chosen = precompile.covering_cells(genomes)
  assert set(chosen) <= set(genomes)
  assert len(chosen) < 30  # a few paths, not thousands
  made = set().union(*(supernet.cell_calls(g) for g in chosen))
  assert made == set().union(*(supernet.cell_calls(g) for g in genomes))


def test_covering_passes_compile_one_layers_covering_cell_each_the_best_cells_first():
  layers = [[genome_lib.irb(3, 6), genome_lib.irb(5, 3), ATTENTION_CELL],
            [genome_lib.irb(3, 6)]]
  candidates = [[genome_lib.irb(7, 6)] * 2, [genome_lib.irb(7, 3)] * 2]
  trainer = RecordingTrainer(with_candidates=True)
  precompiler = precompile.Precompiler(trainer.compile_path, threads=1)
  precompiler.submit_covering(None, None, candidates, layers)
  deadline = time.monotonic() + 30
  covers = [precompile.covering_cells(genomes) for genomes in layers]
  while len(trainer.paths) < sum(map(len, covers)) and time.monotonic() < deadline:
    time.sleep(0.01)
  precompiler.close()
  passes = [cells for cells, _, _ in trainer.paths]
  assert {p[0][0] for p in passes if p[1] == candidates[1]} == set(covers[0])
  assert {p[1][0] for p in passes if p[0] == candidates[0]} == set(covers[1])
  assert all(len(set(ops)) == 1 for p in passes for ops in p)  # one cell per layer
  assert passes[0][0][0] == covers[0][0] and passes[1][1][0] == covers[1][0]
  assert all(path == [0, 0] and alpha for _, path, alpha in trainer.paths)


class BlockingTrainer:
  """Stands in for the trainer to hold a pass open until the test releases it."""

  def __init__(self, fail=False):
    self.release = threading.Event()
    self.fail = fail

  def compile_path(self, state, batch, candidates, path, train_alpha, cancelled=None):
    self.release.wait(timeout=30)
    if self.fail:
      raise RuntimeError("compile failed")


CELLS = [[genome_lib.irb(3, 6), genome_lib.irb(5, 3)]] * 2


def test_the_loop_waits_for_a_queued_pass_over_its_cells_and_not_for_others():
  trainer = BlockingTrainer()
  precompiler = precompile.Precompiler(trainer.compile_path, threads=1)
  precompiler.submit(None, None, CELLS, [0, 0], False)
  # Cells no queued pass compiles: nothing to wait for.
  precompiler.wait_for(CELLS, [1, 1], False)
  waiter = threading.Thread(target=precompiler.wait_for, args=(CELLS, [0, 1], False))
  waiter.start()
  waiter.join(timeout=0.5)
  assert waiter.is_alive()  # layer 0's cell is in the pass still held open
  trainer.release.set()
  waiter.join(timeout=30)
  assert not waiter.is_alive()
  precompiler.close()


class PathGatedTrainer:
  """Stands in for the trainer; each path's pass is held until its event is set."""

  def __init__(self, *paths):
    self.release = {path: threading.Event() for path in paths}

  def compile_path(self, state, batch, candidates, path, train_alpha, cancelled=None):
    self.release[tuple(path)].wait(timeout=30)


def test_the_loop_waits_only_for_the_earliest_pass_over_each_of_its_cells():
  trainer = PathGatedTrainer((0, 1), (1, 1))
  precompiler = precompile.Precompiler(trainer.compile_path, threads=2)
  precompiler.submit(None, None, CELLS, [0, 1], False)  # the first step's own path
  precompiler.submit(None, None, CELLS, [1, 1], False)  # shares layer 1's cell with it
  trainer.release[0, 1].set()
  waiter = threading.Thread(target=precompiler.wait_for, args=(CELLS, [0, 1], False))
  waiter.start()
  waiter.join(timeout=10)
  assert not waiter.is_alive()  # the later pass over layer 1's cell is still held open
  trainer.release[1, 1].set()
  precompiler.close()


def test_a_failed_pass_is_logged_and_the_step_compiles_for_itself(caplog):
  trainer = BlockingTrainer(fail=True)
  trainer.release.set()
  precompiler = precompile.Precompiler(trainer.compile_path, threads=1)
  with caplog.at_level(logging.WARNING):
    precompiler.submit(None, None, CELLS, [0, 0], False)
    precompiler.wait_for(CELLS, [0, 0], False)
  assert "precompiling a supernet path failed" in caplog.text
  precompiler.close()


class RecordingTrainer:
  """Stands in for the trainer to record which paths passes were queued for."""

  def __init__(self, with_candidates=False):
    self.paths = []
    self.with_candidates = with_candidates

  def compile_path(self, state, batch, candidates, path, train_alpha, cancelled=None):
    self.paths.append((candidates, list(path), train_alpha) if self.with_candidates
                      else (list(path), train_alpha))


def test_candidate_passes_together_compile_every_candidate_of_every_layer():
  trainer = RecordingTrainer()
  precompiler = precompile.Precompiler(trainer.compile_path, threads=1)
  ragged = [[genome_lib.irb(3, 6), genome_lib.irb(5, 3), ATTENTION_CELL],
            [genome_lib.irb(3, 6)]]
  precompiler.submit_candidates(None, None, ragged, True)
  precompiler.wait_for(ragged, [2, 0], True)
  precompiler.wait_for(ragged, [1, 0], True)
  precompiler.close()
  assert sorted(trainer.paths) == [([0, 0], True), ([1, 0], True), ([2, 0], True)]


def test_no_threads_means_no_passes():
  trainer = BlockingTrainer()
  precompiler = precompile.Precompiler(trainer.compile_path, threads=0)
  precompiler.submit(None, None, CELLS, [0, 0], False)
  precompiler.wait_for(CELLS, [0, 0], False)  # would block if a pass had been queued
  assert precompiler.seconds_waited == 0.0


def test_stage_one_learns_the_same_space_with_and_without_precompile_threads(tmp_path):
  outputs = []
  for threads in (0, 2):
    config = short_schedule(tiny_config(), warmup=0.1, main=0.3)
    config.precompile_threads = threads
    workdir = tmp_path / f"threads{threads}"
    space_search.SpaceSearch(config, str(workdir)).run()
    outputs.append(json.loads((workdir / "space" / space_search.SPACE_JSON).read_text()))
  assert outputs[0] == outputs[1]


def recorded_stage_one(tmp_path, with_candidates=False):
  """A tiny stage 1 whose precompiler records its passes: (search, trainer, run, state)."""
  search = space_search.SpaceSearch(tiny_config(), str(tmp_path))
  trainer = RecordingTrainer(with_candidates)
  search.precompiler = precompile.Precompiler(trainer.compile_path, threads=1)
  return search, trainer, search.initial_run(), search.trainer.init(0, search.cfg.num_cells)


def test_stage_one_queues_the_first_steps_own_path_before_the_candidates(tmp_path):
  search, trainer, run, state = recorded_stage_one(tmp_path)
  first_path = search.step_path(state, run, False)
  search.precompile(state, run, (state, None))
  search.precompiler.wait_for(run.candidates(), first_path, False)
  search.precompiler.close()
  assert trainer.paths[0] == (first_path, False)


def test_a_warming_up_stage_one_also_queues_alphas_programs_after_the_candidates(tmp_path):
  search, trainer, run, state = recorded_stage_one(tmp_path)
  search.precompile(state, run, (state, None))
  search.precompiler.wait_for(run.candidates(), [0] * len(search.shapes), True)
  search.precompiler.close()
  warmup_passes = 1 + search.cfg.num_cells
  assert [a for _, a in trainer.paths[:warmup_passes]] == [False] * warmup_passes
  assert trainer.paths[warmup_passes] == ([0] * len(search.shapes), True)


def test_a_trial_round_queues_the_cells_the_round_swaps_in_if_alpha_stays(tmp_path):
  search, trainer, run, state = recorded_stage_one(tmp_path, with_candidates=True)
  run.step, run.alpha_steps_since_round = search.warmup_steps + 1, 1
  state = state.replace(alpha=np.random.default_rng(0).normal(size=state.alpha.shape))
  before = copy.deepcopy(run)
  search.precompile_next_round(run, state, (state, None), steps_to_round=2)
  assert run.to_json() == before.to_json()  # the trial round ran on a copy
  run.step, run.alpha_steps_since_round = run.step + 2, 3
  search.evolution_round(run, state)
  cells = run.candidates()
  for j in range(search.cfg.num_cells):
    search.precompiler.wait_for(cells, [j] * len(cells), True)
  search.precompiler.close()
  queued = {(i, g) for candidates, path, alpha in trainer.paths
            for i, (ops, c) in enumerate(zip(candidates, path)) if alpha for g in [ops[c]]}
  assert queued == {(i, g) for i, ops in enumerate(cells) for g in ops}


class FailingProgram:
  """Lowers, then fails to compile: what the compile pool must report, not cache."""

  def __init__(self):
    self.lowerings = 0

  def trace(self, x):
    self.lowerings += 1
    program = self

    class Lowered:
      def compile(self):
        raise RuntimeError(f"compile {program.lowerings} failed")

    return Traced(jax.ShapeDtypeStruct(x.shape, x.dtype), Lowered())


def test_a_compile_that_fails_on_the_pool_fails_its_pass_and_a_later_pass_tries_again():
  one_device = jax.sharding.Mesh(jax.devices()[:1], ("data",))
  x = jax.device_put(np.zeros(3, np.float32), jax.sharding.NamedSharding(
      one_device, jax.sharding.PartitionSpec()))
  program = FailingProgram()
  for attempt in (1, 2):
    run = supernet.PathRun(compile_only=True)
    out = run.call(program, x)
    assert out.shape == (3,)  # known before the compile: a pass goes on tracing
    with pytest.raises(RuntimeError, match=f"compile {attempt} failed"):
      run.compiles[0].result(timeout=30)
  assert program.lowerings == 2


class Traced:
  """What `jax.jit(...).trace` gives a compile-only pass: output shapes, then lowering."""

  def __init__(self, out_avals, lowered):
    self.out_avals, self._lowered = out_avals, lowered

  def lower(self):
    return self._lowered


class HeldProgram:
  """Lowers at once; its compile holds a pool thread until the test releases it."""

  def __init__(self, release):
    self.release, self.started, self.lowerings = release, threading.Event(), 0

  def trace(self, x):
    self.lowerings += 1
    program = self

    class Lowered:
      out_info = jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)

      def compile(self):
        program.started.set()
        program.release.wait(timeout=30)
        return self

    return Traced(jax.ShapeDtypeStruct(x.shape, x.dtype), Lowered())


def test_closing_drops_queued_compiles_and_a_later_pass_compiles_them(monkeypatch):
  monkeypatch.setattr(supernet, "_compiler", concurrent.futures.ThreadPoolExecutor(1))
  one_device = jax.sharding.Mesh(jax.devices()[:1], ("data",))
  x = jax.device_put(np.zeros(3, np.float32), jax.sharding.NamedSharding(
      one_device, jax.sharding.PartitionSpec()))
  release = threading.Event()
  run = supernet.PathRun(compile_only=True)
  running, queued = HeldProgram(release), HeldProgram(release)
  run.call(running, x)
  assert running.started.wait(timeout=30)  # the pool's one thread is busy ...
  run.call(queued, x)  # ... so this compile waits in its queue
  precompile.Precompiler(RecordingTrainer().compile_path, threads=1).close()
  release.set()
  assert run.compiles[0].result(timeout=30) is None  # a started compile finishes
  with pytest.raises(concurrent.futures.CancelledError):
    run.compiles[1].result(timeout=30)
  later = supernet.PathRun(compile_only=True)
  later.call(queued, x)  # a later pass compiles the dropped program
  later.compiles[0].result(timeout=30)
  assert queued.lowerings == 2


class CancellationTrainer:
  """Stands in for the trainer: holds a pass open, then records whether it was cancelled."""

  def __init__(self):
    self.started, self.release = threading.Event(), threading.Event()
    self.cancelled = {}  # path -> whether its pass was cancelled when released

  def compile_path(self, state, batch, candidates, path, train_alpha, cancelled=None):
    self.started.set()
    self.release.wait(timeout=30)
    self.cancelled[tuple(path)] = cancelled()


def test_a_pass_that_started_before_a_close_is_cancelled_and_a_later_ones_is_not():
  trainer = CancellationTrainer()
  precompiler = precompile.Precompiler(trainer.compile_path, threads=1)
  precompiler.submit(None, None, CELLS, [0, 0], False)
  assert trainer.started.wait(timeout=30)  # taken off the queue: only its run can stop it
  precompiler.close()
  trainer.release.set()
  precompiler.submit(None, None, CELLS, [1, 1], False)
  precompiler.wait_for(CELLS, [1, 1], False)
  precompiler.close()
  deadline = time.monotonic() + 30  # the closed pass's thread may report after the new one
  while len(trainer.cancelled) < 2 and time.monotonic() < deadline:
    time.sleep(0.01)
  assert trainer.cancelled == {(0, 0): True, (1, 1): False}


def test_a_compile_only_pass_stops_at_its_next_program_once_cancelled():
  x = jax.device_put(np.zeros(3, np.float32))
  stop = threading.Event()
  run = supernet.PathRun(compile_only=True, cancelled=stop.is_set)
  run.call(supernet._zeros_like, x)
  stop.set()
  with pytest.raises(concurrent.futures.CancelledError):
    run.call(supernet._zeros_like, x)


class ExitingTrainer:
  """Stands in for the trainer: its first pass raises SystemExit, later ones succeed."""

  def __init__(self):
    self.passes = 0

  def compile_path(self, state, batch, candidates, path, train_alpha, cancelled=None):
    self.passes += 1
    if self.passes == 1:
      raise SystemExit("a pass exited")


def test_a_pass_ending_in_a_non_exception_error_neither_hangs_the_loop_nor_stops_passes():
  trainer = ExitingTrainer()
  precompiler = precompile.Precompiler(trainer.compile_path, threads=1)
  for path in ([0, 0], [1, 1]):  # the second pass runs on the same worker
    precompiler.submit(None, None, CELLS, path, False)
    waiter = threading.Thread(target=precompiler.wait_for, args=(CELLS, path, False))
    waiter.start()
    waiter.join(timeout=30)
    assert not waiter.is_alive()
  precompiler.close()
  assert trainer.passes == 2


class StateRecordingTrainer:
  """Stands in for the trainer to record the state and batch a pass is given."""

  def __init__(self):
    self.args = []

  def compile_path(self, state, batch, candidates, path, train_alpha, cancelled=None):
    self.args.append((state, batch))


def test_stage_one_queues_passes_holding_the_shapes_of_its_state_and_batch_not_arrays(
    tmp_path):
  config = short_schedule(tiny_config(), warmup=0.1, main=0.3)
  search = space_search.SpaceSearch(config, str(tmp_path))
  recorder = StateRecordingTrainer()
  search.precompiler = precompile.Precompiler(recorder.compile_path, threads=1)
  search.run()  # its first passes, covering passes and trial rounds
  assert len(recorder.args) > 2 * search.cfg.num_cells
  state = search.trainer.init(0, search.cfg.num_cells)
  for held_state, held_batch in recorder.args:
    assert all(isinstance(leaf, jax.ShapeDtypeStruct)
               for leaf in jax.tree.leaves((held_state, held_batch)))
    assert jax.tree.map(lambda x: (x.shape, x.dtype), held_state) == jax.tree.map(
        lambda x: (x.shape, x.dtype), state)
