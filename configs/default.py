"""Embedded default: the whole pipeline on scikit-learn's digits, on CPU, in minutes.

Sized for 2 CPU cores: a 0.35-width ProxylessNAS skeleton with 6 searchable layers at
32x32, small populations, and short stages. Every field is documented in
`autospace_jax/presets.py` (`imagenet`), which holds the paper's settings.
"""

import ml_collections

from autospace_jax import presets


def get_config() -> ml_collections.ConfigDict:
  return presets.default()
