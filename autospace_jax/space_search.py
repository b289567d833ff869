"""Stage 1: evolve per-layer cell populations inside the supernet (SPEC §5-6).

Warm-up trains weights only, with the supernet's K cells per layer redrawn uniformly from
the population every f steps. Evolution then trains weights and α together and, every f
steps, writes α back, selects by tournament, mutates, and swaps the new cells in — which
costs no compilation, because the supernet runs genomes as host-chained ops. The output
is the top-K cells per layer: `learned_space.config` (official format) and
`learned_space.json` (α, MAdds, lineage per cell).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import time
from typing import Any, Iterator

from etils import epath
import jax
import ml_collections
import numpy as np

from autospace_jax import checkpointing
from autospace_jax import distributed
from autospace_jax import evolution
from autospace_jax import files
from autospace_jax import genome as genome_lib
from autospace_jax import input_pipeline
from autospace_jax import netspec
from autospace_jax import precompile
from autospace_jax import progress
from autospace_jax import seeding
from autospace_jax import supernet
from autospace_jax.parallel import DataParallel

SPACE_CONFIG = "learned_space.config"
SPACE_JSON = "learned_space.json"


def supernet_spec(config: ml_collections.ConfigDict, num_classes: int,
                  conv_codes: Any) -> supernet.SupernetSpec:
  """The stage-1/2 supernet on the configured skeleton (IRB k3 e6 placeholders)."""
  net = netspec.build_net([genome_lib.REFERENCE] * sum(config.model.layers_per_stage),
                          config.model.width_multiplier, tuple(config.model.layers_per_stage),
                          num_classes, config.data.image_size)
  return supernet.supernet_spec_from_net(net, conv_codes)


def cell_shapes(spec: supernet.SupernetSpec) -> list[evolution.CellShape]:
  return [evolution.CellShape(s.in_channels, s.out_channels, s.stride, s.in_size)
          for s in spec.layers]


@dataclasses.dataclass
class SpaceRun:
  """Host-side state of a stage-1 run, next to the device `TrainState`."""

  step: int
  populations: list[evolution.Population]
  slots: list[np.ndarray]
  alpha_steps_since_round: int = 0
  history: list[dict] = dataclasses.field(default_factory=list)

  def to_json(self) -> dict:
    return {"step": self.step, "populations": [p.to_json() for p in self.populations],
            "slots": [s.tolist() for s in self.slots],
            "alpha_steps_since_round": self.alpha_steps_since_round,
            "history": list(self.history)}  # a snapshot: Orbax serialises it later

  @classmethod
  def from_json(cls, data: dict) -> "SpaceRun":
    return cls(int(data["step"]), [evolution.Population.from_json(p)
                                   for p in data["populations"]],
               [np.asarray(s, np.int64) for s in data["slots"]],
               int(data["alpha_steps_since_round"]), list(data["history"]))

  def candidates(self) -> list[list[genome_lib.Genome]]:
    return [[p.genomes[i] for i in s] for p, s in zip(self.populations, self.slots)]


class SpaceSearch:
  """One stage-1 run: owns the schedule, the supernet trainer and the populations."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str,
               parallel: DataParallel | None = None, writer: Any = None):
    self.config = config
    self.cfg = config.space
    self.workdir = os.path.join(workdir, "space")
    self.parallel = parallel or DataParallel()
    self.writer = writer
    info = input_pipeline.dataset_info(config.data.name)
    conv_codes = tuple(c for c in self.cfg.codes if c in genome_lib.CONV_CODES)
    self.spec = supernet_spec(config, info.num_classes, conv_codes)
    self.shapes = cell_shapes(self.spec)
    self.constraints = [evolution.layer_constraints(s, self.cfg.madds_cap_ratio,
                                                    self.cfg.reference_distance)
                        for s in self.shapes]
    self.steps_per_epoch = input_pipeline.steps_per_epoch(config.data, "search_train",
                                                          self.cfg.batch_size)
    self.warmup_steps = supernet.epochs_to_steps(self.cfg.warmup_epochs, self.steps_per_epoch)
    self.total_steps = self.warmup_steps + supernet.epochs_to_steps(
        self.cfg.evolution_epochs, self.steps_per_epoch)
    self.settings = evolution.EvolutionSettings(
        self.cfg.num_cells, self.cfg.window, tuple(self.cfg.codes),
        self.cfg.gene_mutation_probability, self.cfg.compensation,
        self.cfg.population_update)
    schedule = supernet.cosine_schedule(self.cfg.learning_rate, self.total_steps)
    self.trainer = supernet.SupernetTrainer(
        self.spec, schedule, self.cfg.weight_decay, self.cfg.momentum,
        supernet.alpha_optimizer(self.cfg.alpha_learning_rate, self.cfg.alpha_b1,
                                 self.cfg.alpha_b2),
        self.cfg.label_smoothing, self.cfg.estimator, self.parallel,
        decay_bn_and_bias=self.cfg.decay_bn_and_bias)
    self.precompiler = precompile.Precompiler(self.trainer.compile_path,
                                              config.precompile_threads)

  # --- evolution schedule ---

  def evolution_epoch(self, step: int) -> float:
    return (step - self.warmup_steps) / self.steps_per_epoch

  def _rng(self, stream: str, *keys: int) -> np.random.Generator:
    return seeding.generator(self.config.seed, stream, *keys)

  def _feasible(self, layer: int, reference_active: bool):
    shape, constraint = self.shapes[layer], self.constraints[layer]
    return lambda g: constraint.feasible(g, shape, reference_active)

  def initial_run(self) -> SpaceRun:
    """Populations drawn from the feasible genomes; K random cells per layer."""
    reference_active = self.cfg.reference_stop_epoch > 0
    all_genomes = list(genome_lib.all_genomes(self.cfg.codes))
    populations, slots = [], []
    for layer in range(len(self.shapes)):
      feasible = [g for g in all_genomes if self._feasible(layer, reference_active)(g)]
      rng = self._rng("initial_population", layer)
      populations.append(evolution.initial_population(self.cfg.population_size, feasible,
                                                      rng))
      slots.append(rng.choice(self.cfg.population_size, self.cfg.num_cells, replace=False))
    return SpaceRun(0, populations, slots)

  def redraw_warmup_cells(self, run: SpaceRun) -> None:
    for layer, p in enumerate(run.populations):
      rng = self._rng("warmup_cells", run.step, layer)
      run.slots[layer] = rng.choice(len(p), self.cfg.num_cells, replace=False)

  def evolution_round(self, run: SpaceRun, state: supernet.TrainState
                      ) -> supernet.TrainState:
    """Write α back, then select, mutate and swap in K new cells in every layer."""
    alpha = np.asarray(jax.device_get(state.alpha), np.float64)
    return self.trainer.reset_alpha(state, self._evolve(run, alpha))

  def _evolve(self, run: SpaceRun, alpha: np.ndarray) -> np.ndarray:
    """`evolution_round` on the host with this α; returns the new cells' α."""
    epoch = self.evolution_epoch(run.step)
    team = evolution.team_size_at(epoch, self.cfg.team_sizes, self.cfg.evolution_epochs)
    reference_active = epoch < self.cfg.reference_stop_epoch
    new_alpha = np.zeros_like(alpha)
    for layer, population in enumerate(run.populations):
      evolution.write_back(population, run.slots[layer], alpha[layer],
                           run.alpha_steps_since_round)
      run.slots[layer] = evolution.evolve_layer(
          population, run.slots[layer], self.settings, team,
          self._feasible(layer, reference_active), run.step,
          self._rng("evolution", run.step, layer))
      new_alpha[layer] = population.alpha[run.slots[layer]]
    run.alpha_steps_since_round = 0
    run.history.append({"step": run.step, "epoch": epoch, "team_size": team,
                        "alpha": alpha.tolist()})
    return new_alpha

  def precompile_next_round(self, run: SpaceRun, state: supernet.TrainState,
                            shapes: tuple, steps_to_round: int) -> None:
    """Queue passes over the cells the round ``steps_to_round`` steps ahead would swap in
    if α stayed as it is now (a trial round on a copy, with the round's own random
    streams), so that they are usually compiled when it does. Only a guess: the run's
    results never depend on it; the cells it misses compile when first used. ``shapes``:
    `supernet.shapes_of` the state and a batch, which the passes compile for."""
    # A copy of what a round changes; not the history, which grows every round.
    trial = SpaceRun(run.step + steps_to_round, copy.deepcopy(run.populations),
                     copy.deepcopy(run.slots), run.alpha_steps_since_round + steps_to_round)
    self._evolve(trial, np.asarray(jax.device_get(state.alpha), np.float64))
    self.precompiler.submit_candidates(*shapes, trial.candidates(), True)

  def finish(self, run: SpaceRun, state: supernet.TrainState) -> None:
    """Flush the last α into the populations (once) before ranking."""
    if run.alpha_steps_since_round:
      alpha = np.asarray(jax.device_get(state.alpha), np.float64)
      for layer, population in enumerate(run.populations):
        evolution.write_back(population, run.slots[layer], alpha[layer],
                             run.alpha_steps_since_round)
      run.alpha_steps_since_round = 0

  # --- the loop ---

  def run(self) -> dict:
    """Train, evolve, and write the learned space; resumes from the latest checkpoint."""
    epath.Path(self.workdir).mkdir(parents=True, exist_ok=True)
    with (checkpointing.Checkpointer(os.path.join(self.workdir, "checkpoints"),
                                     self.config.checkpoint.max_to_keep) as ckpt,
          self.precompiler):
      state, run = self._restore_or_init(ckpt)
      # What compile-only passes compile for; the same at every step of the stage.
      shapes = supernet.shapes_of((state, input_pipeline.placeholder_batch(
          self.config.data, self.cfg.batch_size, jax.process_count())))
      if run.step < self.total_steps:  # compiling starts while the data pipeline does
        self.precompile(state, run, shapes)
      data = input_pipeline.make_iterator(
          self.config.data, "search_train", self.cfg.batch_size, seed=self.config.seed,
          start_step=run.step, process_index=jax.process_index(),
          process_count=jax.process_count())
      state = self._train(state, run, data, ckpt, shapes)
    self.finish(run, state)
    return self.write_outputs(run)

  def _train(self, state: supernet.TrainState, run: SpaceRun, data: Iterator[dict],
             ckpt: checkpointing.Checkpointer, shapes: tuple) -> supernet.TrainState:
    """The training loop from ``run.step`` on: steps, evolution rounds, checkpoints;
    ``shapes`` are what the compile-only passes it queues compile for."""
    bar = progress.Bar(self.total_steps, "space", initial=run.step)
    f = self.cfg.mutation_interval
    first_step = run.step
    while run.step < self.total_steps:
      if run.step < self.warmup_steps and run.step % f == 0 and run.step:
        self.redraw_warmup_cells(run)
      evolving = run.step >= self.warmup_steps
      batch = next(data)
      state, metrics = self.train_step(state, run, batch, evolving)
      if run.step == first_step:
        self.precompile_covering(run, shapes)
      run.step += 1
      if evolving:
        run.alpha_steps_since_round += 1
        steps_to_round = -(run.step - self.warmup_steps) % f
        if run.step + steps_to_round < self.total_steps:
          if not steps_to_round:
            state = self.evolution_round(run, state)
          # Guesses at the next round's cells, from α early in the interval and later.
          elif self.config.precompile_threads and steps_to_round in (f - 1, f // 2, f // 4):
            self.precompile_next_round(run, state, shapes, steps_to_round)
      bar.update(run.step, metrics)
      if self.writer is not None and run.step % self.config.log_every_steps == 0:
        self.writer.write_scalars(run.step, {k: float(v) for k, v in metrics.items()},
                                  "space")
      ckpt.save_on_schedule(run.step, state, run.to_json,
                            self.config.checkpoint.every_steps, self.total_steps)
    bar.close()
    return state

  def precompile(self, state: supernet.TrainState, run: SpaceRun, shapes: tuple) -> None:
    """Queue the compiling (for ``shapes``: `supernet.shapes_of` the state and a batch) of
    the first step's own path (it waits for that pass alone), of every current candidate
    (the next steps wait for these), and of α's programs if the run is still warming
    up."""
    evolving = run.step >= self.warmup_steps
    self.precompiler.submit(*shapes, run.candidates(), self.step_path(state, run, evolving),
                            evolving)
    self.precompiler.submit_candidates(*shapes, run.candidates(), evolving)
    if not evolving:  # what the first evolving step adds: α's gates and update
      self.precompiler.submit(*shapes, run.candidates(), [0] * len(self.shapes), True)

  def precompile_covering(self, run: SpaceRun, shapes: tuple) -> None:
    """Queue passes covering every program a feasible cell can call, so that later cells
    find theirs compiled. Queued once the first step has run: until then their tracing
    would only compete for the GIL with the loop building its data pipeline."""
    all_genomes = list(genome_lib.all_genomes(self.cfg.codes))
    self.precompiler.submit_covering(
        *shapes, run.candidates(),
        [[g for g in all_genomes if self._feasible(layer, False)(g)]
         for layer in range(len(self.shapes))])

  def step_path(self, state, run: SpaceRun, evolving: bool) -> list[int]:
    """The path the step at ``run.step`` samples (from α when evolving, else uniform)."""
    if evolving:
      probs = supernet.softmax_np(np.asarray(jax.device_get(state.alpha), np.float64))
    else:
      probs = np.full((len(run.slots), self.cfg.num_cells), 1.0 / self.cfg.num_cells)
    return supernet.sample_path(probs, self._rng("space_path", run.step))

  def train_step(self, state, run: SpaceRun, batch: dict, evolving: bool):
    candidates = run.candidates()
    path = self.step_path(state, run, evolving)
    self.precompiler.wait_for(candidates, path, evolving)
    state, metrics = self.trainer.train_step(state, batch, candidates, path,
                                             train_alpha=evolving)
    supernet.check_finite(metrics["loss"], "space", run.step)
    return state, metrics

  def _restore_or_init(self, ckpt):
    _, state, meta = ckpt.restore_or_init(
        lambda: self.trainer.init(self.config.seed, self.cfg.num_cells), self.parallel, "space")
    return state, (self.initial_run() if meta is None else SpaceRun.from_json(meta))

  def write_outputs(self, run: SpaceRun) -> dict:
    """Top-K per layer in the official format, plus the per-cell record."""
    space, records = [], []
    for layer, population in enumerate(run.populations):
      top = evolution.top_cells(population, self.cfg.num_cells, self.cfg.compensation,
                                self.cfg.distinct_top_cells)
      fitness = evolution.compensated_fitness(population, self.cfg.compensation)
      space.append([population.genomes[i] for i in top])
      records.append([{
          "matrix": genome_lib.to_matrix(population.genomes[i]),
          "description": population.genomes[i].describe(),
          "alpha": float(population.alpha[i]), "compensated_alpha": float(fitness[i]),
          "alpha_steps": int(population.alpha_steps[i]),
          "madds": int(self.shapes[layer].madds(population.genomes[i])),
          "birth_step": int(population.birth_step[i]), "cell_id": int(population.cell_id[i]),
          "parent_id": int(population.parent_id[i])} for i in top])
    population_madds = {name: [[int(self.shapes[i].madds(g)) for g in p.genomes]
                               for i, p in enumerate(populations)]
                        for name, populations in (("initial", self.initial_run().populations),
                                                  ("final", run.populations))}
    if jax.process_index() == 0:
      netspec.save_space(space, os.path.join(self.workdir, SPACE_CONFIG))
      files.write_text(os.path.join(self.workdir, SPACE_JSON), json.dumps(
          {"layers": [dataclasses.asdict(s) for s in self.shapes], "cells": records,
           "history": run.history, "population_madds": population_madds,
           "steps": run.step}))
    distributed.sync_processes("learned space written")  # stage 2 loads it on every host
    return {"space": space, "records": records, "history": run.history}


def outputs_exist(workdir: str) -> bool:
  return all((epath.Path(workdir) / "space" / n).exists() for n in (SPACE_CONFIG,
                                                                        SPACE_JSON))


def run(config: ml_collections.ConfigDict, workdir: str, writer: Any = None,
        parallel: DataParallel | None = None) -> str:
  """Run stage 1 unless its outputs exist; returns the learned-space path."""
  if not outputs_exist(workdir):
    start = time.time()
    result = SpaceSearch(config, workdir, parallel, writer).run()
    logging.info("space: finished in %.1fs", time.time() - start)
    summarize(result)
  return os.path.join(workdir, "space", SPACE_CONFIG)


def summarize(result: dict) -> None:
  """A short end-of-stage summary on stdout."""
  print("learned space (top cells by compensated α):")
  for layer, cells in enumerate(result["records"]):
    best = cells[0]
    print(f"  layer {layer:2d}: {best['description']:<48} α_c={best['compensated_alpha']:+.3f}"
          f" MAdds={best['madds']:,}")
