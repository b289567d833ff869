"""Tests of config_validation: presets pass; bad values fail fast with one-line messages.

The table of invalid overrides is the main test: each row is applied to the embedded
default and must raise `ConfigError` naming the field. The command-line check runs
`python -m autospace_jax.main` with a few bad flags and expects a one-line error, a
non-zero exit and no traceback.
"""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys

from etils import epath
import jax
import pytest

from autospace_jax import config_validation
from autospace_jax import genome as genome_lib
from autospace_jax import netspec
from autospace_jax import presets
from autospace_jax.config_validation import ConfigError
from conftest import reference_file

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _override(config, overrides: dict):
  """Set dotted fields, type changes included (a config file can produce them)."""
  with config.ignore_type():
    for path, value in overrides.items():
      *sections, field = path.split(".")
      node = config
      for section in sections:
        node = node[section]
      node[field] = value
  return config


def _net_file(directory: pathlib.Path) -> str:
  """A valid net JSON for the default skeleton."""
  config = presets.default()
  layers = config.model.layers_per_stage
  path = directory / "net.json"
  netspec.save_net(netspec.build_net([genome_lib.REFERENCE] * sum(layers),
                                     config.model.width_multiplier, layers, 10, 32), path)
  return str(path)


def _error(config, workdir: str | None = None) -> str:
  with pytest.raises(ConfigError) as info:
    config_validation.validate(config, workdir)
  message = str(info.value)
  assert "\n" not in message
  return message


@pytest.mark.parametrize("name", ["default", "cifar10", "imagenet"])
def test_presets_are_valid(name, tmp_path):
  config_validation.validate(presets.get_config(name), str(tmp_path / "run"))
  assert (tmp_path / "run").is_dir()


INVALID = [
    ({"stages": ""}, "stages="),
    ({"stages": "train,space"}, "stages="),
    ({"stages": "space,eval"}, "stages="),
    ({"stages": "space,space"}, "stages="),
    ({"seed": -1}, "seed"),
    ({"log_every_steps": 0}, "log_every_steps"),
    ({"checkpoint.every_steps": 0}, "checkpoint.every_steps"),
    ({"checkpoint.max_to_keep": 0}, "checkpoint.max_to_keep"),
    ({"data.name": "mnist"}, "data.name"),
    ({"data.image_size": 8}, "data.image_size"),
    ({"data.image_size": 32.5}, "data.image_size"),
    ({"model.width_multiplier": 0.0}, "model.width_multiplier"),
    ({"model.layers_per_stage": (1, 2, 2)}, "model.layers_per_stage"),
    ({"model.layers_per_stage": (1, 0, 2, 1, 1, 1)}, "model.layers_per_stage"),
    ({"space.population_size": 0}, "space.population_size"),
    ({"space.num_cells": 200}, "space.num_cells"),
    ({"space.num_cells": "abc"}, "space.num_cells"),
    ({"space.num_cells": True}, "space.num_cells"),
    ({"space.team_sizes": (10, 200)}, "space.team_sizes"),
    ({"space.team_sizes": (30, 20)}, "space.team_sizes"),
    ({"space.team_sizes": ()}, "space.team_sizes"),
    ({"space.window": 5}, "space.window"),
    ({"space.window": 1}, "space.window"),
    ({"space.codes": (1, 4)}, "space.codes"),
    ({"space.codes": (1, 2)}, "space.codes"),
    ({"space.codes": (1, 3)}, "space.codes"),
    ({"space.codes": (2, 3, 3)}, "space.codes"),
    ({"space.gene_mutation_probability": 1.5}, "space.gene_mutation_probability"),
    ({"space.madds_cap_ratio": 0.0}, "space.madds_cap_ratio"),
    ({"space.madds_cap_ratio": 0.01}, "space.madds_cap_ratio"),
    ({"space.madds_cap_ratio": 0.5, "space.reference_distance": 0},
     "space.reference_distance"),
    ({"space.reference_distance": 9}, "space.reference_distance"),
    ({"space.reference_stop_epoch": -1}, "space.reference_stop_epoch"),
    ({"space.compensation": "linear"}, "space.compensation"),
    ({"space.population_update": "aging", "space.population_size": 9,
      "space.team_sizes": (4,)}, "space.population_size"),
    ({"space.distinct_top_cells": 1}, "space.distinct_top_cells"),
    ({"space.estimator": "exact"}, "space.estimator"),
    ({"space.warmup_epochs": float("nan")}, "space.warmup_epochs"),
    ({"space.evolution_epochs": 0}, "space.evolution_epochs"),
    ({"space.mutation_interval": 0}, "space.mutation_interval"),
    ({"space.batch_size": -8}, "space.batch_size"),
    ({"space.batch_size": 2000}, "space.batch_size"),
    ({"space.learning_rate": 0.0}, "space.learning_rate"),
    ({"space.momentum": 1.0}, "space.momentum"),
    ({"space.alpha_b2": 1.0}, "space.alpha_b2"),
    ({"search.space": "/nonexistent/space.config"}, "search.space"),
    ({"search.targets": (0,)}, "search.targets"),
    ({"search.target_fractions": (0.0,)}, "search.target_fractions"),
    ({"search.targets": (), "search.target_fractions": ()}, "search.target"),
    ({"search.beta": -1.0}, "search.beta"),
    ({"search.estimator": "reinforce"}, "search.estimator"),
    ({"search.compare_irb": "yes"}, "search.compare_irb"),
    ({"search.batch_size": 1294}, "search.batch_size"),
    ({"search.alpha_update_every": 0}, "search.alpha_update_every"),
    ({"search.derive": "greedy"}, "search.derive"),
    ({"train.net": "/nonexistent/net.json"}, "train.net"),
    ({"stages": "train"}, "train.net"),
    ({"train.dtype": "float16"}, "train.dtype"),
    ({"train.se": 1}, "train.se"),
    ({"train.epochs": 0}, "train.epochs"),
    ({"train.weight_decay": -1e-4}, "train.weight_decay"),
    ({"train.label_smoothing": 1.0}, "train.label_smoothing"),
    ({"train.batch_size": 1438}, "train.batch_size"),
]


@pytest.mark.parametrize("overrides,field", INVALID,
                         ids=[",".join(o) + f"={list(o.values())}" for o, _ in INVALID])
def test_invalid_config_names_the_field(overrides, field):
  assert field in _error(_override(presets.default(), overrides))


def test_messages_say_what_is_allowed():
  assert _error(_override(presets.default(), {"space.num_cells": 12,
                                              "space.population_size": 10,
                                              "space.team_sizes": (1,)})) == (
      "space.num_cells=12 must be <= space.population_size=10")
  assert _error(_override(presets.default(), {"data.name": "mnist"})) == (
      "data.name='mnist' is not one of digits, cifar10, imagenet2012")
  assert _error(_override(presets.default(), {"space.num_cells": "abc"})) == (
      "space.num_cells='abc' must be an int")
  message = _error(_override(presets.default(), {"space.madds_cap_ratio": 0.01}))
  assert message.startswith("space.madds_cap_ratio=0.01 gives a cap below the cheapest "
                            "valid cell at layer ")


def test_config_error_is_a_value_error_of_one_line():
  assert issubclass(ConfigError, ValueError)
  assert str(ConfigError("a\nb")) == "a b"


def test_missing_field_is_named():
  config = presets.default()
  del config.space["window"]
  assert _error(config) == "space.window is missing from the config"


def test_learned_space_must_exist_without_the_space_stage(tmp_path):
  config = _override(presets.default(), {"stages": "search,train"})
  assert "--config.search.space=PATH" in _error(config, str(tmp_path))
  from autospace_jax import space_search  # noqa: PLC0415
  (tmp_path / "space").mkdir()
  (tmp_path / "space" / space_search.SPACE_CONFIG).write_text("{}")
  config_validation.validate(config, str(tmp_path))


def test_train_only_needs_a_readable_net(tmp_path):
  config = _override(presets.default(), {"stages": "train", "train.net": _net_file(tmp_path)})
  config_validation.validate(config)
  (tmp_path / "bad.json").write_text("{}")
  config.train.net = str(tmp_path / "bad.json")
  assert _error(config).startswith(f"train.net={config.train.net!r} is not a valid net file: ")


def test_space_file_must_be_readable(tmp_path):
  space = tmp_path / "space.config"
  netspec.save_space([[genome_lib.REFERENCE] * 3] * 6, space)
  config = _override(presets.default(), {"stages": "search", "search.space": str(space)})
  config_validation.validate(config)
  space.write_text("not json")
  assert _error(config).startswith(f"search.space={str(space)!r} is not a valid space file")


def test_a_space_file_must_fit_the_skeleton(tmp_path):
  """The authors' 11-layer space fits the 21-layer ImageNet skeleton, not the default's 6
  layers; found before the run, not when stage 2 starts."""
  space = str(reference_file("autospace_search_space.config"))
  config_validation.validate(_override(presets.imagenet(), {"stages": "search",
                                                            "search.space": space}))
  assert _error(_override(presets.default(), {"stages": "search", "search.space": space})) == (
      f"search.space={space!r} does not fit the net: the space has 11 layers; the skeleton "
      "model.layers_per_stage=(1, 1, 1, 1, 1, 1) needs 6")


def test_a_space_file_is_not_searched_while_stage_1_learns_another(tmp_path):
  """Stage 2 would search stage 1's output, silently ignoring the named file."""
  space = tmp_path / "space.config"
  netspec.save_space([[genome_lib.REFERENCE] * 3] * 8, space)
  config = _override(presets.default(), {"stages": "space,search", "search.space": str(space)})
  assert _error(config).startswith(f"search.space={str(space)!r} names a space file, but "
                                   "stages='space,search' also learns one")
  config_validation.validate(_override(config, {"stages": "space"}))  # not searched: fine


def test_workdir_must_be_writable(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("")
  config = presets.default()
  assert _error(config, str(blocker)).startswith(f"workdir={str(blocker)!r} is not writable")
  assert _error(config, str(blocker / "run")).startswith(
      f"workdir={str(blocker / 'run')!r} is not writable: ")


def test_an_unreadable_remote_workdir_is_one_error_line(monkeypatch):
  """Bad bucket names and missing credentials surface before the run."""
  def refuse(self):
    raise PermissionError("403 Forbidden")

  monkeypatch.setattr(type(epath.Path("gs://bucket/run")), "is_dir", refuse)
  assert _error(_override(presets.default(), {"stages": "space"}), "gs://bucket/run") == (
      "workdir='gs://bucket/run' cannot be read (PermissionError: 403 Forbidden); check "
      "the bucket's name and this machine's access to it")


def test_batch_sizes_split_over_devices(monkeypatch):
  monkeypatch.setattr(jax, "device_count", lambda: 3)
  assert _error(presets.default()) == (
      "space.batch_size=64 must be divisible by jax.device_count()=3")
  monkeypatch.setattr(jax, "device_count", lambda: 4)
  monkeypatch.setattr(jax, "process_count", lambda: 3)
  assert "jax.process_count()=3" in _error(presets.default())


def test_batch_sizes_of_stages_not_run_are_not_split(monkeypatch, tmp_path):
  config = _override(presets.default(), {"stages": "train", "train.net": _net_file(tmp_path),
                                         "space.batch_size": 63})
  monkeypatch.setattr(jax, "device_count", lambda: 2)
  config_validation.validate(config)


def test_batch_sizes_must_fit_the_split_each_stage_trains_on(tmp_path):
  assert _error(_override(presets.default(), {"space.batch_size": 1294})) == (
      "space.batch_size=1294 must be <= 1293, the examples of split 'search_train' of "
      "data.name='digits'")
  assert _error(_override(presets.default(), {"train.batch_size": 1438})) == (
      "train.batch_size=1438 must be <= 1437, the examples of split 'train' of "
      "data.name='digits'")
  assert "must be <= 45000," in _error(_override(
      presets.default(), {"data.name": "cifar10", "search.batch_size": 45008}))
  assert _error(_override(presets.default(), {"search.batch_size": 145})) == (  # α batches
      "search.batch_size=145 must be <= 144, the examples of split 'search_val' of "
      "data.name='digits'")
  config_validation.validate(_override(presets.default(), {
      "stages": "train", "train.net": _net_file(tmp_path), "train.batch_size": 1437,
      "space.batch_size": 5000, "search.batch_size": 5000}))


def test_device_check_waits_for_a_multiprocess_job_to_join(monkeypatch):
  monkeypatch.setenv("AUTOSPACE_CLUSTER", "tpu")
  monkeypatch.setattr(jax, "device_count", lambda: 3)
  config_validation.validate(presets.default())


CLI_CASES = [
    ("--config.space.num_cells=200", "space.num_cells"),
    ("--config.data.name=mnist", "data.name"),
    ("--config.stages=train,space", "stages"),
    ("--config.train.dtype=float16", "train.dtype"),
    ("--config.space.madds_cap_ratio=0.01", "space.madds_cap_ratio"),
    ("--config.space.population_size=0", "space.population_size"),
    ("--config.space.window=9", "space.window"),
    ("--config.space.compensation=linear", "space.compensation"),
    ("--config.space.population_update=random", "space.population_update"),
    ("--config.space.estimator=gumbel", "space.estimator"),
    ("--config.space.codes=(1,2,4)", "space.codes"),
    ("--config.space.team_sizes=(0,1,2,3)", "space.team_sizes"),
    ("--config.space.gene_mutation_probability=1.5", "space.gene_mutation_probability"),
    ("--config.search.beta=-1.0", "search.beta"),
    ("--config.search.estimator=darts", "search.estimator"),
    ("--config.train.learning_rate=-0.1", "train.learning_rate"),
    ("--config.data.image_size=0", "data.image_size"),
    ("--config.model.width_multiplier=0.0", "model.width_multiplier"),
    ("--config.stages=evolve", "stages"),
    ("--config.space.batch_size=2000", "space.batch_size"),
]


@pytest.mark.parametrize("flag,field", CLI_CASES, ids=[f for f, _ in CLI_CASES])
def test_command_line_reports_one_line_error(flag, field, tmp_path):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu")
  result = subprocess.run(
      [sys.executable, "-m", "autospace_jax.main", flag, f"--workdir={tmp_path / 'run'}"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
  assert result.returncode != 0
  assert "Traceback" not in result.stderr
  errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1, result.stderr
  assert field in errors[0]
  assert not (tmp_path / "run").exists()


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _two_processes(port: int, process_id: int) -> dict:
  """The environment of one of two processes joining a job on localhost."""
  return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT),
              AUTOSPACE_COORDINATOR=f"localhost:{port}", AUTOSPACE_NUM_PROCESSES="2",
              AUTOSPACE_PROCESS_ID=str(process_id))


def test_multiprocess_job_checks_batch_sizes_once_joined(tmp_path):
  """Two processes of one CPU device each: a batch of 63 cannot split over 2 devices."""
  port = _free_port()
  hosts = [subprocess.Popen(
      [sys.executable, "-m", "autospace_jax.main", "--config.space.batch_size=63",
       f"--workdir={tmp_path / 'run'}"], cwd=ROOT, env=_two_processes(port, i),
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  try:
    errs = [host.communicate(timeout=120)[1] for host in hosts]
  finally:
    for host in hosts:
      host.kill()
  for host, err in zip(hosts, errs):
    assert host.returncode == 2 and "Traceback" not in err, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert errors == ["error: space.batch_size=63 must be divisible by "
                      "jax.device_count()=2"], err[-3000:]


def test_a_tfds_data_set_never_prepared_in_data_dir_is_refused_before_the_run(tmp_path):
  """One error line naming data.data_dir and where TFDS looked, not a traceback at the
  first batch after the supernet was built (ImageNet: TFDS cannot download it)."""
  empty = tmp_path / "tfds"
  empty.mkdir()
  result = subprocess.run(
      [sys.executable, "-m", "autospace_jax.main", f"--config={ROOT / 'configs/imagenet.py'}",
       f"--workdir={tmp_path / 'run'}", f"--config.data.data_dir={empty}"],
      cwd=tmp_path, capture_output=True, text=True, timeout=120)
  assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
  errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1, result.stderr[-3000:]
  assert errors[0].startswith(f"error: data.data_dir={str(empty)!r}: TFDS finds no prepared "
                              f"imagenet2012 in {empty / 'imagenet2012'}")
  assert not (tmp_path / "run" / "space").exists()


def test_cifar10_is_downloaded_when_data_dir_lacks_it_and_imagenet_never_is(tmp_path,
                                                                             monkeypatch):
  """What TFDS can fetch itself (CIFAR-10) is fetched before the run; a failed download
  is one error line saying how to prepare the data elsewhere. No network: TFDS's download
  is replaced by a recorder."""
  tfds = pytest.importorskip("tensorflow_datasets")
  calls = []

  def download_and_prepare(builder, *args, **kwargs):
    calls.append(builder.name)
    raise ConnectionError("no network here")

  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", download_and_prepare)
  for name in ("cifar10", "imagenet2012"):
    config = _override(presets.default(), {"data.name": name,
                                           "data.data_dir": str(tmp_path)})
    with pytest.raises(ConfigError) as info:
      config_validation.check_data(config, download=True)
    if name == "cifar10":
      assert str(info.value).startswith(
          f"data.name='cifar10': TFDS could not download it into {tmp_path / 'cifar10'}")
      assert "ConnectionError: no network here" in str(info.value)
    else:
      assert "TFDS finds no prepared imagenet2012" in str(info.value)
  assert calls == ["cifar10"]
  with pytest.raises(ConfigError, match="TFDS finds no prepared cifar10"):
    config_validation.check_data(_override(presets.default(), {
        "data.name": "cifar10", "data.data_dir": str(tmp_path)}))  # without download
  assert calls == ["cifar10"]


@pytest.mark.parametrize("args, expected", [
    (["--config.space.popsize=3"], "error: --config.space.popsize: the config has no field "
     "space.popsize; did you mean --config.space.population_size?"),
    (["--config=configs/cifar10.py", "--config.trian.epochs=3"],
     "error: --config.trian.epochs: the config has no field trian; did you mean "
     "--config.train?"),
    (["--config.seed.x=1"], "error: --config.seed.x: seed is a value, not a section"),
    (["--config.space.population_size=1.5"], "error: flag --config.space.population_size="
     "1.5: invalid literal for int() with base 10: '1.5'"),
    (["--config=configs/nonexistent.py"],
     "error: --config: [Errno 2] No such file or directory: 'configs/nonexistent.py'"),
    (["--config=autospace_jax/presets.py:bogus"], "error: flag --config=autospace_jax/"
     "presets.py:bogus: ValueError: unknown preset 'bogus'; choose one of default, cifar10, "
     "imagenet"),
    (["--config={raises}"], "error: --config: RuntimeError: no such field ({raises}:4)"),
])
def test_bad_flags_are_one_error_line_too(tmp_path, args, expected):
  """Typos in a field name, a value or a config file, the first errors a user makes, get
  the config checks' format (one line, exit status 2), not a traceback."""
  raises = tmp_path / "raises.py"
  raises.write_text("import ml_collections\n\ndef get_config():\n"
                    "  raise RuntimeError('no such field')\n")
  result = subprocess.run(
      [sys.executable, "-m", "autospace_jax.main", f"--workdir={tmp_path / 'run'}",
       *(a.format(raises=raises) for a in args)],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
  assert result.stderr.strip().splitlines()[-1] == expected.format(raises=raises)
  assert not (tmp_path / "run").exists()


def test_multiprocess_job_needs_an_explicit_workdir(tmp_path):
  """Each host would default to its own runs/<timestamp>, and a rerun to a new one."""
  result = subprocess.run([sys.executable, "-m", "autospace_jax.main"], cwd=tmp_path,
                          env=_two_processes(_free_port(), 0), capture_output=True,
                          text=True, timeout=30)
  assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
  errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1 and errors[0].startswith("error: workdir is not set"), errors
  assert "--workdir=DIR" in errors[0]
  assert not (tmp_path / "runs").exists()


def test_a_workdir_with_outputs_resumes_only_with_the_settings_that_fix_its_state(tmp_path):
  from autospace_jax import main  # noqa: PLC0415 -- flags defined on import
  workdir = str(tmp_path)
  main.write_config_record(presets.default(), workdir)
  changed = _override(presets.default(), {"space.batch_size": 32})
  config_validation.validate(changed, workdir)  # no stage output yet: a fresh start
  (tmp_path / "space").mkdir()
  assert _error(changed, workdir).startswith(
      "space.batch_size=32 differs from 64 of the run in workdir=")
  assert "model.layers_per_stage=(1, 1, 1, 1, 1, 2) differs from [1, 1, 1, 1, 1, 1]" in _error(
      _override(presets.default(), {"model.layers_per_stage": (1, 1, 1, 1, 1, 2)}), workdir)
  config_validation.validate(presets.default(), workdir)  # the same run resumes
  config_validation.validate(_override(presets.default(), {"train.epochs": 20.0}), workdir)


@pytest.mark.parametrize("text", ["garbage", "[1]"])
def test_an_unreadable_config_record_beside_stage_outputs_is_an_error(tmp_path, text):
  (tmp_path / "space").mkdir()
  (tmp_path / "config.json").write_text(text)
  assert _error(presets.default(), str(tmp_path)).startswith(
      f"workdir={str(tmp_path)!r} holds stage outputs but its config.json, the settings "
      "they were made with, is unreadable (")


def test_a_stage_with_outputs_resumes_only_with_its_own_settings(tmp_path):
  """A finished stage 3 would report its old metrics for new settings, and one under way
  would switch its learning-rate schedule; settings that only pick what runs, each in a
  directory of its own, may change."""
  from autospace_jax import main  # noqa: PLC0415 -- flags defined on import
  workdir = str(tmp_path)
  main.write_config_record(presets.default(), workdir)
  (tmp_path / "space").mkdir()
  (tmp_path / "search").mkdir()
  config_validation.validate(_override(presets.default(), {"train.epochs": 20.0}), workdir)
  message = _error(_override(presets.default(), {"search.epochs": 4.0}), workdir)
  assert message.startswith("search.epochs=4.0 differs from 2.0 of the run in workdir=")
  assert f"remove {tmp_path / 'search'} and the later stages' directories" in message
  config_validation.validate(_override(presets.default(), {
      "search.target_fractions": (0.5,), "search.compare_irb": False}), workdir)
  (tmp_path / "train").mkdir()
  for field, value in (("epochs", 20.0), ("se", True), ("dtype", "bfloat16"),
                       ("learning_rate", 0.2)):
    assert _error(_override(presets.default(), {f"train.{field}": value}), workdir
                  ).startswith(f"train.{field}={value!r} differs from ")
  config_validation.validate(_override(presets.default(), {"train.eval_every_epochs": 1.0}),
                             workdir)


def test_a_given_net_resumes_only_in_the_directory_that_trains_it(tmp_path):
  from autospace_jax import train  # noqa: PLC0415
  first = tmp_path / "first"
  first.mkdir()
  config = _override(presets.default(), {"stages": "train", "train.net": _net_file(first)})
  workdir = tmp_path / "run"
  config_validation.validate(config, str(workdir))
  net_dir = workdir / "train" / train.GIVEN_NET_RUN
  net_dir.mkdir(parents=True)
  netspec.save_net(train.load_net(config, config.train.net), net_dir / netspec.NET_FILE)
  config_validation.validate(config, str(workdir))  # the same net resumes
  other = netspec.build_net([genome_lib.irb(5, 3)] * 6, 0.35, (1, 1, 1, 1, 1, 1), 10, 32)
  netspec.save_net(other, tmp_path / "other.json")
  message = _error(_override(config, {"train.net": str(tmp_path / "other.json")}),
                   str(workdir))
  assert message.startswith(f"train.net={str(tmp_path / 'other.json')!r} is not the net of "
                            "the run in workdir=")
  assert "remove that directory to train this one there" in message
