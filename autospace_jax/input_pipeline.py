"""Data sources for the three stages: deterministic, resumable, per-host numpy batches.

Stages 1 and 2 train weights on `search_train`; stage 2 trains α on the held-out
`search_val` (ProxylessNAS style; stage 1 trains α with the weights, SPEC §5); stage 3
trains on `train` and evaluates on `eval`. Every split yields dicts of numpy arrays:

  {'image': float32 [local_batch, S, S, 3] normalised with the data set's mean/std,
   'label': int32 [local_batch]}           (+ 'mask' float32 [local_batch] for 'eval')

with local_batch = global_batch_size // process_count.

Why it is built this way:
- A checkpoint stores only the step, so a stream is a pure function of (seed, step):
  `make_iterator(..., start_step=n)` yields exactly what the uninterrupted iterator
  yields from step n on. Epoch e is shuffled with a seed derived from (seed, e) (and the
  host, for TFDS), and augmentation randomness is derived from (seed, epoch, host,
  position) or (seed, step); `seeding` keeps these streams apart.
- Training-type splits ('train', 'search_train', 'search_val') repeat forever and drop
  the remainder of each epoch; 'eval' yields each example once, in order, with the last
  batch padded and 'mask' marking real rows. Every host yields the same number of eval
  batches so collective steps stay in lock step.
- TensorFlow and TFDS are imported lazily, inside the functions that read TFDS data, so
  this module (and the embedded 'digits' data set) needs only numpy and scikit-learn.

Data sets:
- 'digits' (default, offline): scikit-learn's `load_digits`, 1797 8x8 grey images,
  split 1437 train / 360 eval (stratified, random_state 0); `search_val` is a further
  stratified, seeded 10% (144 images) of the train part. Images are upsampled with
  bilinear interpolation in numpy, copied to 3 channels, scaled to [0, 1] and
  normalised. Train augmentation: pad 2 + random crop. All hosts see the same global
  permutation; host p takes rows [p*b, (p+1)*b) of every global batch, so the global
  stream does not depend on the number of hosts.
- 'cifar10' (TFDS): train = 'train', eval = 'test', search_train/search_val = the first
  90% / last 10% of 'train' (45000 / 5000). Train: 4-pixel pad + random crop + flip.
- 'imagenet2012' (TFDS, manual download): train = 'train', eval = 'validation',
  search_train/search_val = the first 98% / last 2% of 'train' (1255544 / 25623).
  Train: Inception random resized crop (area 0.08-1, aspect 3/4-4/3) + flip; eval: a
  center crop of 87.5% of the shorter side resized to S (the same as resizing the
  shorter side to S / 0.875 and cropping S). JPEGs are decoded only inside the crop.
  For TFDS data each host reads its own contiguous slice of the split (absolute-index
  split strings); train-type splits give every host floor(n / process_count) examples.
  `search_val` uses eval preprocessing (no augmentation) but repeats and shuffles.

Config fields (`config.data`): `name` ('digits' | 'cifar10' | 'imagenet2012'),
`image_size` (S; default per data set: 32, 32, 224), `data_dir` (TFDS data_dir, None
for the TFDS default), `shuffle_buffer` (TFDS shuffle buffer in examples; default
10000; digits shuffles whole epochs in memory).

Resuming mid-epoch on TFDS data re-reads (without decoding) the examples of the current
epoch that precede the resume point.
"""

import dataclasses
import functools
import logging
import math
from typing import Any, Iterator

import numpy as np

from autospace_jax import seeding

DATASETS = ("digits", "cifar10", "imagenet2012")
SPLITS = ("train", "eval", "search_train", "search_val")

# Per-channel mean / std of the [0, 1]-scaled training images.
_MEAN_STD = {
    "digits": ((0.3054,) * 3, (0.3761,) * 3),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "imagenet2012": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
# TFDS split names of the full train and eval sets, and the held-out share of 'train'.
_TFDS_SPLITS = {"cifar10": ("train", "test"), "imagenet2012": ("train", "validation")}
DOWNLOADABLE = ("cifar10",)  # TFDS fetches these itself; ImageNet's files come by hand
_HOLDOUT_PERCENT = {"digits": 10, "cifar10": 10, "imagenet2012": 2}
_DIGITS_EVAL_EXAMPLES = 360
_DIGITS_PAD = 2
_CIFAR_PAD = 4
_EVAL_CROP = 0.875


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """Static facts about a data set; known without touching disk."""
  num_classes: int
  train_examples: int
  eval_examples: int
  default_image_size: int


_INFO = {
    "digits": DatasetInfo(10, 1797 - _DIGITS_EVAL_EXAMPLES, _DIGITS_EVAL_EXAMPLES, 32),
    "cifar10": DatasetInfo(10, 50_000, 10_000, 32),
    "imagenet2012": DatasetInfo(1000, 1_281_167, 50_000, 224),
}


def dataset_info(name: str) -> DatasetInfo:
  """Classes, split sizes and default resolution of data set `name`."""
  if name not in _INFO:
    raise ValueError(f"data.name must be one of {DATASETS}, got {name!r}")
  return _INFO[name]


def _holdout_size(name: str, train_examples: int) -> int:
  """Examples of 'train' held out as 'search_val'."""
  fraction = _HOLDOUT_PERCENT[name] / 100
  if name == "digits":  # sklearn's train_test_split rounds the test share up.
    return math.ceil(fraction * train_examples)
  return round(fraction * train_examples)


def _split_range(name: str, split: str, train_examples: int,
                 eval_examples: int) -> tuple[int, int]:
  """[start, stop) of `split` inside the data set's full train or eval split."""
  if split == "eval":
    return 0, eval_examples
  if split == "train":
    return 0, train_examples
  cut = train_examples - _holdout_size(name, train_examples)
  return (0, cut) if split == "search_train" else (cut, train_examples)


def num_examples(name: str, split: str) -> int:
  """Number of examples in `split` of data set `name` (all hosts together)."""
  _check_split(split)
  info = dataset_info(name)
  start, stop = _split_range(name, split, info.train_examples, info.eval_examples)
  return stop - start


def steps_per_epoch(data_config: Any, split: str, global_batch_size: int) -> int:
  """Global steps in one pass over `split`: floor for train-type splits, ceil for eval."""
  _check_batch(global_batch_size, 1)
  n = num_examples(data_config.name, split)
  if split == "eval":
    return -(-n // global_batch_size)
  return n // global_batch_size


def make_iterator(data_config: Any, split: str, global_batch_size: int, *, seed: int,
                  start_step: int = 0, process_index: int = 0,
                  process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """This host's batches of `split`, starting at global step `start_step`.

  Train-type splits are infinite; 'eval' is one ordered pass with padding and 'mask'
  (`start_step` is ignored for it). Raises ValueError for an unknown data set or split,
  a batch size not divisible by `process_count`, or a bad host index.
  """
  name = data_config.name
  dataset_info(name)
  _check_split(split)
  _check_batch(global_batch_size, process_count)
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index must be in [0, {process_count}), got {process_index}")
  if start_step < 0:
    raise ValueError(f"start_step must be >= 0, got {start_step}")
  if split != "eval" and num_examples(name, split) < global_batch_size:
    raise ValueError(f"global_batch_size {global_batch_size} exceeds the "
                     f"{num_examples(name, split)} examples of split {split!r}")
  image_size = _image_size(data_config)
  local_batch = global_batch_size // process_count
  if name == "digits":
    return _digits_iterator(split, image_size, global_batch_size, local_batch, seed,
                            start_step, process_index)
  return _tfds_iterator(data_config, split, image_size, local_batch, seed, start_step,
                        process_index, process_count)


def placeholder_batch(data_config: Any, global_batch_size: int,
                      process_count: int = 1) -> dict[str, np.ndarray]:
  """Zeros with the shapes and dtypes of this host's training batches (the module
  docstring's contract), built without reading any data: stages compile their programs
  for these while the data pipeline starts."""
  _check_batch(global_batch_size, process_count)
  size, local_batch = _image_size(data_config), global_batch_size // process_count
  return {"image": np.zeros((local_batch, size, size, 3), np.float32),
          "label": np.zeros((local_batch,), np.int32)}


def _check_split(split: str) -> None:
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def _check_batch(global_batch_size: int, process_count: int) -> None:
  if process_count < 1:
    raise ValueError(f"process_count must be >= 1, got {process_count}")
  if global_batch_size < 1 or global_batch_size % process_count:
    raise ValueError(f"global_batch_size {global_batch_size} must be a positive multiple "
                     f"of process_count {process_count}")


def _image_size(data_config: Any) -> int:
  size = data_config.get("image_size", None) or _INFO[data_config.name].default_image_size
  return int(size)


# --- digits: in memory, numpy only ---


def _bilinear_matrix(size_in: int, size_out: int) -> np.ndarray:
  """[size_out, size_in] weights of half-pixel bilinear resizing along one axis."""
  src = np.clip((np.arange(size_out) + 0.5) * size_in / size_out - 0.5, 0, size_in - 1)
  lo = np.floor(src).astype(int)
  hi = np.minimum(lo + 1, size_in - 1)
  frac = src - lo
  weights = np.zeros((size_out, size_in))
  np.add.at(weights, (np.arange(size_out), lo), 1 - frac)
  np.add.at(weights, (np.arange(size_out), hi), frac)
  return weights


@functools.lru_cache(maxsize=4)
def _digits_arrays(image_size: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Per split: normalised grey images float32 [n, S, S] and int32 labels."""
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split
  digits = load_digits()
  x_train, x_eval, y_train, y_eval = train_test_split(
      digits.images, digits.target, test_size=_DIGITS_EVAL_EXAMPLES,
      stratify=digits.target, random_state=0)
  x_search, x_val, y_search, y_val = train_test_split(
      x_train, y_train, test_size=_holdout_size("digits", len(x_train)),
      stratify=y_train, random_state=0)
  resize = _bilinear_matrix(8, image_size)
  (mean,), (std,) = (s[:1] for s in _MEAN_STD["digits"])

  def prepare(images, labels):
    images = np.einsum("ij,njk,lk->nil", resize, images / 16.0, resize)
    return ((images - mean) / std).astype(np.float32), labels.astype(np.int32)

  return {"train": prepare(x_train, y_train), "eval": prepare(x_eval, y_eval),
          "search_train": prepare(x_search, y_search),
          "search_val": prepare(x_val, y_val)}


def _random_translate(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Pad by _DIGITS_PAD with background and crop back at a random offset per image."""
  n, size = images.shape[:2]
  background = -_MEAN_STD["digits"][0][0] / _MEAN_STD["digits"][1][0]
  padded = np.pad(images, ((0, 0), (_DIGITS_PAD,) * 2, (_DIGITS_PAD,) * 2),
                  constant_values=background)
  offsets = rng.integers(0, 2 * _DIGITS_PAD + 1, size=(n, 2))
  rows = offsets[:, :1] + np.arange(size)
  cols = offsets[:, 1:] + np.arange(size)
  return padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]


def _rgb(images: np.ndarray) -> np.ndarray:
  return np.repeat(images[..., None], 3, axis=-1)


def _digits_iterator(split: str, image_size: int, global_batch: int, local_batch: int,
                     seed: int, start_step: int,
                     process_index: int) -> Iterator[dict[str, np.ndarray]]:
  images, labels = _digits_arrays(image_size)[split]
  n = len(labels)
  rows = slice(process_index * local_batch, (process_index + 1) * local_batch)
  if split == "eval":
    for start in range(0, n, global_batch):
      index = np.arange(start, start + global_batch)[rows]
      real = index < n
      index = np.where(real, index, 0)
      yield {"image": _rgb(np.where(real[:, None, None], images[index], 0)),
             "label": np.where(real, labels[index], 0).astype(np.int32),
             "mask": real.astype(np.float32)}
    return
  steps = n // global_batch
  epoch, perm = -1, None
  step = start_step
  while True:
    if step // steps != epoch:
      epoch = step // steps
      perm = seeding.generator(seed, "epoch_order", epoch).permutation(n)
    offset = (step % steps) * global_batch
    index = perm[offset:offset + global_batch]
    batch = images[index]
    if split != "search_val":
      batch = _random_translate(batch, seeding.generator(seed, "augmentation", step))
    yield {"image": _rgb(batch[rows]), "label": labels[index[rows]]}
    step += 1


# --- TFDS: cifar10 and imagenet2012 ---


def _tf():
  """TensorFlow, imported on first use and kept off the GPUs (JAX owns them)."""
  import tensorflow as tf
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:  # Devices were already initialised; nothing to hide any more.
    pass
  return tf


def _host_range(start: int, stop: int, process_index: int, process_count: int,
                drop_remainder: bool) -> tuple[int, int]:
  """This host's contiguous, disjoint slice of [start, stop).

  With `drop_remainder` every host gets floor(n / process_count) examples; otherwise the
  slices cover [start, stop) and differ in size by at most one.
  """
  n = stop - start
  if drop_remainder:
    per_host = n // process_count
    return start + process_index * per_host, start + (process_index + 1) * per_host
  return (start + process_index * n // process_count,
          start + (process_index + 1) * n // process_count)


def _normalise(tf, image, name: str):
  mean, std = _MEAN_STD[name]
  return (tf.cast(image, tf.float32) / 255.0 - mean) / std


def _cifar_preprocess(tf, image_size: int, augment: bool):
  def preprocess(image, seed):
    image = tf.io.decode_png(image, channels=3)
    if augment:
      crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
      image = tf.pad(image, [[_CIFAR_PAD] * 2, [_CIFAR_PAD] * 2, [0, 0]])
      image = tf.image.stateless_random_crop(image, [32, 32, 3], crop_seed)
      image = tf.image.stateless_random_flip_left_right(image, flip_seed)
    image = _normalise(tf, image, "cifar10")
    if image_size != 32:
      image = tf.image.resize(image, [image_size, image_size], "bilinear")
    return image
  return preprocess


def _imagenet_preprocess(tf, image_size: int, augment: bool):
  def preprocess(image, seed):
    shape = tf.image.extract_jpeg_shape(image)
    if augment:
      crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
      begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
          shape, tf.zeros([1, 0, 4]), crop_seed, min_object_covered=0.0,
          aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.08, 1.0), max_attempts=10,
          use_image_if_no_bounding_boxes=True)
      window = tf.stack([begin[0], begin[1], size[0], size[1]])
    else:
      side = tf.cast(_EVAL_CROP * tf.cast(tf.minimum(shape[0], shape[1]), tf.float32),
                     tf.int32)
      window = tf.stack([(shape[0] - side + 1) // 2, (shape[1] - side + 1) // 2, side, side])
    image = tf.image.decode_and_crop_jpeg(image, window, channels=3)
    image = tf.image.resize(image, [image_size, image_size], "bilinear")
    if augment:
      image = tf.image.stateless_random_flip_left_right(image, flip_seed)
    return (image / 255.0 - _MEAN_STD["imagenet2012"][0]) / _MEAN_STD["imagenet2012"][1]
  return preprocess


class DataUnavailable(ValueError):
  """The configured TFDS data set has no prepared copy under ``data.data_dir``."""


def check_prepared(data_config: Any, download: bool = False) -> None:
  """Raise `DataUnavailable` unless the data set can be read (digits always can): a run
  checks this before it starts rather than failing at its first batch. With ``download``,
  TFDS first downloads and prepares a data set it can fetch itself (CIFAR-10, ~160 MB)
  that ``data.data_dir`` lacks; ImageNet needs its manual download (docs/imagenet.md)."""
  if data_config.name in _TFDS_SPLITS:
    _prepared_builder(data_config, download and data_config.name in DOWNLOADABLE)


def _prepared_builder(data_config: Any, download: bool = False) -> Any:
  """The data set's TFDS builder (downloaded and prepared first, with ``download``, if
  it is not), after opening its train split (lazily: no example is read), which is what
  fails when the data set was never prepared there."""
  _tf()
  import tensorflow_datasets as tfds
  name, data_dir = data_config.name, data_config.get("data_dir") or None
  builder = tfds.builder(name, data_dir=data_dir)
  if download and not builder.is_prepared():
    logging.info("downloading and preparing %s in %s", name, builder.data_path)
    try:
      builder.download_and_prepare()
    except Exception as error:  # noqa: BLE001 -- network and disk errors alike
      raise DataUnavailable(
          f"data.name={name!r}: TFDS could not download it into {builder.data_path} "
          f"({type(error).__name__}: {error}); run `tfds build {name} --data_dir=DIR` where "
          "there is network, then point data.data_dir at DIR") from error
  try:
    builder.as_dataset(split=_TFDS_SPLITS[name][0])
  except (AssertionError, FileNotFoundError) as error:
    raise DataUnavailable(
        f"data.data_dir={data_dir or ''!r}: TFDS finds no prepared {name} in "
        f"{builder.data_path}; prepare it there (`tfds build {name} --data_dir=DIR`; "
        "ImageNet: the manual download in docs/imagenet.md) or point data.data_dir at the "
        "directory that holds it") from error
  return builder


def _tfds_iterator(data_config: Any, split: str, image_size: int, local_batch: int,
                   seed: int, start_step: int, process_index: int,
                   process_count: int) -> Iterator[dict[str, np.ndarray]]:
  tf = _tf()
  import tensorflow_datasets as tfds
  name = data_config.name
  builder = _prepared_builder(data_config)
  train_name, eval_name = _TFDS_SPLITS[name]
  base = eval_name if split == "eval" else train_name
  # Sizes come from the stored split (equal to dataset_info's on a standard copy).
  total = int(builder.as_dataset(split=base).cardinality())
  start, stop = _split_range(name, split, total, total)
  lo, hi = _host_range(start, stop, process_index, process_count,
                       drop_remainder=split != "eval")
  count = hi - lo
  make = {"cifar10": _cifar_preprocess, "imagenet2012": _imagenet_preprocess}[name]
  augment = split in ("train", "search_train")
  preprocess = make(tf, image_size, augment)
  decoders = {"image": tfds.decode.SkipDecoding()}
  autotune = tf.data.AUTOTUNE

  def read(shuffle_seed: int | None):
    ds = builder.as_dataset(
        split=f"{base}[{lo}:{hi}]", decoders=decoders, shuffle_files=shuffle_seed is not None,
        read_config=tfds.ReadConfig(shuffle_seed=shuffle_seed, try_autocache=False))
    # take() is a no-op on real data; it keeps counts right under tfds.testing.mock_data.
    return ds.take(count).map(lambda ex: (ex["image"], tf.cast(ex["label"], tf.int32)))

  if split == "eval":
    num_batches = -(-math.ceil((stop - start) / process_count) // local_batch)
    ds = read(None).map(lambda image, label: {
        "image": preprocess(image, tf.zeros([2], tf.int64)), "label": label,
        "mask": tf.constant(1.0)}, num_parallel_calls=autotune)
    pad = tf.data.Dataset.from_tensors({
        "image": tf.zeros([image_size, image_size, 3]), "label": tf.constant(0, tf.int32),
        "mask": tf.constant(0.0)}).repeat(num_batches * local_batch - count)
    ds = ds.concatenate(pad).batch(local_batch).prefetch(autotune)
    yield from tfds.as_numpy(ds)
    return

  steps = count // local_batch
  if not steps:
    raise ValueError(f"global_batch_size: host {process_index} holds {count} examples of "
                     f"split {split!r}, fewer than its batch of {local_batch}")
  epoch, offset = divmod(start_step, steps)
  while True:
    epoch_seed = seeding.integer_seed(seed, "epoch_order", epoch, process_index)
    # Per host: hosts read different examples and must not share augmentation draws.
    augment_seed = tf.constant(seeding.integer_seed(seed, "augmentation", epoch,
                                                    process_index), tf.int64)
    ds = read(epoch_seed).shuffle(min(data_config.get("shuffle_buffer", 10_000), count),
                                  seed=epoch_seed, reshuffle_each_iteration=False)
    ds = ds.take(steps * local_batch).enumerate().skip(offset * local_batch)
    ds = ds.map(lambda i, example: {
        "image": preprocess(example[0], tf.stack([augment_seed, i])),
        "label": example[1]}, num_parallel_calls=autotune)
    yield from tfds.as_numpy(ds.batch(local_batch, drop_remainder=True).prefetch(autotune))
    epoch, offset = epoch + 1, 0
