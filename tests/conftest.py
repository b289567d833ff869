"""Shared fixtures: tiny configs that exercise the real code paths in seconds."""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = Path(__file__).resolve().parent / "data"
# One persistent XLA cache for the suite and its subprocesses: most tests run the same
# small per-op supernet programs, which then compile once per suite, not once per test.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(ROOT / ".jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

from autospace_jax import presets  # noqa: E402


def reference_file(name: str) -> Path:
  """A reference file: the copy in tests/data, else the shared checkout beside the repo."""
  local = DATA / name
  return local if local.exists() else (
      Path(__file__).resolve().parents[1].parent / "shared" / "reference" / name)


def tiny_config(**stage_overrides):
  """The default config shrunk to a 6-layer, 16-pixel net and a handful of steps."""
  config = presets.default()
  config.data.image_size = 32
  config.model.width_multiplier = 0.25
  config.model.layers_per_stage = (1, 1, 1, 1, 1, 1)
  config.space.population_size = 12
  config.space.num_cells = 3
  config.space.mutation_interval = 3
  config.space.batch_size = 32
  config.space.team_sizes = (3, 4, 5, 6)
  config.space.reference_stop_epoch = 1
  config.search.batch_size = 32
  config.search.target_fractions = (0.8,)
  config.train.batch_size = 32
  config.checkpoint.every_steps = 5
  config.log_every_steps = 5
  for key, value in stage_overrides.items():
    section, field = key.split("__")
    config[section][field] = value
  return config


@pytest.fixture
def tiny():
  return tiny_config


@pytest.fixture(autouse=True)
def _quiet_tf():
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def short_schedule(config, warmup=0.1, main=0.2):
  """Fractions of an epoch for every stage: a few steps each."""
  config.space.warmup_epochs = warmup
  config.space.evolution_epochs = main
  config.search.warmup_epochs = warmup
  config.search.epochs = main
  config.train.warmup_epochs = warmup
  config.train.epochs = main
  config.train.eval_every_epochs = 0
  return config
