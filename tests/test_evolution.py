"""Evolution operators: what the population may and may not do (SPEC §6)."""

import dataclasses
import json

import numpy as np
from hypothesis import given, settings, strategies as st

from autospace_jax import evolution
from autospace_jax import genome as genome_lib
from autospace_jax import space_search
from conftest import tiny_config

ALL = list(genome_lib.all_genomes())
SHAPE = evolution.CellShape(24, 24, 1, 28)
STRIDED = evolution.CellShape(24, 40, 2, 28)

genomes = st.sampled_from(ALL)
seeds = st.integers(0, 2**32 - 1)


def changed_positions(parent, child):
  edges = {e for e, a, b in zip(genome_lib.EDGES, parent.edges, child.edges) if a != b}
  genes = {n for n, a, b in (("e", parent.expansion_index, child.expansion_index),
                             ("m2", parent.mix[0], child.mix[0]),
                             ("m3", parent.mix[1], child.mix[1])) if a != b}
  return edges, genes


@settings(max_examples=300, deadline=None)
@given(genomes, seeds, st.sampled_from([SHAPE, STRIDED]), st.booleans())
def test_every_child_is_valid_local_and_satisfies_the_active_constraints(
    parent, seed, shape, reference_active):
  constraints = evolution.layer_constraints(shape, 1.5, 3)
  feasible = lambda g: constraints.feasible(g, shape, reference_active)  # noqa: E731
  rng = np.random.default_rng(seed)
  child = evolution.mutate_under_constraints(parent, rng, feasible, 3, (1, 2, 3, 5), 1 / 8)
  genome_lib.validate(child)
  if child == parent:
    return  # gave up after 100 tries: the parent is kept
  assert feasible(child)
  edges, genes = changed_positions(parent, child)
  if genes:
    assert not edges and len(genes) == 1
  else:
    assert len(edges) == 1
    (edge,) = edges
    assert any(edge in genome_lib.window_edges(start, 3) for start in (0, 1))
    assert edge != genome_lib.UNUSED_EDGE


def test_a_parent_with_no_feasible_neighbour_is_kept():
  parent = genome_lib.REFERENCE
  child = evolution.mutate_under_constraints(parent, np.random.default_rng(0),
                                             lambda g: False, 3, (1, 2, 3, 5), 1 / 8)
  assert child == parent


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(-5, 5, allow_nan=False), min_size=10, max_size=60), seeds,
       st.integers(1, 8), st.integers(1, 20))
def test_tournaments_pick_distinct_cells_each_the_best_of_its_team(fitness, seed, count,
                                                                    team_size):
  fitness = np.array(fitness)
  count = min(count, len(fitness))
  winners = evolution.tournament_select(fitness, count, team_size,
                                        np.random.default_rng(seed))
  assert len(set(winners.tolist())) == count
  # Replay the same draws to recover each team.
  rng = np.random.default_rng(seed)
  available = np.ones(len(fitness), bool)
  for w in winners:
    candidates = np.flatnonzero(available)
    team = rng.choice(candidates, min(team_size, len(candidates)), replace=False)
    assert w in team
    assert fitness[w] == fitness[team].max()
    available[w] = False


def population_with(alpha, alpha_birth, steps, birth_layer_steps, layer_steps):
  n = len(alpha)
  pop = evolution.initial_population(n, ALL[:n], np.random.default_rng(0))
  pop.alpha[:] = alpha
  pop.alpha_birth[:] = alpha_birth
  pop.alpha_steps[:] = steps
  pop.layer_steps_at_birth[:] = birth_layer_steps
  pop.layer_steps = layer_steps
  return pop


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(-3, 3), st.floats(-3, 3), st.integers(0, 400),
                          st.integers(0, 400)), min_size=1, max_size=20))
def test_rate_compensation_matches_its_formula(cells):
  alpha, alpha0, t, born = (np.array(c) for c in zip(*cells))
  layer_steps = 1000
  pop = population_with(alpha, alpha0, t, born, layer_steps)
  got = evolution.compensated_fitness(pop, "rate")
  total = layer_steps - born
  want = np.where(t > 0, alpha0 + total / np.maximum(t, 1) * (alpha - alpha0), alpha0)
  np.testing.assert_allclose(got, want, rtol=1e-12)
  np.testing.assert_array_equal(evolution.compensated_fitness(pop, "none"), alpha)


def test_team_size_rises_in_four_equal_spans_of_evolution():
  schedule = (30, 103, 177, 250)
  sizes = [evolution.team_size_at(e, schedule, 120) for e in (0, 29.9, 30, 59, 60, 90, 119)]
  assert sizes == [30, 30, 103, 103, 177, 250, 250]


def settings_for(update):
  return evolution.EvolutionSettings(4, 3, (1, 2, 3, 5), 1 / 8, "rate", update)


def test_inplace_update_mutates_the_selected_cells_and_keeps_their_alpha_and_birth():
  pop = evolution.initial_population(30, ALL, np.random.default_rng(1))
  pop.alpha[:] = np.linspace(-1, 1, 30)
  before = dataclasses.replace(pop, genomes=list(pop.genomes), alpha=pop.alpha.copy())
  slots = evolution.evolve_layer(pop, np.arange(4), settings_for("inplace"), 10,
                                 lambda g: True, 100, np.random.default_rng(2))
  assert len(set(slots.tolist())) == 4
  for i in slots:
    assert pop.alpha[i] == before.alpha[i]
    assert pop.birth_step[i] == 0
  assert sum(pop.genomes[i] != before.genomes[i] for i in slots) >= 3


def test_aging_update_adds_children_with_parent_alpha_and_retires_the_oldest():
  pop = evolution.initial_population(30, ALL, np.random.default_rng(1))
  pop.birth_step[:] = np.arange(30)  # cell 0 is the oldest
  pop.alpha[:] = np.linspace(-1, 1, 30)
  supernet_slots = np.array([0, 1, 2, 3])
  old_ids = set(pop.cell_id.tolist())
  slots = evolution.evolve_layer(pop, supernet_slots, settings_for("aging"), 10,
                                 lambda g: True, 500, np.random.default_rng(2))
  assert len(pop) == 30
  assert set(slots.tolist()).isdisjoint(supernet_slots.tolist())
  for i in slots:
    assert pop.birth_step[i] == 500
    assert pop.alpha_steps[i] == 0
    assert pop.alpha[i] == pop.alpha_birth[i]
    assert pop.parent_id[i] in old_ids
    assert pop.cell_id[i] not in old_ids


def test_aging_retires_the_oldest_cells_outside_the_supernet_even_when_they_are_parents():
  pop = evolution.initial_population(30, ALL, np.random.default_rng(1))
  pop.birth_step[:] = np.arange(30)  # cells 4-7 are the oldest outside the supernet ...
  pop.alpha[:] = np.where((4 <= np.arange(30)) & (np.arange(30) < 8), 1.0, 0.0)  # the fittest
  pop.alpha_steps[:] = pop.layer_steps = 10  # every cell trained all along: α_c = α
  alpha_by_id = dict(zip(pop.cell_id.tolist(), pop.alpha.tolist()))
  slots = evolution.evolve_layer(pop, np.arange(4), settings_for("aging"), 26,
                                 lambda g: True, 500, np.random.default_rng(2))
  parents = pop.parent_id[slots]
  assert set(parents.tolist()) & {4, 5, 6, 7}, "no parent is among the oldest"
  assert sorted(slots.tolist()) == [4, 5, 6, 7]
  np.testing.assert_array_equal(pop.alpha[slots], [alpha_by_id[i] for i in parents])


def test_an_initial_population_larger_than_the_feasible_set_holds_each_genome_evenly():
  feasible = ALL[:7]
  pop = evolution.initial_population(30, feasible, np.random.default_rng(0))
  counts = [pop.genomes.count(g) for g in feasible]
  assert sorted(set(counts)) == [4, 5] and sum(counts) == 30


def test_write_back_counts_alpha_steps_for_the_supernet_cells_and_the_layer():
  pop = evolution.initial_population(10, ALL, np.random.default_rng(0))
  evolution.write_back(pop, np.array([2, 5]), np.array([0.5, -0.5]), 40)
  assert pop.alpha[2] == 0.5 and pop.alpha[5] == -0.5
  assert pop.alpha_steps.tolist() == [0, 0, 40, 0, 0, 40, 0, 0, 0, 0]
  assert pop.layer_steps == 40


def test_population_json_round_trip_is_exact():
  pop = evolution.initial_population(10, ALL, np.random.default_rng(0))
  pop.alpha[:] = np.random.default_rng(1).normal(size=10)
  back = evolution.Population.from_json(pop.to_json())
  assert back.genomes == pop.genomes
  for f in dataclasses.fields(pop):
    np.testing.assert_array_equal(getattr(back, f.name), getattr(pop, f.name))


def test_top_cells_are_distinct_genomes_ranked_by_compensated_alpha():
  pop = evolution.initial_population(10, ALL[:3] * 4, np.random.default_rng(0))
  pop.alpha[:] = np.arange(10)
  top = evolution.top_cells(pop, 3, "none")
  assert top[0] == 9
  assert len(top) == 3


def test_top_cells_skip_a_genome_that_differs_from_a_better_one_only_in_a_silent_gene():
  silent_twin = dataclasses.replace(genome_lib.REFERENCE, mix=(1, 0))  # node 2 has one input
  assert silent_twin != genome_lib.REFERENCE
  pop = evolution.initial_population(3, [genome_lib.REFERENCE], np.random.default_rng(0))
  pop.genomes[1] = silent_twin
  pop.genomes[2] = genome_lib.irb(5, 6)
  pop.alpha[:] = [3.0, 2.0, 1.0]
  assert evolution.top_cells(pop, 2, "none").tolist() == [0, 2]


def test_a_stage_1_checkpoint_record_is_a_snapshot_later_rounds_do_not_change():
  # Orbax serialises a save's metadata on its own thread while training goes on.
  search = space_search.SpaceSearch(tiny_config(), "unused")
  run = search.initial_run()
  record = run.to_json()
  saved = json.dumps(record)
  run.history.append({"step": 3})
  run.slots[0][0] = (run.slots[0][0] + 1) % len(run.populations[0])
  run.populations[0].alpha[0] += 1.0
  assert json.dumps(record) == saved


def test_top_cells_keep_duplicates_when_not_asked_for_distinct_ones():
  pop = evolution.initial_population(3, [genome_lib.REFERENCE], np.random.default_rng(0))
  pop.genomes[2] = genome_lib.irb(5, 6)
  pop.alpha[:] = [3.0, 2.0, 1.0]
  assert evolution.top_cells(pop, 2, "none", distinct=False).tolist() == [0, 1]
  assert evolution.top_cells(pop, 2, "none").tolist() == [0, 2]
