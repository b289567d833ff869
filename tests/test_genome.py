"""Genome: official matrix round-trips, validity rules, distance, IRB shape, local mutation."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autospace_jax import genome as genome_lib
from autospace_jax.genome import Genome, GenomeError
from conftest import reference_file


SPACE_MATRICES = [m for layer in json.loads(
    reference_file("autospace_search_space.config").read_text())["blocks"] for m in layer]
NET_GRAPHS = [b["mobile_inverted_conv"]["build_graph"] for b in json.loads(
    reference_file("autospace_net_340M.config").read_text())["blocks"]
              if b["mobile_inverted_conv"]["name"] == "Motif"]
EVOLUTION_GENOMES = list(genome_lib.all_genomes())
WINDOWS = [set(genome_lib.window_edges(start, 3)) for start in (0, 1)]


def make(edges=None, expansion_index=2, mix=(0, 0)):
  """A genome from a {edge: code} dict over the IRB chain k3/identity/identity."""
  codes = {(0, 1): 3, (1, 2): 2, (2, 3): 2, **(edges or {})}
  return Genome(tuple(codes.get(e, genome_lib.NONE) for e in genome_lib.EDGES),
                expansion_index, mix)


# --- Official matrices ----------------------------------------------------------------------


def test_official_files_hold_99_space_cells_and_13_motifs():
  assert (len(SPACE_MATRICES), len(NET_GRAPHS)) == (99, 13)


@pytest.mark.parametrize("matrix", SPACE_MATRICES)
def test_space_matrix_round_trips_exactly(matrix):
  assert genome_lib.to_matrix(genome_lib.from_matrix(matrix)) == matrix


@pytest.mark.parametrize("matrix", SPACE_MATRICES)
def test_space_matrix_string_form_round_trips_exactly(matrix):
  text = genome_lib.matrix_to_string(matrix)
  assert genome_lib.matrix_to_string(genome_lib.to_matrix(genome_lib.from_matrix(text))) == text


@pytest.mark.parametrize("graph", NET_GRAPHS)
def test_motif_build_graph_round_trips_to_identical_string(graph):
  g = genome_lib.from_matrix(graph)
  assert genome_lib.matrix_to_string(genome_lib.to_matrix(g)) == graph
  assert genome_lib.to_matrix(g) == json.loads(graph)


def test_matrix_layout_puts_edge_j_to_i_at_row_i_column_j():
  g = make({(0, 2): 5, (1, 3): 9}, expansion_index=1, mix=(1, 0))
  assert genome_lib.to_matrix(g) == [[0, 0, 0, 1], [3, 0, 0, [1, 0]], [5, 2, 0, 0],
                                     [1, 9, 2, 0]]


def test_gene_vector_round_trips():
  g = make({(0, 2): 5}, expansion_index=0, mix=(0, 1))
  assert Genome.from_vector(g.to_vector()) == g


# --- Validity rules -------------------------------------------------------------------------


def test_wrong_number_of_edges_is_rejected():
  with pytest.raises(GenomeError, match="6 edge codes, got 5"):
    Genome((3, 1, 2, 1, 1))


def test_unknown_operator_code_is_rejected():
  with pytest.raises(GenomeError, match="edge 0->2 has unknown operator code 4"):
    make({(0, 2): 4})


def test_unused_code_zero_is_rejected_on_an_edge():
  with pytest.raises(GenomeError, match="edge 1->3 has unknown operator code 0"):
    make({(1, 3): 0})


@pytest.mark.parametrize("edge", genome_lib.CHAIN_EDGES)
def test_chain_edge_none_is_rejected(edge):
  with pytest.raises(GenomeError, match=f"chain edge {edge[0]}->{edge[1]} is `none`"):
    make({edge: genome_lib.NONE})


def test_edge_0_to_3_must_be_none():
  with pytest.raises(GenomeError, match="edge 0->3 must be `none`"):
    make({(0, 3): 3})


def test_expansion_index_out_of_range_is_rejected():
  with pytest.raises(GenomeError, match="expansion index 3 is not one of"):
    make(expansion_index=3)


@pytest.mark.parametrize("mix", [(0, 2), (0,), (0, 0, 1)])
def test_bad_mix_genes_are_rejected(mix):
  with pytest.raises(GenomeError, match="mix genes must be two values"):
    make(mix=mix)


def test_matrix_string_that_is_not_a_list_is_rejected():
  with pytest.raises(GenomeError, match="build_graph string is not a nested list"):
    genome_lib.from_matrix("[[0, 0")


def test_matrix_that_is_not_4x4_is_rejected():
  with pytest.raises(GenomeError, match="must be 4x4"):
    genome_lib.from_matrix([[0, 0, 0, 2], [3, 0, 0, [0, 0]], [1, 2, 0, 0]])


def test_matrix_without_mix_pair_is_rejected():
  with pytest.raises(GenomeError, match=r"entry \[1\]\[3\] must hold the two integer mix"):
    genome_lib.from_matrix([[0, 0, 0, 2], [3, 0, 0, 0], [1, 2, 0, 0], [1, 1, 2, 0]])


@pytest.mark.parametrize("matrix, entry", [
    ([[0, 0, 0, 2], [3, 0, 0, [0, 0]], [True, 2, 0, 0], [1, 1, 2, 0]], r"\[2\]\[0\]"),
    ([[0, 0, 0, 2.0], [3, 0, 0, [0, 0]], [1, 2, 0, 0], [1, 1, 2, 0]], r"\[0\]\[3\]"),
    ([[0, 0, 0, 2], [3, 0, 0, [0.9, 0]], [1, 2, 0, 0], [1, 1, 2, 0]], r"\[1\]\[3\]"),
    ([[0, 0, 0, 2], [3, 0, 0, [0, True]], [1, 2, 0, 0], [1, 1, 2, 0]], r"\[1\]\[3\]"),
])
def test_matrix_entries_must_be_integers_not_bools_or_floats(matrix, entry):
  """JSON true and 0.9 are not codes; reading them as 1 and 0 would change the cell."""
  with pytest.raises(GenomeError, match=f"entry {entry} must"):
    genome_lib.from_matrix(matrix)


def test_matrix_with_nonzero_padding_is_rejected():
  with pytest.raises(GenomeError, match=r"entry \[2\]\[3\] must be 0 \(unused\)"):
    genome_lib.from_matrix([[0, 0, 0, 2], [3, 0, 0, [0, 0]], [1, 2, 0, 5], [1, 1, 2, 0]])


def test_matrix_with_non_integer_code_is_rejected():
  with pytest.raises(GenomeError, match=r"entry \[2\]\[1\] must be an integer code"):
    genome_lib.from_matrix([[0, 0, 0, 2], [3, 0, 0, [0, 0]], [1, "2", 0, 0], [1, 1, 2, 0]])


def test_matrix_with_non_integer_expansion_is_rejected():
  with pytest.raises(GenomeError, match=r"entry \[0\]\[3\] must be the expansion index"):
    genome_lib.from_matrix([[0, 0, 0, [2]], [3, 0, 0, [0, 0]], [1, 2, 0, 0], [1, 1, 2, 0]])


def test_matrix_breaking_a_genome_rule_names_the_rule():
  with pytest.raises(GenomeError, match="chain edge 2->3 is `none`"):
    genome_lib.from_matrix([[0, 0, 0, 2], [3, 0, 0, [0, 0]], [1, 2, 0, 0], [1, 1, 1, 0]])


@pytest.mark.parametrize("kernel, expansion, message", [
    (4, 6, "kernel size 4 is not one of"), (3, 4, "expansion 4 is not one of")])
def test_irb_rejects_bad_arguments(kernel, expansion, message):
  with pytest.raises(GenomeError, match=message):
    genome_lib.irb(kernel, expansion)


# --- IRB, distance, enumeration -------------------------------------------------------------


def test_irb_is_chain_kernel_identity_identity():
  g = genome_lib.irb(5, 3)
  assert genome_lib.to_matrix(g) == [[0, 0, 0, 1], [5, 0, 0, [0, 0]], [1, 2, 0, 0],
                                     [1, 1, 2, 0]]
  assert (g.expansion, g.mix, g.uses_attention(2), g.uses_attention(3)) == (3, (0, 0), False,
                                                                           False)
  assert genome_lib.REFERENCE == genome_lib.irb(3, 6)


@pytest.mark.parametrize("other, distance", [
    (genome_lib.irb(3, 6), 0),
    (genome_lib.irb(5, 6), 1),  # one edge
    (genome_lib.irb(3, 1), 1),  # expansion gene
    (make(mix=(1, 1)), 2),  # both mix genes
    (make({(0, 2): 3, (1, 3): 5, (2, 3): 3}, expansion_index=0, mix=(0, 1)), 5),
])
def test_hamming_distance_to_reference(other, distance):
  assert genome_lib.hamming_distance(genome_lib.REFERENCE, other) == distance
  assert genome_lib.hamming_distance(other, genome_lib.REFERENCE) == distance


def test_all_genomes_enumerates_every_valid_evolution_genome_once():
  # chain edges: 3 codes each, skip edges 0->2 and 1->3: 4 each, 3 expansions, 4 mixes.
  assert len(EVOLUTION_GENOMES) == 3 ** 3 * 4 ** 2 * 3 * 4
  assert len(set(EVOLUTION_GENOMES)) == len(EVOLUTION_GENOMES)
  assert all(set(g.edges) <= set(genome_lib.EVOLUTION_CODES) for g in EVOLUTION_GENOMES)
  assert genome_lib.REFERENCE in EVOLUTION_GENOMES


# --- Local mutation -------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(parent=st.sampled_from(EVOLUTION_GENOMES), seed=st.integers(0, 2 ** 32 - 1))
def test_mutate_locally_changes_one_window_or_one_gene(parent, seed):
  child = genome_lib.mutate_locally(parent, np.random.default_rng(seed))
  genome_lib.validate(child)
  assert child != parent
  changed_edges = {e for e in genome_lib.EDGES if child.edge(*e) != parent.edge(*e)}
  changed_genes = (child.expansion_index != parent.expansion_index) + sum(
      a != b for a, b in zip(child.mix, parent.mix))
  if changed_edges:
    assert changed_genes == 0
    assert any(changed_edges <= window for window in WINDOWS)
  else:
    assert changed_genes == 1


@settings(max_examples=100, deadline=None)
@given(parent=st.sampled_from(EVOLUTION_GENOMES), seed=st.integers(0, 2 ** 32 - 1))
def test_mutate_locally_uses_only_the_given_codes(parent, seed):
  child = genome_lib.mutate_locally(parent, np.random.default_rng(seed))
  assert set(child.edges) <= set(genome_lib.EVOLUTION_CODES)
