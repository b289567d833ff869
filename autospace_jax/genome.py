"""Cell genomes: a 4-node DAG of operator codes plus expansion and mix genes (SPEC §3).

A genome is a frozen, hashable value. It converts to and from the official
``build_graph`` matrix, measures its Hamming distance to another genome, and mutates
locally inside a window of consecutive nodes (SPEC §6).
"""

from __future__ import annotations

import ast
import dataclasses
import itertools
import json
from typing import Any, Iterator, Sequence

import numpy as np

NUM_NODES = 4
# Edge slots (source, target) in the order genes are stored and vectorised.
EDGES: tuple[tuple[int, int], ...] = ((0, 1), (0, 2), (1, 2), (0, 3), (1, 3), (2, 3))
CHAIN_EDGES = ((0, 1), (1, 2), (2, 3))
UNUSED_EDGE = (0, 3)  # outside every mutation window; always `none`.
MUTABLE_EDGES = tuple(e for e in EDGES if e != UNUSED_EDGE)
EDGE_SLOT = {edge: slot for slot, edge in enumerate(EDGES)}
MUTABLE_SLOTS = tuple(EDGE_SLOT[e] for e in MUTABLE_EDGES)

UNUSED, NONE, IDENTITY = 0, 1, 2
CONV_CODES = (3, 5, 7, 9)
EDGE_CODES = (NONE, IDENTITY) + CONV_CODES
OP_NAMES = {NONE: "none", IDENTITY: "identity", 3: "dw3x3", 5: "dw5x5", 7: "dw7x7", 9: "dw9x9"}
EVOLUTION_CODES = (NONE, IDENTITY, 3, 5)
EXPANSION_RATIOS = (1, 3, 6)
# Length of the integer vector a genome becomes on device: 6 edges, e_idx, m2, m3.
GENE_VECTOR_LENGTH = len(EDGES) + 3


class GenomeError(ValueError):
  """A genome or matrix that breaks a validity rule; the message names the rule."""


@dataclasses.dataclass(frozen=True, order=True)
class Genome:
  """One cell: operator code per edge slot (order of ``EDGES``), expansion index, mix genes."""

  edges: tuple[int, ...]
  expansion_index: int = 2
  mix: tuple[int, int] = (0, 0)

  def __post_init__(self):
    object.__setattr__(self, "edges", tuple(int(c) for c in self.edges))
    object.__setattr__(self, "mix", tuple(int(m) for m in self.mix))
    object.__setattr__(self, "expansion_index", int(self.expansion_index))
    validate(self)

  @property
  def expansion(self) -> int:
    return EXPANSION_RATIOS[self.expansion_index]

  def edge(self, source: int, target: int) -> int:
    return self.edges[EDGE_SLOT[source, target]]

  def in_edges(self, node: int) -> list[tuple[int, int]]:
    """Active (source, code) pairs feeding ``node``, in source order."""
    return [(j, c) for (j, i), c in zip(EDGES, self.edges) if i == node and c != NONE]

  def mix_gene(self, node: int) -> int:
    """Mix gene of node 2 or 3; node 1 always sums."""
    return self.mix[node - 2] if node >= 2 else 0

  def uses_attention(self, node: int) -> bool:
    return self.mix_gene(node) == 1 and len(self.in_edges(node)) >= 2

  def expressed(self) -> "Genome":
    """This cell with the mix genes of single-input nodes cleared: genomes that differ only
    there compute the same function."""
    return dataclasses.replace(self, mix=tuple(int(self.uses_attention(n)) for n in (2, 3)))

  def to_vector(self) -> np.ndarray:
    """The int32 gene vector the supernet consumes: 6 edge codes, e_idx, m2, m3."""
    return np.array(self.edges + (self.expansion_index,) + self.mix, np.int32)

  @classmethod
  def from_vector(cls, vector: Sequence[int]) -> "Genome":
    v = [int(x) for x in vector]
    return cls(tuple(v[:6]), v[6], (v[7], v[8]))

  def describe(self) -> str:
    """Short human-readable form, e.g. ``e6 0>1:dw3x3 1>2:identity 2>3:identity``."""
    parts = [f"e{self.expansion}"]
    parts += [f"{j}>{i}:{OP_NAMES[c]}" for (j, i), c in zip(EDGES, self.edges) if c != NONE]
    parts += [f"attn{n}" for n in (2, 3) if self.uses_attention(n)]
    return " ".join(parts)


def validate(genome: Genome) -> None:
  """Raise ``GenomeError`` naming the first broken rule of SPEC §3."""
  if len(genome.edges) != len(EDGES):
    raise GenomeError(f"a genome has {len(EDGES)} edge codes, got {len(genome.edges)}")
  for (j, i), code in zip(EDGES, genome.edges):
    if code not in EDGE_CODES:
      raise GenomeError(
          f"edge {j}->{i} has unknown operator code {code}; allowed codes are {EDGE_CODES}")
    if (j, i) in CHAIN_EDGES and code == NONE:
      raise GenomeError(f"chain edge {j}->{i} is `none` (code 1); chain edges must carry an op")
  if genome.edge(*UNUSED_EDGE) != NONE:
    raise GenomeError(f"edge 0->3 must be `none` (code 1), got {genome.edge(*UNUSED_EDGE)}")
  if genome.expansion_index not in range(len(EXPANSION_RATIOS)):
    raise GenomeError(f"expansion index {genome.expansion_index} is not one of 0, 1, 2")
  if len(genome.mix) != 2 or any(m not in (0, 1) for m in genome.mix):
    raise GenomeError(f"mix genes must be two values in {{0, 1}}, got {genome.mix}")


def irb(kernel_size: int = 3, expansion: int = 6) -> Genome:
  """The inverted-residual block (MBConv) as a genome: chain (k, identity, identity)."""
  if expansion not in EXPANSION_RATIOS:
    raise GenomeError(f"expansion {expansion} is not one of {EXPANSION_RATIOS}")
  if kernel_size not in CONV_CODES:
    raise GenomeError(f"kernel size {kernel_size} is not one of {CONV_CODES}")
  edges = {(0, 1): kernel_size, (1, 2): IDENTITY, (2, 3): IDENTITY}
  return Genome(tuple(edges.get(e, NONE) for e in EDGES), EXPANSION_RATIOS.index(expansion))


REFERENCE = irb(3, 6)


# --- Official `build_graph` matrix -------------------------------------------------------


def to_matrix(genome: Genome) -> list[list[Any]]:
  """The official 4x4 nested list: A[i][j] = code of edge j->i, A[0][3] = e_idx, A[1][3] = mix."""
  a: list[list[Any]] = [[UNUSED] * NUM_NODES for _ in range(NUM_NODES)]
  for (j, i), code in zip(EDGES, genome.edges):
    a[i][j] = code
  a[0][3] = genome.expansion_index
  a[1][3] = list(genome.mix)
  return a


def from_matrix(matrix: Any) -> Genome:
  """Parse an official matrix (nested list or its string form) into a validated genome."""
  if isinstance(matrix, str):
    try:
      matrix = ast.literal_eval(matrix)
    except (ValueError, SyntaxError) as e:
      raise GenomeError(f"build_graph string is not a nested list: {matrix!r}") from e
  if (not isinstance(matrix, (list, tuple)) or len(matrix) != NUM_NODES
      or any(not isinstance(r, (list, tuple)) or len(r) != NUM_NODES for r in matrix)):
    raise GenomeError(f"a cell matrix must be 4x4, got {matrix!r}")
  mix = matrix[1][3]
  if (not isinstance(mix, (list, tuple)) or len(mix) != 2
      or any(type(m) is not int for m in mix)):
    raise GenomeError(f"entry [1][3] must hold the two integer mix genes [m2, m3], got "
                      f"{mix!r}")
  for i in range(NUM_NODES):
    for j in range(NUM_NODES):
      if j >= i and (i, j) not in ((0, 3), (1, 3)) and matrix[i][j] != UNUSED:
        raise GenomeError(f"entry [{i}][{j}] must be 0 (unused), got {matrix[i][j]!r}")
  for i in range(NUM_NODES):
    for j in range(i):
      if type(matrix[i][j]) is not int:  # bool is an int subclass: not a code
        raise GenomeError(f"entry [{i}][{j}] must be an integer code, got {matrix[i][j]!r}")
  if type(matrix[0][3]) is not int:
    raise GenomeError(f"entry [0][3] must be the expansion index, got {matrix[0][3]!r}")
  return Genome(tuple(matrix[i][j] for (j, i) in EDGES), matrix[0][3], tuple(mix))


def matrix_to_string(matrix: list[list[Any]]) -> str:
  """The string form used by `Motif.build_graph` in the official net files."""
  return json.dumps(matrix)


# --- Distance, enumeration, mutation -----------------------------------------------------


def hamming_distance(a: Genome, b: Genome) -> int:
  """r_H over the 5 mutable edges, the expansion gene and both mix genes (SPEC §6)."""
  x, y = a.edges, b.edges
  return (sum(x[s] != y[s] for s in MUTABLE_SLOTS) + (a.expansion_index != b.expansion_index)
          + (a.mix[0] != b.mix[0]) + (a.mix[1] != b.mix[1]))


def all_genomes(codes: Sequence[int] = EVOLUTION_CODES) -> Iterator[Genome]:
  """Every valid genome whose edges use ``codes`` (12,288 minus invalid for 4 codes)."""
  chain_codes = [c for c in codes if c != NONE]
  choices = [[NONE] if e == UNUSED_EDGE else (chain_codes if e in CHAIN_EDGES else list(codes))
             for e in EDGES]
  for edges in itertools.product(*choices):
    for e_idx in range(len(EXPANSION_RATIOS)):
      for mix in itertools.product((0, 1), repeat=2):
        yield Genome(edges, e_idx, mix)


def window_edges(start: int, window: int) -> tuple[tuple[int, int], ...]:
  """Edge slots with both ends among nodes ``start .. start + window - 1``."""
  nodes = range(start, start + window)
  return tuple(e for e in MUTABLE_EDGES if e[0] in nodes and e[1] in nodes)


def mutate_locally(genome: Genome, rng: np.random.Generator, window: int = 3,
                   codes: Sequence[int] = EVOLUTION_CODES, gene_probability: float = 1 / 8
                   ) -> Genome:
  """One local mutation (SPEC §6): a new op on one edge inside a random window of
  ``window`` consecutive nodes, or, with ``gene_probability``, a flipped expansion/mix gene.
  The child is always valid; constraint checks are the caller's (see evolution)."""
  if rng.random() < gene_probability:
    which = int(rng.integers(3))
    if which == 0:
      choices = [e for e in range(len(EXPANSION_RATIOS)) if e != genome.expansion_index]
      return dataclasses.replace(genome, expansion_index=int(rng.choice(choices)))
    mix = list(genome.mix)
    mix[which - 1] = 1 - mix[which - 1]
    return dataclasses.replace(genome, mix=tuple(mix))
  start = int(rng.integers(NUM_NODES - window + 1))
  slot = window_edges(start, window)[int(rng.integers(len(window_edges(start, window))))]
  current = genome.edge(*slot)
  allowed = [c for c in codes if c != current and not (slot in CHAIN_EDGES and c == NONE)]
  edges = list(genome.edges)
  edges[EDGE_SLOT[slot]] = int(rng.choice(allowed))
  return dataclasses.replace(genome, edges=tuple(edges))
