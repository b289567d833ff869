"""Stage 2: ProxylessNAS-style gradient search in a space under a MAdds target (SPEC §7).

Candidates per layer are the space's K cells plus Zero on every layer that is not the
first of its stage, each with its own weights (ProxylessNAS's mixed ops; stage 1's cells
share a per-layer bank instead). The same supernet as stage 1 runs the steps, but as in
ProxylessNAS weights and α learn from different data: each weight step trains a path
drawn from α on a 'search_train' batch (label-smoothed CE), and after warm-up every
`search.alpha_update_every` weight steps an α step draws a fresh path and follows
CE * (log E[MAdds] / log target)^β on a held-out 'search_val' batch (plain CE), its BN in
training mode. The derived net takes the argmax per layer (SPEC §7; `search.derive =
"argmax"`), or with "nudge" the argmax is then changed one layer at a time until its
MAdds lie within 5% of the target (10% counts as met): the regulariser steers E[MAdds],
not the argmax net's MAdds, and short searches leave α too flat to hit a target.
The learned space and the IRB baseline space go through this same code.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from typing import Any, Callable, Iterator, Sequence

from etils import epath
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from autospace_jax import checkpointing
from autospace_jax import counting
from autospace_jax import distributed
from autospace_jax import files
from autospace_jax import genome as genome_lib
from autospace_jax import input_pipeline
from autospace_jax import netspec
from autospace_jax import precompile
from autospace_jax import progress
from autospace_jax import seeding
from autospace_jax import space_search
from autospace_jax import supernet
from autospace_jax.parallel import DataParallel

MADDS_TOLERANCE = 0.10  # a derived net within this of its target has met it
DERIVE_TOLERANCE = 0.05  # where derive() stops nudging: well inside MADDS_TOLERANCE


def irb_space(num_layers: int) -> list[list[genome_lib.Genome]]:
  """The hand-made baseline: {k3, k5, k7} x {e3, e6} in every layer."""
  cells = [genome_lib.irb(k, e) for k in (3, 5, 7) for e in (3, 6)]
  return [list(cells) for _ in range(num_layers)]


def stage_first_layers(layers_per_stage: Sequence[int]) -> list[bool]:
  return [j == 0 for n in layers_per_stage for j in range(n)]


def candidates_for(space: Sequence[Sequence[genome_lib.Genome]],
                   layers_per_stage: Sequence[int]) -> list[list[supernet.Op]]:
  """The space's cells plus Zero on layers that are not the first of their stage."""
  return [list(cells) + ([] if first else [netspec.ZERO])
          for cells, first in zip(space, stage_first_layers(layers_per_stage))]


def pad_candidates(candidates: list[list[supernet.Op]]) -> tuple[list[list[supernet.Op]],
                                                                  np.ndarray]:
  """Equal-length candidate lists (α is one L x K array); padding is masked out."""
  width = max(len(c) for c in candidates)
  mask = np.array([[j < len(c) for j in range(width)] for c in candidates])
  return [c + [c[0]] * (width - len(c)) for c in candidates], mask


@dataclasses.dataclass(frozen=True)
class Target:
  """A MAdds target; its outputs are filed under ``tag``."""

  madds: int

  @property
  def tag(self) -> str:
    return f"{self.madds / 1e6:.2f}M"


def run_name(space_name: str, target_madds: int) -> str:
  """Directory name of one search (and of the training of its net)."""
  return f"{space_name}_{Target(target_madds).tag}"


def resolve_targets(config: ml_collections.ConfigDict, reference_madds: int) -> list[Target]:
  """Absolute targets, or fractions of the IRB k3 e6 net's MAdds."""
  targets = [int(t) for t in config.search.targets]
  targets += [int(round(f * reference_madds)) for f in config.search.target_fractions]
  return [Target(t) for t in targets]


def expected_madds_penalty(alpha: jax.Array, mask: jax.Array, madds: jax.Array, fixed: float,
                           log_target: float, beta: float) -> jax.Array:
  """(log E[MAdds] / log target)^β with E over the per-layer softmax of α."""
  probs = jax.nn.softmax(jnp.where(mask, alpha, -jnp.inf), axis=-1)
  expected = fixed + jnp.sum(probs * madds)
  return (jnp.log(expected) / log_target) ** beta


@functools.partial(jax.jit, static_argnames=("beta",))
def arch_gradient(alpha, ce, ce_grad, mask, madds, fixed, log_target, beta):
  """∇α of CE * penalty, given CE's own α-gradient from the supernet backward."""
  penalty, penalty_grad = jax.value_and_grad(expected_madds_penalty)(
      alpha, mask, madds, fixed, log_target, beta)
  return penalty * ce_grad + ce * penalty_grad


def argmax_choice(alpha: np.ndarray, mask: np.ndarray) -> list[int]:
  """The most probable real (unpadded) candidate of each layer."""
  return [int(np.argmax(np.where(m, a, -np.inf))) for a, m in zip(alpha, mask)]


def derive(alpha: np.ndarray, mask: np.ndarray, candidate_madds: np.ndarray, fixed: int,
           target: int, tolerance: float = DERIVE_TOLERANCE) -> list[int]:
  """Argmax per layer, then greedy single-layer swaps toward the target: each swap is the
  one that moves MAdds toward the target at the least loss of log-probability."""
  logp = np.where(mask, alpha - np.log(np.sum(np.exp(np.where(mask, alpha, -np.inf)),
                                               axis=-1, keepdims=True)), -np.inf)
  choice = argmax_choice(alpha, mask)

  def total(ch):
    return fixed + sum(candidate_madds[i, c] for i, c in enumerate(ch))

  for _ in range(alpha.size):
    current = total(choice)
    if abs(current - target) <= tolerance * target:
      break
    best, best_cost = None, np.inf
    for layer in range(len(choice)):
      for cand in np.flatnonzero(mask[layer]):
        delta = candidate_madds[layer, cand] - candidate_madds[layer, choice[layer]]
        if delta == 0 or np.sign(delta) != np.sign(target - current):
          continue
        new_gap = abs(current + delta - target)
        if new_gap >= abs(current - target):
          continue
        cost = (logp[layer, choice[layer]] - logp[layer, cand]) / abs(delta)
        if cost < best_cost:
          best, best_cost = (layer, int(cand)), cost
    if best is None:
      break
    choice[best[0]] = best[1]
  return choice


class ArchSearch:
  """One stage-2 search: a space, a target, a supernet, and the derived net."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str,
               space: Sequence[Sequence[genome_lib.Genome]], space_name: str, target: Target,
               parallel: DataParallel | None = None, writer: Any = None):
    self.config = config
    self.cfg = config.search
    self.workdir = os.path.join(workdir, "search", run_name(space_name, target.madds))
    self.space_name = space_name
    self.target = target
    self.parallel = parallel or DataParallel()
    self.writer = writer
    info = input_pipeline.dataset_info(config.data.name)
    lps = tuple(config.model.layers_per_stage)
    space = netspec.expand_space(space, lps)
    codes = sorted({c for cells in space for g in cells for c in g.edges
                    if c in genome_lib.CONV_CODES})
    unpadded = candidates_for(space, lps)
    self.candidates, self.mask = pad_candidates(unpadded)
    self.spec = dataclasses.replace(  # padding slots, never run, own no weights
        space_search.supernet_spec(config, info.num_classes, tuple(codes)),
        slot_cells=tuple(map(tuple, unpadded)))
    shapes = space_search.cell_shapes(self.spec)
    self.candidate_madds = np.array([[0 if op == netspec.ZERO else shapes[i].madds(op)
                                      for op in ops] for i, ops in enumerate(self.candidates)],
                                    np.float64)
    self.fixed_madds = counting.net_cost(self.spec.net_spec(
        [netspec.ZERO] * len(space))).madds
    self.steps_per_epoch = input_pipeline.steps_per_epoch(config.data, "search_train",
                                                          self.cfg.batch_size)
    self.warmup_steps = supernet.epochs_to_steps(self.cfg.warmup_epochs, self.steps_per_epoch)
    self.total_steps = self.warmup_steps + supernet.epochs_to_steps(self.cfg.epochs,
                                                                    self.steps_per_epoch)
    schedule = supernet.cosine_schedule(self.cfg.learning_rate, self.total_steps)
    self.trainer = supernet.SupernetTrainer(
        self.spec, schedule, self.cfg.weight_decay, self.cfg.momentum,
        supernet.alpha_optimizer(self.cfg.alpha_learning_rate),
        self.cfg.label_smoothing, self.cfg.estimator, self.parallel, self.mask,
        self.cfg.decay_bn_and_bias)
    self.precompiler = precompile.Precompiler(self.compile_pass, config.precompile_threads)

  def madds_range(self) -> tuple[int, int]:
    """MAdds of the cheapest and of the most expensive net in this space."""
    per_layer = np.where(self.mask, self.candidate_madds, np.nan)
    return (int(self.fixed_madds + np.nansum(np.nanmin(per_layer, axis=1))),
            int(self.fixed_madds + np.nansum(np.nanmax(per_layer, axis=1))))

  def warn_if_unreachable(self) -> None:
    low, high = self.madds_range()
    if (low > self.target.madds * (1 + MADDS_TOLERANCE)
        or high < self.target.madds * (1 - MADDS_TOLERANCE)):
      logging.warning("search %s: target %s MAdds is more than %d%% outside what this space "
                      "can reach (%s to %s); the derived net will be the closest it allows",
                      run_name(self.space_name, self.target.madds),
                      f"{self.target.madds:,}", round(100 * MADDS_TOLERANCE), f"{low:,}",
                      f"{high:,}")

  def _masked_alpha(self, alpha: np.ndarray) -> np.ndarray:
    return np.where(self.mask, alpha, -np.inf)

  def alpha_gradient(self, alpha, ce, ce_grad):
    return arch_gradient(alpha, ce, ce_grad, self.mask, self.candidate_madds,
                         float(self.fixed_madds), float(np.log(self.target.madds)),
                         beta=float(self.cfg.beta))

  def _sample_path(self, state, uniform: bool, rng: np.random.Generator) -> list[int]:
    """A path drawn from softmax(α), or uniformly (warm-up, without fetching α from the
    devices), over the unpadded candidates."""
    logits = (np.where(self.mask, 0.0, -np.inf) if uniform else
              self._masked_alpha(np.asarray(jax.device_get(state.alpha), np.float64)))
    return supernet.sample_path(supernet.softmax_np(logits), rng)

  def train_step(self, state, step: int, batch: dict):
    """A weight step on a path drawn from α (uniformly during warm-up)."""
    path = self._sample_path(state, step < self.warmup_steps,
                             seeding.generator(self.config.seed, "search_path", step))
    self.precompiler.wait_for(self.candidates, path, False)
    state, metrics = self.trainer.train_step(state, batch, self.candidates, path,
                                             train_alpha=False)
    supernet.check_finite(metrics["loss"], "search", step)
    return state, metrics

  def compile_pass(self, state, batch: dict, candidates, path, alpha_step: bool,
                   cancelled: Callable[[], bool] | None = None) -> None:
    """What the precompile threads run: the programs of a weight step (`train_step`), or
    of an α step (`loss_and_grads` with plain CE, no weight gradients)."""
    self.trainer.compile_path(state, batch, candidates, path, alpha_step,
                              update_weights=not alpha_step,
                              label_smoothing=0.0 if alpha_step else None,
                              cancelled=cancelled)

  def alpha_update_due(self, step: int) -> bool:
    """Whether an α step follows the weight step that completed ``step`` steps."""
    searched = step - self.warmup_steps
    return searched > 0 and searched % self.cfg.alpha_update_every == 0

  def alpha_steps_before(self, step: int) -> int:
    """α steps taken once ``step`` weight steps are done: the held-out stream's position."""
    return max(step - self.warmup_steps, 0) // self.cfg.alpha_update_every

  def alpha_step(self, state, step: int, batch: dict):
    """ProxylessNAS's architecture step on a held-out batch and a fresh path from α;
    returns the new state and the batch's plain CE."""
    path = self._sample_path(state, False,
                             seeding.generator(self.config.seed, "search_alpha_path", step))
    self.precompiler.wait_for(self.candidates, path, True)
    metrics, _, alpha_grad, run = self.trainer.loss_and_grads(
        state, batch, self.candidates, path, train_alpha=True,
        alpha_loss=self.alpha_gradient, label_smoothing=0.0, weight_grads=False)
    supernet.check_finite(metrics["loss"], "search (α step)", step)
    return self.trainer.apply_alpha(state, alpha_grad, run), metrics["loss"]

  def run(self) -> dict:
    epath.Path(self.workdir).mkdir(parents=True, exist_ok=True)
    self.warn_if_unreachable()
    hosts = {"process_index": jax.process_index(), "process_count": jax.process_count()}
    with (checkpointing.Checkpointer(os.path.join(self.workdir, "checkpoints"),
                                     self.config.checkpoint.max_to_keep) as ckpt,
          self.precompiler):
      step, state, _ = ckpt.restore_or_init(self._init_state, self.parallel,
                                            f"search {self.workdir}")
      self.precompile(state, step)  # compiling starts while the data pipelines do
      data = input_pipeline.make_iterator(self.config.data, "search_train",
                                          self.cfg.batch_size, seed=self.config.seed,
                                          start_step=step, **hosts)
      held_out = input_pipeline.make_iterator(
          self.config.data, "search_val", self.cfg.batch_size, seed=self.config.seed,
          start_step=self.alpha_steps_before(step), **hosts)
      state = self._train(state, step, data, held_out, ckpt)
    return self.write_outputs(np.asarray(jax.device_get(state.alpha), np.float64))

  def precompile(self, state: supernet.TrainState, step: int) -> None:
    """Queue the compiling of every candidate for the weight steps from ``step`` on, then
    for α steps if any are to come."""
    if step < self.total_steps:
      shapes = supernet.shapes_of((state, input_pipeline.placeholder_batch(
          self.config.data, self.cfg.batch_size, jax.process_count())))
      self.precompiler.submit_candidates(*shapes, self.candidates, False)
      if self.alpha_steps_before(self.total_steps) > self.alpha_steps_before(step):
        self.precompiler.submit_candidates(*shapes, self.candidates, True)

  def _train(self, state: supernet.TrainState, step: int, data: Iterator[dict],
             held_out: Iterator[dict], ckpt: checkpointing.Checkpointer
             ) -> supernet.TrainState:
    """The search loop from ``step`` on."""
    bar = progress.Bar(self.total_steps, f"search {self.space_name} {self.target.tag}",
                       initial=step)
    held_out_loss = None  # of the latest α step, logged with the weight steps' metrics
    while step < self.total_steps:
      state, metrics = self.train_step(state, step, next(data))
      step += 1
      if self.alpha_update_due(step):
        state, held_out_loss = self.alpha_step(state, step, next(held_out))
      if held_out_loss is not None:
        metrics = {**metrics, "held_out_loss": held_out_loss}
      bar.update(step, metrics)
      if self.writer is not None and step % self.config.log_every_steps == 0:
        self.writer.write_scalars(step, {k: float(v) for k, v in metrics.items()},
                                  f"search/{run_name(self.space_name, self.target.madds)}")
      ckpt.save_on_schedule(step, state, lambda: {"step": step},
                            self.config.checkpoint.every_steps, self.total_steps)
    bar.close()
    return state

  def _init_state(self):
    return self.trainer.init(self.config.seed + 1, self.mask.shape[1])

  def write_outputs(self, alpha: np.ndarray) -> dict:
    choice = (derive(alpha, self.mask, self.candidate_madds, self.fixed_madds,
                     self.target.madds) if self.cfg.derive == "nudge"
              else argmax_choice(alpha, self.mask))
    ops = [self.candidates[i][c] for i, c in enumerate(choice)]
    net = self.spec.net_spec(ops)
    cost = counting.net_cost(net)
    result = {"space": self.space_name, "target_madds": self.target.madds,
              "params": cost.params, "madds": cost.madds,
              "madds_error": cost.madds / self.target.madds - 1.0,
              "alpha": alpha.tolist(), "choice": choice, "derive": self.cfg.derive,
              "steps": self.total_steps,
              "cells": ["zero" if op == netspec.ZERO else op.describe() for op in ops],
              "matrices": [None if op == netspec.ZERO else genome_lib.to_matrix(op)
                           for op in ops]}
    if jax.process_index() == 0:
      netspec.save_net(net, os.path.join(self.workdir, netspec.NET_FILE))
      files.write_text(os.path.join(self.workdir, RESULT_FILE), json.dumps(result, indent=1))
    distributed.sync_processes("searched net written")  # stage 3 loads it on every host
    print(f"search {self.space_name} target {self.target.madds:,}: params={cost.params:,} "
          f"madds={cost.madds:,} ({result['madds_error']:+.1%})")
    return result


RESULT_FILE = "result.json"


def result_path(workdir: str, space_name: str, target: Target) -> str:
  return os.path.join(workdir, "search", run_name(space_name, target.madds), RESULT_FILE)


def run(config: ml_collections.ConfigDict, workdir: str, space_path: str | None,
        writer: Any = None, parallel: DataParallel | None = None) -> list[dict]:
  """Search every configured space at every target; finished searches are reused."""
  layers = sum(config.model.layers_per_stage)
  spaces = {}
  if config.search.space == "irb":
    spaces["irb"] = irb_space(layers)
  else:
    spaces["learned"] = netspec.load_space(space_path or config.search.space)
    if config.search.compare_irb:
      spaces["irb"] = irb_space(layers)
  info = input_pipeline.dataset_info(config.data.name)
  reference = netspec.build_net([genome_lib.REFERENCE] * layers,
                                config.model.width_multiplier,
                                tuple(config.model.layers_per_stage), info.num_classes,
                                config.data.image_size)
  targets = resolve_targets(config, counting.net_cost(reference).madds)
  results = []
  for name, space in spaces.items():
    for target in targets:
      path = epath.Path(result_path(workdir, name, target))
      if path.exists():
        results.append(json.loads(path.read_text()))
        continue
      results.append(ArchSearch(config, workdir, space, name, target, parallel,
                                writer).run())
  return results
