"""Check a run configuration before any compute; every error is one line naming the field.

A bad value otherwise surfaces late and far from its cause: a tournament larger than the
population fails at the first evolution round, a MAdds cap no cell can meet fails after
the data pipeline and the supernet are built, a batch that does not split over the
devices fails at the first step. `validate` runs right after flag parsing and raises
`ConfigError("space.num_cells=12 must be <= space.population_size=10")`-style messages.

Rules that are choices of this module:

- `data.image_size` is an int >= 16. It need not be a multiple of the net's total stride
  (32): every strided op pads k // 2 and sizes round up, identically in compute, counting
  and the supernet's layer shapes; below 16 most layers would run on one pixel.
- Epoch counts are numbers, not only ints, because short runs use fractions of an epoch;
  `*.epochs` and `space.evolution_epochs` must be > 0, warm-ups >= 0.
- Checks that cost time or depend on the machine run only for the stages in
  `config.stages`: the MAdds-cap feasibility check (stage space), the learned-space file
  (stage search without space), each batch size against the examples of the split the
  stage trains on, and batch-size divisibility by the device and process counts. The
  latter is skipped in a multi-process job that has not yet joined `jax.distributed`,
  since touching a device first would make joining impossible; `main` runs
  `check_devices` once it has joined.
- A local workdir that already holds stage outputs resumes that run, so `RESUME_FIELDS`
  (seed, data, skeleton) and the settings of each stage it holds must equal those in its
  config.json, and a given `train.net` the net its stage-3 directory trained.
- A `gs://` workdir is read (config.json, which stages have outputs) through etils.epath
  but not probed for writing; `gs://` train.net and search.space files are not read.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import tempfile
from typing import Any, Iterable, Sequence

from etils import epath
import ml_collections

from autospace_jax import evolution
from autospace_jax import genome as genome_lib
from autospace_jax import input_pipeline
from autospace_jax import netspec

STAGES = ("space", "search", "train")
ESTIMATORS = ("sampled", "proxyless")
DTYPES = ("float32", "bfloat16")
DERIVATIONS = ("argmax", "nudge")
BUILTIN_SPACES = ("learned", "irb")
MIN_IMAGE_SIZE = 16
# r_H counts the 5 mutable edges, the expansion gene and both mix genes.
MAX_REFERENCE_DISTANCE = len(genome_lib.MUTABLE_EDGES) + 3
MAX_TARGET_FRACTION = 10.0
# Each stage's global batch size and the splits its steps draw from (stage 3's evaluation
# pads its last batch, so any batch size fits 'eval').
BATCHES = {"space": ("space.batch_size", ("search_train",)),
           "search": ("search.batch_size", ("search_train", "search_val")),
           "train": ("train.batch_size", ("train",))}


class ConfigError(ValueError):
  """An invalid configuration value; the message is one line that names the field."""

  def __init__(self, message: str):
    super().__init__(" ".join(message.splitlines()))


def validate(config: ml_collections.ConfigDict, workdir: str | None = None) -> None:
  """Raise `ConfigError` on the first invalid field of ``config``.

  ``workdir`` is the resolved work directory (default: ``config.workdir`` when set); it is
  created if needed and must be writable, and a stage-2-only run reads its learned space.
  """
  stages = _stages(config)
  _check_top_level(config)
  _check_data_and_model(config)
  _check_space(config)
  _check_search(config, stages)
  _check_train(config, stages)
  _check_batches_fit_splits(config, stages)
  workdir = workdir or _value(config, "workdir") or None
  if workdir is not None:
    _check_earlier_run(config, stages, workdir)
  if "space" in stages:
    _check_madds_cap(config)
  check_devices(config)
  if workdir is not None and not _is_remote(workdir):
    _check_workdir(workdir)  # last: it creates the directory.


# --- Field access and generic checks ----------------------------------------------------


def _value(config: ml_collections.ConfigDict, path: str) -> Any:
  node = config
  for part in path.split("."):
    try:
      node = node[part]
    except (KeyError, AttributeError, TypeError):
      raise ConfigError(f"{path} is missing from the config") from None
  return node


def _is_int(value: Any) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
  return (isinstance(value, numbers.Real) and not isinstance(value, bool)
          and math.isfinite(value))


def _check_range(path: str, value: float, low: float | None = None,
                 high: float | None = None, low_open: bool = False,
                 high_open: bool = False) -> None:
  too_low = low is not None and (value <= low if low_open else value < low)
  too_high = high is not None and (value >= high if high_open else value > high)
  if not (too_low or too_high):
    return
  if low is not None and high is not None:
    rule = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
  elif low is not None:
    rule = f"{'>' if low_open else '>='} {low:g}"
  else:
    rule = f"{'<' if high_open else '<='} {high:g}"
  raise ConfigError(f"{path}={value!r} must be {rule}")


def _int(config: ml_collections.ConfigDict, path: str, low: int | None = None,
         high: int | None = None) -> int:
  value = _value(config, path)
  if not _is_int(value):
    raise ConfigError(f"{path}={value!r} must be an int")
  _check_range(path, value, low, high)
  return int(value)


def _number(config: ml_collections.ConfigDict, path: str, low: float | None = None,
            high: float | None = None, low_open: bool = False,
            high_open: bool = False) -> float:
  value = _value(config, path)
  if not _is_number(value):
    raise ConfigError(f"{path}={value!r} must be a finite number")
  _check_range(path, value, low, high, low_open, high_open)
  return float(value)


def _choice(config: ml_collections.ConfigDict, path: str, options: Sequence[str]) -> str:
  value = _value(config, path)
  if not isinstance(value, str) or value not in options:
    raise ConfigError(f"{path}={value!r} is not one of {', '.join(options)}")
  return value


def _bool(config: ml_collections.ConfigDict, path: str) -> bool:
  value = _value(config, path)
  if not isinstance(value, bool):
    raise ConfigError(f"{path}={value!r} must be a bool (True or False)")
  return value


def _str(config: ml_collections.ConfigDict, path: str) -> str:
  value = _value(config, path)
  if not isinstance(value, str):
    raise ConfigError(f"{path}={value!r} must be a string")
  return value


def _sequence(config: ml_collections.ConfigDict, path: str, kind: str) -> tuple:
  value = _value(config, path)
  if not isinstance(value, (tuple, list)):
    raise ConfigError(f"{path}={value!r} must be a tuple of {kind}")
  return tuple(value)


def _int_tuple(config: ml_collections.ConfigDict, path: str) -> tuple[int, ...]:
  value = _sequence(config, path, "ints")
  if not all(_is_int(v) for v in value):
    raise ConfigError(f"{path}={value!r} must be a tuple of ints")
  return tuple(int(v) for v in value)


def _positive_ints(config: ml_collections.ConfigDict, path: str) -> tuple[int, ...]:
  value = _int_tuple(config, path)
  if any(v < 1 for v in value):
    raise ConfigError(f"{path}={value!r} must hold positive ints")
  return value


def _is_remote(path: str) -> bool:
  return "://" in path


def _check_file(path: str, value: str, alternatives: str, load: Any, kind: str) -> None:
  """``value`` must name a readable ``kind`` file: ``load`` parses it (no compute)."""
  if _is_remote(value):
    return
  if not os.path.isfile(value):
    raise ConfigError(f"{path}={value!r} is {alternatives} an existing file")
  try:
    load(value)
  except (OSError, ValueError) as e:
    raise ConfigError(f"{path}={value!r} is not a valid {kind} file: {e}") from None


# --- Sections ---------------------------------------------------------------------------


def _stages(config: ml_collections.ConfigDict) -> list[str]:
  """The comma-separated stage list: known names, each once, in pipeline order."""
  text = _str(config, "stages")
  stages = [s.strip() for s in text.split(",") if s.strip()]
  known = ", ".join(STAGES)
  if not stages:
    raise ConfigError(f"stages={text!r} is empty; list some of {known}")
  for stage in stages:
    if stage not in STAGES:
      raise ConfigError(f"stages={text!r}: {stage!r} is not one of {known}")
  if len(set(stages)) != len(stages):
    raise ConfigError(f"stages={text!r} names a stage twice")
  if stages != sorted(stages, key=STAGES.index):
    raise ConfigError(f"stages={text!r} must be in the order {known}")
  return stages


def _check_top_level(config: ml_collections.ConfigDict) -> None:
  _int(config, "seed", 0, 2**32 - 1)
  _str(config, "workdir")
  _int(config, "log_every_steps", 1)
  _int(config, "precompile_threads", 0, 64)
  _int(config, "checkpoint.every_steps", 1)
  _int(config, "checkpoint.max_to_keep", 1)


def _check_data_and_model(config: ml_collections.ConfigDict) -> None:
  _choice(config, "data.name", tuple(input_pipeline.DATASETS))
  _int(config, "data.image_size", MIN_IMAGE_SIZE)
  data_dir = _value(config, "data.data_dir")
  if data_dir is not None and not isinstance(data_dir, str):
    raise ConfigError(f"data.data_dir={data_dir!r} must be None or a directory path")
  _int(config, "data.shuffle_buffer", 1)
  _number(config, "model.width_multiplier", 0, low_open=True)
  layers = _positive_ints(config, "model.layers_per_stage")
  stages = len(netspec.STAGE_WIDTHS)
  if len(layers) != stages:
    raise ConfigError(f"model.layers_per_stage={layers!r} must hold {stages} positive "
                      "ints, one per stage of the skeleton")


def _check_optimizer(config: ml_collections.ConfigDict, section: str) -> None:
  _number(config, f"{section}.learning_rate", 0, low_open=True)
  _number(config, f"{section}.momentum", 0, 1, high_open=True)
  _number(config, f"{section}.weight_decay", 0)
  _bool(config, f"{section}.decay_bn_and_bias")
  _number(config, f"{section}.label_smoothing", 0, 1, high_open=True)


def _check_space(config: ml_collections.ConfigDict) -> None:
  population = _int(config, "space.population_size", 1)
  cells = _int(config, "space.num_cells", 1)
  if cells > population:
    raise ConfigError(f"space.num_cells={cells} must be <= "
                      f"space.population_size={population}")
  _int(config, "space.mutation_interval", 1)
  _number(config, "space.warmup_epochs", 0)
  _number(config, "space.evolution_epochs", 0, low_open=True)
  _int(config, "space.batch_size", 1)

  teams = _positive_ints(config, "space.team_sizes")
  largest = population - cells + 1  # the last tournament draws from the unpicked cells
  if not teams:
    raise ConfigError("space.team_sizes=() must list at least one team size")
  if max(teams) > largest:
    raise ConfigError(
        f"space.team_sizes={teams!r} must be <= space.population_size - space.num_cells "
        f"+ 1 = {largest} (the last of K tournaments draws from the cells not yet picked)")
  if list(teams) != sorted(teams):
    raise ConfigError(f"space.team_sizes={teams!r} must be non-decreasing")

  nodes = genome_lib.NUM_NODES
  _int(config, "space.window", 2, nodes)
  _check_codes(_int_tuple(config, "space.codes"))
  _number(config, "space.gene_mutation_probability", 0, 1)
  _number(config, "space.madds_cap_ratio", 0, low_open=True)
  _int(config, "space.reference_distance", 0, MAX_REFERENCE_DISTANCE)
  _number(config, "space.reference_stop_epoch", 0)
  _choice(config, "space.compensation", evolution.COMPENSATIONS)
  update = _choice(config, "space.population_update", evolution.POPULATION_UPDATES)
  if update == "aging" and population < 2 * cells:
    raise ConfigError(
        f"space.population_size={population} must be >= 2 x space.num_cells = {2 * cells} "
        "with space.population_update='aging' (the supernet's cells stay while as many "
        "children replace the oldest of the others)")
  _bool(config, "space.distinct_top_cells")
  _choice(config, "space.estimator", ESTIMATORS)
  _check_optimizer(config, "space")
  _number(config, "space.alpha_learning_rate", 0, low_open=True)
  _number(config, "space.alpha_b1", 0, 1, high_open=True)
  _number(config, "space.alpha_b2", 0, 1, high_open=True)


def _check_codes(codes: tuple[int, ...]) -> None:
  allowed = ", ".join(map(str, genome_lib.EDGE_CODES))
  for code in codes:
    if code not in genome_lib.EDGE_CODES:
      raise ConfigError(f"space.codes={codes!r}: {code} is not one of {allowed}")
    if codes.count(code) > 1:
      raise ConfigError(f"space.codes={codes!r} lists {code} more than once")
  if not set(codes) & set(genome_lib.CONV_CODES):
    raise ConfigError(f"space.codes={codes!r} must include a conv code (3, 5, 7 or 9)")
  if len([c for c in codes if c != genome_lib.NONE]) < 2:
    raise ConfigError(f"space.codes={codes!r} needs two codes besides 1 (none), or a "
                      "chain edge has no operator to mutate to")


def _check_search(config: ml_collections.ConfigDict, stages: list[str]) -> None:
  space = _str(config, "search.space")
  if space not in BUILTIN_SPACES:
    _check_file("search.space", space, "not 'learned', 'irb' or", netspec.load_space,
                "space")
    if "space" in stages and "search" in stages:
      raise ConfigError(f"search.space={space!r} names a space file, but stages="
                        f"{config.stages!r} also learns one (stage 'space'), which stage 2 "
                        "would search instead; drop 'space' from stages or set "
                        "search.space='learned'")
    if "search" in stages and not _is_remote(space):
      try:
        netspec.expand_space(netspec.load_space(space), config.model.layers_per_stage)
      except netspec.NetFormatError as error:
        raise ConfigError(f"search.space={space!r} does not fit the net: {error}") from None
  _bool(config, "search.compare_irb")
  targets = _positive_ints(config, "search.targets")
  fractions = _sequence(config, "search.target_fractions", "numbers")
  for f in fractions:
    if not _is_number(f) or not 0 < f <= MAX_TARGET_FRACTION:
      raise ConfigError(f"search.target_fractions={fractions!r} must hold numbers in "
                        f"(0, {MAX_TARGET_FRACTION:g}] (fractions of the IRB k3 e6 net)")
  if "search" in stages and not targets and not fractions:
    raise ConfigError("search.targets and search.target_fractions are both empty; the "
                      "search stage needs at least one MAdds target")
  _number(config, "search.warmup_epochs", 0)
  _number(config, "search.epochs", 0, low_open=True)
  _int(config, "search.batch_size", 1)
  _check_optimizer(config, "search")
  _number(config, "search.alpha_learning_rate", 0, low_open=True)
  _int(config, "search.alpha_update_every", 1)
  _choice(config, "search.derive", DERIVATIONS)
  _number(config, "search.beta", 0)
  _choice(config, "search.estimator", ESTIMATORS)


def _check_train(config: ml_collections.ConfigDict, stages: list[str]) -> None:
  net = _str(config, "train.net")
  if net:
    _check_file("train.net", net, "not", netspec.load_net, "net")
  elif "train" in stages and "search" not in stages:
    raise ConfigError("train.net is empty but stages has train without search, so no net "
                      "would be trained; set --config.train.net=PATH to a net JSON")
  _number(config, "train.epochs", 0, low_open=True)
  _int(config, "train.batch_size", 1)
  _number(config, "train.warmup_epochs", 0)
  _check_optimizer(config, "train")
  _choice(config, "train.dtype", DTYPES)
  _bool(config, "train.se")
  _number(config, "train.eval_every_epochs", 0)


def _check_batches_fit_splits(config: ml_collections.ConfigDict, stages: list[str]) -> None:
  """A stage's global batch must fit in the split it trains on (sizes known offline)."""
  name = config.data.name
  for stage in stages:
    path, splits = BATCHES[stage]
    batch = _value(config, path)
    for split in splits:
      examples = input_pipeline.num_examples(name, split)
      if batch > examples:
        raise ConfigError(f"{path}={batch} must be <= {examples}, the examples of split "
                          f"{split!r} of data.name={name!r}")


# --- Work directory, files, devices -----------------------------------------------------


def _check_workdir(workdir: str) -> None:
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f"workdir={workdir!r} is not writable: it is a file, not a directory")
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.TemporaryFile(dir=workdir):
      pass
  except OSError as e:
    raise ConfigError(f"workdir={workdir!r} is not writable: {e.strerror or e}") from None


# Settings that fix a run's data streams and state shapes: a run resumed from a work
# directory must keep them, or it silently continues another run's checkpoints.
RESUME_FIELDS = ("seed", "data.name", "data.image_size", "model.width_multiplier",
                 "model.layers_per_stage")
# Fields of a stage's section that its outputs and checkpoints do not depend on: they pick
# which searches run (each writes a directory of its own) or how often stage 3 evaluates;
# `train.net` is checked against the copy its directory keeps (`netspec.NET_FILE`).
FREE_STAGE_FIELDS = {"search": ("compare_irb", "targets", "target_fractions"),
                     "train": ("net", "eval_every_epochs")}


def _check_earlier_run(config: ml_collections.ConfigDict, stages: list[str],
                       workdir: str) -> None:
  """What workdir holds (read through epath, so gs:// too) must fit this run."""
  try:
    _check_resumable(config, workdir)
    _check_given_net(config, stages, workdir)
    _check_learned_space(config, stages, workdir)
  except ConfigError:
    raise
  except Exception as error:  # noqa: BLE001 -- storage errors differ by backend
    if not _is_remote(workdir):
      raise
    raise ConfigError(f"workdir={workdir!r} cannot be read ({type(error).__name__}: "
                      f"{error}); check the bucket's name and this machine's access to it"
                      ) from None


def _check_resumable(config: ml_collections.ConfigDict, workdir: str) -> None:
  """A work directory that holds an earlier run's outputs resumes that run: RESUME_FIELDS,
  and the fields of every stage whose directory it holds, must match its config.json (a
  changed one would resume the stage on other settings, or report its old results)."""
  record = epath.Path(workdir) / "config.json"
  started = [stage for stage in STAGES if (epath.Path(workdir) / stage).is_dir()]
  if not record.is_file() or not started:
    return
  try:
    earlier = json.loads(record.read_text())
    if not isinstance(earlier, dict):
      raise ValueError(f"a JSON {type(earlier).__name__}, not an object")
  except (OSError, ValueError) as error:  # JSONDecodeError and UnicodeDecodeError too
    raise ConfigError(f"workdir={workdir!r} holds stage outputs but its config.json, the "
                      f"settings they were made with, is unreadable ({error}); restore it, "
                      "or use another --workdir") from None
  earlier = ml_collections.ConfigDict(earlier)

  def changed(path: str) -> str | None:
    try:
      before = _value(earlier, path)
    except ConfigError:
      return None  # a record from a version without this field
    now = _value(config, path)
    if json.loads(json.dumps(now, default=list)) == before:
      return None
    return f"{path}={now!r} differs from {before!r} of the run in workdir={workdir!r} (its "

  for path in RESUME_FIELDS:
    if message := changed(path):
      raise ConfigError(message + f"config.json); resuming it needs the same "
                        f"{', '.join(RESUME_FIELDS)}. Use another --workdir for a new run")
  for stage in started:
    for key in config[stage]:
      if key not in FREE_STAGE_FIELDS.get(stage, ()) and (
          message := changed(f"{stage}.{key}")):
        raise ConfigError(
            message + f"config.json), whose {stage}/ outputs depend on it: rerun with the "
            f"old value, remove {os.path.join(workdir, stage)} and the later stages' "
            f"directories to redo stage {stage!r} with the new one, or use another "
            "--workdir")


def _check_given_net(config: ml_collections.ConfigDict, stages: list[str],
                     workdir: str) -> None:
  """A given `train.net` must be the net that workdir's stage-3 directory for it trains."""
  if "train" not in stages or not config.train.net or _is_remote(config.train.net):
    return
  from autospace_jax import train  # noqa: PLC0415 -- heavy; needed only here.

  try:
    train.check_net_record(os.path.join(workdir, "train", train.GIVEN_NET_RUN),
                           train.load_net(config, config.train.net))
  except ValueError as error:
    raise ConfigError(f"train.net={config.train.net!r} is not the net of the run in "
                      f"workdir={workdir!r}: {error}") from None


def _check_learned_space(config: ml_collections.ConfigDict, stages: list[str],
                         workdir: str) -> None:
  """Stage 2 without stage 1 reads the learned space an earlier run left in workdir."""
  if "search" not in stages or "space" in stages or config.search.space != "learned":
    return
  from autospace_jax import space_search  # noqa: PLC0415 -- heavy; needed only here.

  path = epath.Path(workdir) / "space" / space_search.SPACE_CONFIG
  if not path.is_file():
    raise ConfigError(f"search.space='learned' but stages={config.stages!r} does not run "
                      f"space and {path} does not exist; set --config.search.space=PATH "
                      "to a space file (or 'irb')")


def _cheapest_first(genomes: Iterable[genome_lib.Genome]) -> list[genome_lib.Genome]:
  """Genomes in a likely-cheapest-first order, so a feasibility scan usually stops at once."""
  def key(g: genome_lib.Genome) -> tuple:
    convs = [c for c in g.edges if c in genome_lib.CONV_CODES]
    return (g.expansion_index, sum(g.mix), len(convs), sum(c * c for c in convs),
            sum(c != genome_lib.NONE for c in g.edges))
  return sorted(genomes, key=key)


def _check_madds_cap(config: ml_collections.ConfigDict) -> None:
  """Every layer's constraints must admit at least one genome, as stage 1 requires to
  draw its initial populations (the reference bound applies while its epoch is > 0)."""
  from autospace_jax import space_search  # noqa: PLC0415 -- the skeleton stage 1 builds.

  cfg = config.space
  codes = tuple(cfg.codes)
  spec = space_search.supernet_spec(
      config, input_pipeline.dataset_info(config.data.name).num_classes,
      tuple(c for c in codes if c in genome_lib.CONV_CODES))
  shapes = space_search.cell_shapes(spec)
  candidates = _cheapest_first(genome_lib.all_genomes(codes))
  tau = cfg.reference_distance
  near = [g for g in candidates
          if genome_lib.hamming_distance(g, genome_lib.REFERENCE) <= tau]
  checked = set()
  for layer, shape in enumerate(shapes):
    if shape in checked:
      continue
    checked.add(shape)
    cap = evolution.layer_constraints(shape, cfg.madds_cap_ratio, tau).madds_cap
    where = (f"layer {layer} of {len(shapes)} ({shape.in_channels}->{shape.out_channels} "
             f"ch, stride {shape.stride}, {shape.in_size} px)")
    if not any(shape.madds(g) <= cap for g in candidates):
      cheapest = min(shape.madds(g) for g in candidates)
      raise ConfigError(
          f"space.madds_cap_ratio={cfg.madds_cap_ratio:g} gives a cap below the cheapest "
          f"valid cell at {where}: {cap:,.0f} MAdds < {cheapest:,} MAdds")
    if cfg.reference_stop_epoch > 0 and not any(shape.madds(g) <= cap for g in near):
      raise ConfigError(
          f"space.madds_cap_ratio={cfg.madds_cap_ratio:g} with "
          f"space.reference_distance={tau} admits no cell at {where}: none within "
          f"distance {tau} of IRB k3 e6 costs <= {cap:,.0f} MAdds; raise either, or set "
          "space.reference_stop_epoch=0")


def check_data(config: ml_collections.ConfigDict, download: bool = False) -> None:
  """Raise `ConfigError` unless the data set can be read where ``data.data_dir`` points
  (after downloading it, with ``download``, if TFDS can). Imports TensorFlow for the TFDS
  data sets, so `main` runs it after `validate`."""
  try:
    input_pipeline.check_prepared(config.data, download)
  except input_pipeline.DataUnavailable as error:
    raise ConfigError(str(error)) from None


def check_devices(config: ml_collections.ConfigDict) -> None:
  """Raise `ConfigError` unless each run stage's global batch splits evenly over the
  devices and the processes; a no-op in a multi-process job that has not joined yet."""
  import jax  # noqa: PLC0415 -- keeps importing this module free of JAX start-up.

  from autospace_jax import distributed  # noqa: PLC0415

  if not jax.distributed.is_initialized():
    try:
      if distributed.detect_cluster(os.environ) is not None:
        return  # Must join the job before any device is touched; checked at runtime.
    except ValueError:
      return  # `distributed.maybe_initialize` reports the broken environment.
  counts = (("jax.device_count()", jax.device_count()),
            ("jax.process_count()", jax.process_count()))
  for stage in _stages(config):
    path, _ = BATCHES[stage]
    batch = _value(config, path)
    for name, count in counts:
      if batch % count:
        raise ConfigError(f"{path}={batch} must be divisible by {name}={count}")
