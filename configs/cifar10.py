"""CIFAR-10 from TFDS: between the embedded default and ImageNet (one GPU, hours)."""

import ml_collections

from autospace_jax import presets


def get_config() -> ml_collections.ConfigDict:
  return presets.cifar10()
