"""Stage 3's trainer: its train step computes what the plain jitted step computes, and a
diverging run stops without saving a broken state."""

import functools
import re

import jax
import numpy as np
import pytest

from autospace_jax import checkpointing
from autospace_jax import genome as genome_lib
from autospace_jax import input_pipeline
from autospace_jax import netspec
from autospace_jax import supernet
from autospace_jax import train
from conftest import tiny_config


def test_the_train_step_compiled_with_cpu_options_matches_xla_defaults(tmp_path):
  # The options speed up the compile, not the maths: a step agrees to float rounding.
  config = tiny_config()
  net = netspec.build_net([genome_lib.REFERENCE] * 6, config.model.width_multiplier,
                          tuple(config.model.layers_per_stage), 10, config.data.image_size)
  trainer = train.Trainer(config, net, str(tmp_path))
  state = trainer.init_state()
  batch = trainer.parallel.global_batch(next(input_pipeline.make_iterator(
      config.data, "train", config.train.batch_size, seed=0)))
  plain = jax.jit(functools.partial(train.train_step, trainer.model, trainer.tx,
                                    trainer.cfg.label_smoothing))
  expected = jax.device_get(plain(state, batch))
  got = jax.device_get(trainer._train_step(state, batch))  # donates ``state``: last
  for want, have in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
    np.testing.assert_allclose(have, want, rtol=1e-4, atol=1e-6)


def test_a_diverging_run_stops_at_its_non_finite_loss_and_keeps_every_save_before_it(
    tmp_path):
  config = tiny_config()
  config.train.learning_rate = 1e12  # the loss is finite for a step or two, then NaN
  config.train.warmup_epochs = 0.0
  config.checkpoint.every_steps = 1  # a save is due after every step
  net = netspec.build_net([genome_lib.REFERENCE] * 6, config.model.width_multiplier,
                          tuple(config.model.layers_per_stage), 10, config.data.image_size)
  trainer = train.Trainer(config, net, str(tmp_path))
  with pytest.raises(supernet.NonFiniteLoss, match=r"at step (\d+)") as raised:
    trainer.run()
  bad_step = int(re.search(r"at step (\d+)", str(raised.value)).group(1))
  # Every step before it was saved, the last one too although its save was in flight.
  assert max(checkpointing.Checkpointer(str(tmp_path / "checkpoints"), 10).all_steps()) == (
      bad_step - 1)
