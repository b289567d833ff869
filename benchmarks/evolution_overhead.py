"""What stage 1's evolution costs: compile stalls, supernet step overhead, host rounds.

Runs the default config's stage 1 (>= 10 mutation rounds at f = 40) and prints, last:
  compile_stall_fraction=<x> step_ratio=<y> evolution_ms=<z>
x: share of the stage's wall time the training loop spent blocked on tracing, lowering or
   compiling: its own (jax.monitoring, main thread), its waits for the background
   precompile threads (`config.precompile_threads`), whose work overlaps training, and,
   before its first step, the time its thread could not run (wall minus its CPU time:
   it builds the state and the data pipeline while the passes' tracing holds the GIL);
y: supernet step time over the step time of a static single-path net (`cells.Net`, one
   jitted program, compiled with the options stage 3 uses) running the same sampled cells
   on the same batch (each step puts it on the devices, as stages 1 and 3 do);
z: host ms per mutation round at P 1000, K 9, 21 layers (the ImageNet skeleton).

Usage: python benchmarks/evolution_overhead.py [--workdir DIR] [--paths N]
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from autospace_jax import cells  # noqa: E402
from autospace_jax import evolution  # noqa: E402
from autospace_jax import input_pipeline  # noqa: E402
from autospace_jax.main import enable_compilation_cache  # noqa: E402
from autospace_jax import presets  # noqa: E402
from autospace_jax import space_search  # noqa: E402
from autospace_jax import supernet  # noqa: E402
from autospace_jax import train  # noqa: E402

COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                  "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")


class CompileClock:
  """Sums the durations JAX reports for tracing, lowering and compiling, separately for
  the main thread (the training loop) and the others (precompile threads)."""

  def __init__(self):
    self.main_seconds = 0.0
    self.background_seconds = 0.0
    jax.monitoring.register_event_duration_secs_listener(self._listen)

  def _listen(self, event, duration, **kwargs):
    if event in COMPILE_EVENTS:
      if threading.current_thread() is threading.main_thread():
        self.main_seconds += duration
      else:
        self.background_seconds += duration


def stage1_stall(workdir: str) -> tuple[float, space_search.SpaceSearch, float]:
  config = presets.default()
  config.stages = "space"
  search = space_search.SpaceSearch(config, workdir)
  # Rounds run at every f-th evolving step before the last one.
  rounds = (search.total_steps - search.warmup_steps - 1) // config.space.mutation_interval
  clock = CompileClock()
  # Until the first step, the loop's thread builds the state and the data pipeline while
  # the passes run: it is starved of the GIL (held by their tracing) rather than waiting
  # in `wait_for`, so the time it could not run then counts as blocked too.
  startup = {}

  def blocked() -> float:
    return (clock.main_seconds + search.precompiler.seconds_waited
            + startup.get("starved", 0.0))

  def first_step_starts(method):
    def call(*args, **kwargs):
      if not startup:
        wall_then = time.perf_counter() - start
        startup.update(wall=wall_then, starved=max(
            wall_then - (time.thread_time() - cpu_start) - search.precompiler.seconds_waited,
            0.0))
      return method(*args, **kwargs)
    return call

  marks = {}  # (wall, blocked) when the first step and the first mutation round end

  def marked(name, method):
    def call(*args, **kwargs):
      out = method(*args, **kwargs)
      marks.setdefault(name, (time.perf_counter() - start, blocked()))
      return out
    return call

  search.train_step = marked("step", first_step_starts(search.train_step))
  search.evolution_round = marked("round", search.evolution_round)
  start, cpu_start = time.perf_counter(), time.thread_time()
  search.run()
  wall = time.perf_counter() - start
  print(f"stage 1: {search.total_steps} steps, {rounds} mutation rounds, {wall:.1f}s wall; "
        f"training loop blocked {blocked():.1f}s (tracing/compiling {clock.main_seconds:.1f}s, "
        f"waiting for precompile threads {search.precompiler.seconds_waited:.1f}s, "
        f"starved of the GIL before the first step {startup['starved']:.1f}s of "
        f"{startup['wall']:.1f}s); precompile threads traced/compiled "
        f"{clock.background_seconds:.1f}s")
  round_wall, round_blocked = marks["round"]
  print(f"first step done at {marks['step'][0]:.1f}s ({marks['step'][1]:.1f}s blocked); "
        f"from the first mutation round on: blocked {blocked() - round_blocked:.1f}s of "
        f"{wall - round_wall:.1f}s ({(blocked() - round_blocked) / (wall - round_wall):.3f})")
  return blocked() / wall, search, wall


def step_times(fns: list, repeats: int, blocks: int = 5) -> list[float]:
  """Mean step time of each function in its fastest of ``blocks`` runs of ``repeats``
  steps (the least disturbed by whatever else the machine does). The functions' blocks
  alternate, so that a slow spell of a shared machine hits all of them alike."""
  for fn in fns:
    jax.block_until_ready(fn())  # compile / warm
  best = [float("inf")] * len(fns)
  for _ in range(blocks):
    for i, fn in enumerate(fns):
      start = time.perf_counter()
      for _ in range(repeats):
        out = fn()
      jax.block_until_ready(out)
      best[i] = min(best[i], (time.perf_counter() - start) / repeats)
  return best


def step_ratio(search: space_search.SpaceSearch, paths: int, repeats: int = 10) -> float:
  """Supernet vs static single-path net on the same sampled cells and batches."""
  cfg = search.cfg
  run = search.initial_run()
  state = search.trainer.init(0, cfg.num_cells)
  data = input_pipeline.make_iterator(search.config.data, "search_train", cfg.batch_size,
                                      seed=0)
  batch = next(data)
  rng = np.random.default_rng(0)
  ratios = []
  for _ in range(paths):
    candidates = run.candidates()
    path = supernet.sample_path(np.full((len(candidates), cfg.num_cells), 1 / cfg.num_cells),
                                rng)

    def supernet_step():
      nonlocal state
      state, _ = search.trainer.train_step(state, batch, candidates, path, train_alpha=True)
      return state.alpha

    net, variables = cells.init_net(
        search.spec.net_spec([candidates[i][c] for i, c in enumerate(path)]),
        np.random.default_rng(1))
    tx = supernet.weight_optimizer(0.01, cfg.weight_decay, cfg.momentum, cfg.decay_bn_and_bias)
    static_state = train.TrainState(np.int32(0), variables["params"], variables["batch_stats"],
                                    tx.init(variables["params"]))
    step = supernet.PlatformJit(functools.partial(train.train_step, net, tx,
                                                  cfg.label_smoothing))

    def static_step():  # puts the batch on the devices each step, as both trainers do
      nonlocal static_state
      static_state, metrics = step(static_state, search.parallel.global_batch(batch))
      return metrics["loss"]

    t_super, t_static = step_times([supernet_step, static_step], repeats)
    print(f"path {path}: supernet {t_super * 1e3:.1f} ms, static {t_static * 1e3:.1f} ms")
    ratios.append(t_super / t_static)
  return float(np.mean(ratios))


def evolution_round_ms(rounds: int = 10) -> float:
  """Host time of one mutation round at the paper's sizes."""
  config = presets.imagenet()
  spec = space_search.supernet_spec(config, 1000, (3, 5))
  shapes = space_search.cell_shapes(spec)
  cfg = config.space
  search = space_search.SpaceSearch.__new__(space_search.SpaceSearch)
  search.config, search.cfg, search.shapes = config, cfg, shapes
  search.constraints = [evolution.layer_constraints(s, cfg.madds_cap_ratio,
                                                    cfg.reference_distance) for s in shapes]
  search.settings = evolution.EvolutionSettings(cfg.num_cells, cfg.window, tuple(cfg.codes),
                                                cfg.gene_mutation_probability,
                                                cfg.compensation, cfg.population_update)
  run = search.initial_run()
  rng = np.random.default_rng(0)
  times = []
  for r in range(rounds):
    alpha = rng.normal(size=(len(shapes), cfg.num_cells))
    start = time.perf_counter()
    for layer, population in enumerate(run.populations):
      evolution.write_back(population, run.slots[layer], alpha[layer], cfg.mutation_interval)
      run.slots[layer] = evolution.evolve_layer(
          population, run.slots[layer], search.settings, cfg.team_sizes[r % 4],
          search._feasible(layer, True), r, np.random.default_rng([0, r, layer]))
    times.append(time.perf_counter() - start)
  return 1e3 * float(np.median(times))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default=None)
  parser.add_argument("--paths", type=int, default=3)
  args = parser.parse_args()
  workdir = args.workdir or tempfile.mkdtemp(prefix="autospace_bench_")
  # The persistent XLA cache as `python -m autospace_jax.main` uses it: a first run
  # measures cold compiles, a second one what a restart or rerun pays.
  enable_compilation_cache(jax)
  stall, search, _ = stage1_stall(workdir)
  ratio = step_ratio(search, args.paths)
  ms = evolution_round_ms()
  print(f"device={jax.devices()[0].platform} devices={jax.device_count()}")
  print(f"compile_stall_fraction={stall:.3f} step_ratio={ratio:.2f} evolution_ms={ms:.1f}")


if __name__ == "__main__":
  main()
