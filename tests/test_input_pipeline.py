"""Input pipeline: shapes, normalisation, exact resume, host sharding, eval coverage.

TFDS data sets are exercised only under `tfds.testing.mock_data` (no network, no disk).
"""

import itertools
import subprocess
import sys
from pathlib import Path

import ml_collections
import numpy as np
import pytest

from autospace_jax import input_pipeline

ROOT = Path(__file__).resolve().parents[1]


def data_config(name="digits", image_size=32, shuffle_buffer=64):
  config = ml_collections.ConfigDict()
  config.name = name
  config.image_size = image_size
  config.data_dir = None
  config.shuffle_buffer = shuffle_buffer
  return config


def take(iterator, n):
  return list(itertools.islice(iterator, n))


def assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])


def test_dataset_info_is_static():
  assert input_pipeline.dataset_info("digits") == input_pipeline.DatasetInfo(10, 1437, 360, 32)
  assert input_pipeline.dataset_info("cifar10").train_examples == 50_000
  assert input_pipeline.dataset_info("imagenet2012").num_classes == 1000
  assert input_pipeline.steps_per_epoch(data_config(), "search_train", 100) == 12  # 1293
  assert input_pipeline.steps_per_epoch(data_config(), "eval", 100) == 4


def test_digits_batches_shape_dtype_and_normalisation():
  it = input_pipeline.make_iterator(data_config(image_size=24), "train", 64, seed=0)
  batches = take(it, 10)
  images = np.concatenate([b["image"] for b in batches])
  labels = np.concatenate([b["label"] for b in batches])
  assert batches[0]["image"].shape == (64, 24, 24, 3)
  assert batches[0]["image"].dtype == np.float32 and batches[0]["label"].dtype == np.int32
  assert labels.min() >= 0 and labels.max() < 10
  assert abs(images.mean()) < 0.2 and 0.6 < images.std() < 1.2
  np.testing.assert_array_equal(images[..., 0], images[..., 2])  # grey copied to RGB


@pytest.mark.parametrize("split", ["train", "search_val"])
def test_digits_resume_matches_uninterrupted_stream(split):
  config = data_config()
  steps = input_pipeline.steps_per_epoch(config, split, 48)
  full = take(input_pipeline.make_iterator(config, split, 48, seed=3), steps + 4)
  for n in (2, steps + 1):  # mid-epoch and past an epoch boundary
    resumed = take(input_pipeline.make_iterator(config, split, 48, seed=3, start_step=n),
                   steps + 4 - n)
    assert_same_batches(full[n:], resumed)
  other_seed = next(input_pipeline.make_iterator(config, split, 48, seed=4))
  assert not np.array_equal(other_seed["label"], full[0]["label"])


def test_digits_hosts_read_disjoint_examples():
  config = data_config()
  steps = input_pipeline.steps_per_epoch(config, "search_train", 64)
  seen = []
  for host in range(2):
    it = input_pipeline.make_iterator(config, "search_train", 64, seed=0, process_index=host,
                                      process_count=2)
    batches = take(it, steps)
    assert batches[0]["image"].shape == (32, 32, 32, 3)
    seen.append({b["image"][i].tobytes() for b in batches for i in range(32)})
  assert not seen[0] & seen[1]
  assert len(seen[0]) + len(seen[1]) == steps * 64


def test_search_splits_partition_train():
  config = data_config()
  n_search = input_pipeline.num_examples("digits", "search_train")
  n_val = input_pipeline.num_examples("digits", "search_val")
  assert (n_search, n_val) == (1293, 144)
  assert input_pipeline.num_examples("cifar10", "search_val") == 5000
  arrays = input_pipeline._digits_arrays(config.image_size)
  keys = {s: {x.tobytes() for x in arrays[s][0]} for s in ("train", "search_train", "search_val")}
  assert not keys["search_train"] & keys["search_val"]
  assert keys["search_train"] | keys["search_val"] == keys["train"]


def test_digits_eval_covers_each_example_once_with_mask():
  config = data_config()
  rows = []
  for host in range(2):
    batches = list(input_pipeline.make_iterator(config, "eval", 100, seed=0,
                                                process_index=host, process_count=2))
    assert len(batches) == 4  # every host yields the same number of batches
    for b in batches:
      assert b["mask"].dtype == np.float32 and b["image"].shape == (50, 32, 32, 3)
      rows += [b["image"][i].tobytes() for i in np.flatnonzero(b["mask"])]
  assert len(rows) == 360
  eval_images = input_pipeline._digits_arrays(32)["eval"][0]
  assert sorted(rows) == sorted(np.repeat(eval_images[..., None], 3, -1)[i].tobytes()
                                for i in range(360))


def test_tfds_host_ranges_are_disjoint_and_cover():
  for drop in (False, True):
    ranges = [input_pipeline._host_range(100, 1103, p, 4, drop) for p in range(4)]
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert ranges[0][0] == 100
    assert ranges[-1][1] == (1100 if drop else 1103)


def test_bad_arguments_raise_naming_the_field():
  with pytest.raises(ValueError, match="split"):
    input_pipeline.make_iterator(data_config(), "valid", 32, seed=0)
  with pytest.raises(ValueError, match="global_batch_size"):
    input_pipeline.make_iterator(data_config(), "train", 30, seed=0, process_count=4)
  with pytest.raises(ValueError, match="data.name"):
    input_pipeline.make_iterator(data_config(name="mnist"), "train", 32, seed=0)


def test_import_does_not_import_tensorflow():
  code = ("import sys, ml_collections\n"
          "from autospace_jax import input_pipeline as p\n"
          "config = ml_collections.ConfigDict({'name': 'digits', 'image_size': 16})\n"
          "next(p.make_iterator(config, 'train', 8, seed=0))\n"
          "print(any(m.split('.')[0] in ('tensorflow', 'tensorflow_datasets') "
          "for m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                       text=True, check=True)
  assert out.stdout.strip() == "False"


@pytest.fixture(scope="module")
def tfds_mock():
  tfds = pytest.importorskip("tensorflow_datasets")
  return lambda n: tfds.testing.mock_data(num_examples=n)


def test_cifar10_mock_batches_and_exact_resume(tfds_mock):
  config = data_config("cifar10", image_size=32, shuffle_buffer=16)
  with tfds_mock(40):
    # 40 mock examples -> search_train keeps 36 -> 4 steps of 8 per epoch.
    full = take(input_pipeline.make_iterator(config, "search_train", 8, seed=1), 7)
    resumed = take(input_pipeline.make_iterator(config, "search_train", 8, seed=1,
                                                start_step=3), 4)
    evals = list(input_pipeline.make_iterator(config, "eval", 16, seed=0))
  assert full[0]["image"].shape == (8, 32, 32, 3) and full[0]["image"].dtype == np.float32
  assert full[0]["label"].dtype == np.int32 and full[0]["label"].max() < 10
  assert_same_batches(full[3:], resumed)
  assert not np.array_equal(full[0]["image"], full[4]["image"])  # epochs reshuffle
  assert [b["mask"].sum() for b in evals] == [16, 16, 8]
  assert evals[-1]["image"].shape == (16, 32, 32, 3)


def test_imagenet_mock_batches(tfds_mock):
  config = data_config("imagenet2012", image_size=64, shuffle_buffer=8)
  with tfds_mock(6):
    train = next(input_pipeline.make_iterator(config, "train", 4, seed=0))
    evals = list(input_pipeline.make_iterator(config, "eval", 4, seed=0))
  assert train["image"].shape == (4, 64, 64, 3) and train["image"].dtype == np.float32
  assert train["label"].dtype == np.int32 and train["label"].max() < 1000
  assert np.isfinite(train["image"]).all()
  assert [b["mask"].tolist() for b in evals] == [[1, 1, 1, 1], [1, 1, 0, 0]]
  assert evals[0]["image"].shape == (4, 64, 64, 3)


def assert_placeholder_matches(config, batch, global_batch_size, process_count=1):
  placeholder = input_pipeline.placeholder_batch(config, global_batch_size, process_count)
  assert {k: (v.shape, v.dtype) for k, v in placeholder.items()} == {
      k: (batch[k].shape, batch[k].dtype) for k in ("image", "label")}


@pytest.mark.parametrize("process_count", [1, 2])
def test_the_placeholder_batch_has_the_shapes_and_dtypes_of_digits_batches(process_count):
  config = data_config("digits", image_size=24)
  batch = next(input_pipeline.make_iterator(config, "search_train", 16, seed=0,
                                            process_count=process_count))
  assert_placeholder_matches(config, batch, 16, process_count)


@pytest.mark.parametrize("name,image_size", [("cifar10", 32), ("imagenet2012", 64)])
def test_the_placeholder_batch_has_the_shapes_and_dtypes_of_tfds_batches(
    tfds_mock, name, image_size):
  config = data_config(name, image_size=image_size, shuffle_buffer=8)
  with tfds_mock(40):
    batch = next(input_pipeline.make_iterator(config, "search_train", 8, seed=0))
  assert_placeholder_matches(config, batch, 8)
