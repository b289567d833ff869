"""Random streams: each purpose draws its own numbers, reproducibly."""

import itertools

from autospace_jax import seeding


def first_draws(seed, stream, *keys):
  return seeding.generator(seed, stream, *keys).random(4).tolist()


def test_streams_and_keys_never_share_numbers_even_with_zero_keys():
  keyed = [(stream, keys) for stream in seeding.STREAMS
           for keys in ((), (0,), (0, 0), (1,), (1, 0), (0, 1))]
  draws = [first_draws(0, stream, *keys) for stream, keys in keyed]
  for (a, da), (b, db) in itertools.combinations(zip(keyed, draws), 2):
    assert da != db, (a, b)


def test_a_stream_is_a_pure_function_of_seed_and_keys():
  assert first_draws(3, "evolution", 40, 2) == first_draws(3, "evolution", 40, 2)
  assert first_draws(3, "evolution", 40, 2) != first_draws(4, "evolution", 40, 2)
  seed = seeding.integer_seed(3, "epoch_order", 1)
  assert seed == seeding.integer_seed(3, "epoch_order", 1) and 0 <= seed < 2**31
