"""The paper's ImageNet settings (SPEC §2, §5-7): P 1000, K 9, f 40, 40 + 120 epochs.

Run: python -m autospace_jax.main --config=configs/imagenet.py --workdir=gs://BUCKET/run
with --config.data.data_dir pointing at a TFDS directory holding imagenet2012.
"""

import ml_collections

from autospace_jax import presets


def get_config() -> ml_collections.ConfigDict:
  return presets.imagenet()
