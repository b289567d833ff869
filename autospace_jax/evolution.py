"""Host-side evolution of per-layer cell populations (SPEC §6).

Small composable operators in the spirit of PyGlove: `compensated_fitness`,
`tournament_select`, `mutate_under_constraints`, and the population updates `inplace`
and `aging`. `evolve_layer` composes them into one round for one layer. Everything is
NumPy on the host and seeded per (seed, round, layer), so a resumed run repeats exactly.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

from autospace_jax import counting
from autospace_jax import genome as genome_lib

COMPENSATIONS = ("rate", "none")
POPULATION_UPDATES = ("inplace", "aging")


@dataclasses.dataclass(frozen=True)
class CellShape:
  """The shape a layer's cells are costed at."""

  in_channels: int
  out_channels: int
  stride: int
  in_size: int

  def madds(self, genome: genome_lib.Genome) -> int:
    return counting.cell_madds(genome, self.in_channels, self.out_channels, self.stride,
                               self.in_size)


@dataclasses.dataclass(frozen=True)
class Constraints:
  """MAdds cap and reference-distance bound for one layer's children."""

  madds_cap: float
  reference: genome_lib.Genome
  max_reference_distance: int

  def feasible(self, genome: genome_lib.Genome, shape: CellShape,
               reference_active: bool) -> bool:
    if reference_active and genome_lib.hamming_distance(
        genome, self.reference) > self.max_reference_distance:
      return False
    return shape.madds(genome) <= self.madds_cap


def layer_constraints(shape: CellShape, madds_ratio: float, max_reference_distance: int,
                      reference: genome_lib.Genome = genome_lib.REFERENCE) -> Constraints:
  """Cap = ratio x MAdds of the reference (IRB k3 e6) at this layer's shape."""
  return Constraints(madds_ratio * shape.madds(reference), reference, max_reference_distance)


@dataclasses.dataclass
class Population:
  """One layer's cells: genomes and, aligned by index, their evolution records."""

  genomes: list[genome_lib.Genome]
  alpha: np.ndarray          # current fitness logit α
  alpha_birth: np.ndarray    # α⁰: α when the cell was born
  alpha_steps: np.ndarray    # t: α updates the cell received
  layer_steps_at_birth: np.ndarray  # layer α steps when it was born (for T)
  birth_step: np.ndarray     # training step of birth
  cell_id: np.ndarray
  parent_id: np.ndarray      # -1 for the initial population
  layer_steps: int = 0       # α steps this layer has taken in total
  next_id: int = 0

  def __len__(self) -> int:
    return len(self.genomes)

  def to_json(self) -> dict:
    """JSON-serialisable form (checkpoints and the learned-space report)."""
    return {
        "genomes": [g.to_vector().tolist() for g in self.genomes],
        **{f.name: getattr(self, f.name).tolist() for f in dataclasses.fields(self)
           if isinstance(getattr(self, f.name), np.ndarray)},
        "layer_steps": self.layer_steps, "next_id": self.next_id,
    }

  @classmethod
  def from_json(cls, data: dict) -> "Population":
    arrays = {f.name: np.asarray(data[f.name], dtype=np.float64 if f.name.startswith("alpha")
                                 and f.name != "alpha_steps" else np.int64)
              for f in dataclasses.fields(cls) if f.name not in (
                  "genomes", "layer_steps", "next_id")}
    return cls([genome_lib.Genome.from_vector(v) for v in data["genomes"]], **arrays,
               layer_steps=int(data["layer_steps"]), next_id=int(data["next_id"]))


def initial_population(size: int, feasible: Sequence[genome_lib.Genome],
                       rng: np.random.Generator) -> Population:
  """``size`` cells drawn uniformly from the feasible genomes: distinct while possible, else
  every feasible genome floor(size / n) or ceil(size / n) times (at the paper's settings a
  layer has ~500 feasible genomes for P = 1000)."""
  if not feasible:
    raise ValueError("no genome satisfies the constraints; raise space.madds_cap_ratio")
  picks = np.concatenate([rng.permutation(len(feasible))
                          for _ in range(-(-size // len(feasible)))])[:size]
  zeros = np.zeros(size)
  return Population([feasible[i] for i in picks], zeros.copy(), zeros.copy(),
                    np.zeros(size, np.int64), np.zeros(size, np.int64),
                    np.zeros(size, np.int64), np.arange(size, dtype=np.int64),
                    np.full(size, -1, np.int64), 0, size)


def compensated_fitness(population: Population, mode: str) -> np.ndarray:
  """α_c = α⁰ + (T / t)(α − α⁰), T = layer α steps since birth; α⁰ when t = 0."""
  if mode == "none":
    return population.alpha.copy()
  t = population.alpha_steps
  total = population.layer_steps - population.layer_steps_at_birth
  rate = np.divide(total, t, out=np.zeros(len(t)), where=t > 0)
  return population.alpha_birth + rate * (population.alpha - population.alpha_birth)


def tournament_select(fitness: np.ndarray, count: int, team_size: int,
                      rng: np.random.Generator) -> np.ndarray:
  """``count`` tournaments over teams drawn without replacement from cells not yet
  picked; each winner is its team's fittest (ties: lowest index)."""
  available = np.ones(len(fitness), bool)
  winners = np.empty(count, np.int64)
  for k in range(count):
    candidates = np.flatnonzero(available)
    team = rng.choice(candidates, min(team_size, len(candidates)), replace=False)
    team.sort()
    winners[k] = team[np.argmax(fitness[team])]
    available[winners[k]] = False
  return winners


def mutate_under_constraints(parent: genome_lib.Genome, rng: np.random.Generator,
                             is_feasible: Callable[[genome_lib.Genome], bool], window: int,
                             codes: Sequence[int], gene_probability: float,
                             max_tries: int = 100) -> genome_lib.Genome:
  """A local mutation of ``parent`` that is feasible; the parent after ``max_tries``."""
  for _ in range(max_tries):
    child = genome_lib.mutate_locally(parent, rng, window, codes, gene_probability)
    if is_feasible(child):
      return child
  return parent


def team_size_at(evolution_epoch: float, schedule: Sequence[int],
                 evolution_epochs: float) -> int:
  """Team size rises through ``schedule`` in equal spans of the evolution phase."""
  stage = int(len(schedule) * max(evolution_epoch, 0.0) / max(evolution_epochs, 1e-9))
  return int(schedule[min(stage, len(schedule) - 1)])


@dataclasses.dataclass(frozen=True)
class EvolutionSettings:
  """The knobs of one round (from `config.space`)."""

  num_cells: int
  window: int
  codes: tuple[int, ...]
  gene_probability: float
  compensation: str
  population_update: str
  max_tries: int = 100


def write_back(population: Population, slots: np.ndarray, alpha: np.ndarray,
               alpha_steps: int) -> None:
  """Step (1): the supernet's α and α-step counts return to the population."""
  population.alpha[slots] = alpha
  population.alpha_steps[slots] += alpha_steps
  population.layer_steps += alpha_steps


def evolve_layer(population: Population, slots: np.ndarray, settings: EvolutionSettings,
                 team_size: int, is_feasible: Callable[[genome_lib.Genome], bool],
                 step: int, rng: np.random.Generator) -> np.ndarray:
  """Steps (2)-(4) for one layer: select, mutate, and return the new supernet slots."""
  fitness = compensated_fitness(population, settings.compensation)
  selected = tournament_select(fitness, settings.num_cells, team_size, rng)
  children = [mutate_under_constraints(population.genomes[i], rng, is_feasible,
                                       settings.window, settings.codes,
                                       settings.gene_probability, settings.max_tries)
              for i in selected]
  if settings.population_update == "inplace":
    for i, child in zip(selected, children):
      population.genomes[i] = child
    return selected
  return _add_children_aging(population, selected, children, step, supernet_cells=slots)


def _add_children_aging(population: Population, parents: np.ndarray,
                        children: list[genome_lib.Genome], step: int,
                        supernet_cells: np.ndarray) -> np.ndarray:
  """Regularized evolution: children join with their parent's α; the oldest cells not in
  the supernet leave to make room (a parent among them too: its child carries its α)."""
  keep = set(supernet_cells.tolist())
  order = [i for i in np.lexsort((population.cell_id, population.birth_step)) if i not in keep]
  leaving = np.array(order[:len(children)], np.int64)
  p = population
  parent_alphas, parent_ids = p.alpha[parents].copy(), p.cell_id[parents].copy()
  for slot, parent_alpha, parent_id, child in zip(leaving, parent_alphas, parent_ids,
                                                  children):
    p.genomes[slot] = child
    p.alpha[slot] = p.alpha_birth[slot] = parent_alpha
    p.alpha_steps[slot] = 0
    p.layer_steps_at_birth[slot] = p.layer_steps
    p.birth_step[slot] = step
    p.parent_id[slot] = parent_id
    p.cell_id[slot] = p.next_id
    p.next_id += 1
  return leaving


def top_cells(population: Population, count: int, compensation: str, distinct: bool = True
              ) -> np.ndarray:
  """Indices of the ``count`` best cells by compensated fitness; if ``distinct``, of cells
  computing different functions (genomes differing only in an unexpressed mix gene count
  as one), then the best of the rest if there are fewer such cells."""
  ranked = [int(i) for i in np.argsort(-compensated_fitness(population, compensation),
                                       kind="stable")]
  chosen = []
  if distinct:
    seen = set()
    for i in ranked:
      function = population.genomes[i].expressed()
      if function not in seen:
        chosen.append(i)
        seen.add(function)
      if len(chosen) == count:
        break
  fill = [i for i in ranked if i not in chosen]
  return np.array(chosen + fill[:count - len(chosen)], np.int64)
