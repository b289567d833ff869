"""Named random streams: every host-side draw comes from (run seed, stream, keys).

NumPy pads a seed's entropy with zeros, so `default_rng([s])`, `default_rng([s, 0])` and
`default_rng([s, 0, 0])` are one stream: streams keyed by plain integer lists collided
whenever one list was another plus zeros (the supernet's initial weights, layer 0's
initial population and the first batch's augmentation drew the same numbers). Here each
stream has its own tag, and tag and keys go into the SeedSequence's spawn key, which is
never padded.
"""

from __future__ import annotations

import numpy as np

STREAMS = ("supernet_weights", "initial_population", "warmup_cells", "evolution",
           "space_path", "search_path", "net_weights", "epoch_order", "augmentation",
           "search_alpha_path")


def _sequence(seed: int, stream: str, keys: tuple[int, ...]) -> np.random.SeedSequence:
  return np.random.SeedSequence(seed, spawn_key=(STREAMS.index(stream), *keys))


def generator(seed: int, stream: str, *keys: int) -> np.random.Generator:
  """The generator of ``stream`` (one of `STREAMS`) at ``keys`` (step, layer, ...)."""
  return np.random.default_rng(_sequence(seed, stream, keys))


def integer_seed(seed: int, stream: str, *keys: int) -> int:
  """A 31-bit integer seed from the same streams, for TensorFlow and TFDS."""
  return int(_sequence(seed, stream, keys).generate_state(1)[0] >> 1)
