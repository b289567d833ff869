"""Stage 3's trainer: its train step computes what the plain jitted step computes."""

import functools

import jax
import numpy as np

from autospace_jax import genome as genome_lib
from autospace_jax import input_pipeline
from autospace_jax import netspec
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
