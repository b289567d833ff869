"""Run AutoSpace: `python -m autospace_jax.main [--config=configs/x.py] [--workdir=DIR]`.

With no flags it runs the embedded default (digits, CPU, minutes) through
space -> search -> train and writes `report.md` in ./runs/<timestamp>. Restarting with
the same work directory resumes from the latest checkpoints and skips finished stages; a
multi-process job must name it, since each host would pick its own timestamp.
"""

from __future__ import annotations

import datetime
import difflib
import json
import logging as std_logging
import os
import re
import shlex
import sys
import traceback
from typing import NoReturn, Sequence

from absl import app
from absl import flags
from absl import logging
from etils import epath
import ml_collections
from ml_collections import config_flags

from autospace_jax import config_validation
from autospace_jax import distributed
from autospace_jax import files
from autospace_jax import input_pipeline
from autospace_jax import netspec
from autospace_jax import presets


def exit_with_error(message: str) -> NoReturn:
  """One `error:` line and exit status 2, as for every bad command line."""
  print(f"error: {' '.join(message.split())}", file=sys.stderr)
  sys.exit(2)


def missing_field(config: ml_collections.ConfigDict, path: str) -> str | None:
  """None if ``config`` has the dotted field ``path``; else which part it lacks and the
  nearest field it has there."""
  node, known = config, []
  for part in path.split("."):
    if not (isinstance(node, ml_collections.ConfigDict) and part in node):
      break
    node, known = node[part], known + [part]
  else:
    return None
  section = ".".join(known)
  where = f"{section}." if section else ""
  if not isinstance(node, ml_collections.ConfigDict):
    return f"--config.{path}: {section} is a value, not a section"
  close = difflib.get_close_matches(part, list(node.keys()), n=1)
  hint = (f"did you mean --config.{where}{close[0]}?" if close else
          f"{section or 'the config'} has {', '.join(sorted(node.keys()))}")
  return f"--config.{path}: the config has no field {where}{part}; {hint}"


def _unknown_override(config: ml_collections.ConfigDict, argv: Sequence[str]) -> str | None:
  """The message for the first ``--config.a.b`` override in ``argv`` that ``config`` lacks."""
  return next((message for arg in argv if (match := re.match(r"--config\.([^=]+)", arg))
               and (message := missing_field(config, match.group(1)))), None)


try:
  _CONFIG = config_flags.DEFINE_config_file(
      "config", f"{presets.__file__}:default", "Config file returning a ConfigDict from "
      "get_config(), e.g. configs/imagenet.py (default: the embedded digits config); "
      "override one field with --config.a.b=v.", lock_config=True)
except (AttributeError, KeyError):
  # ml_collections looks the --config.a.b overrides in sys.argv up in the default config
  # as it defines the flag: one naming a field no preset has fails here, at import.
  exit_with_error(_unknown_override(presets.default(), sys.argv)
                  or "a --config.a.b override names a field the config lacks")
_WORKDIR = flags.DEFINE_string("workdir", None, "Work directory (default ./runs/<timestamp>).")

# Exit status after a preemption save: 128 + SIGTERM, what the process would return had
# the signal killed it, so schedulers see an interrupted run (the JobSets in launch/
# restart it) rather than a finished one, as a 0 would tell them.
PREEMPTED_EXIT_CODE = 143


def stage_list(stages: str) -> list[str]:
  return [s.strip() for s in stages.split(",") if s.strip()]


def resolve_workdir(config) -> str:
  """--workdir, else config.workdir, else ./runs/<timestamp> in a single-process run.

  Raises ConfigError in a multi-process job that names none: the hosts must share one
  directory, and a rerun must find it to resume.
  """
  if _WORKDIR.value:
    return _WORKDIR.value
  if config.workdir:
    return config.workdir
  if distributed.detect_cluster(os.environ) is not None:
    raise config_validation.ConfigError(
        "workdir is not set; a multi-process job needs --workdir=DIR (or config.workdir), "
        "the same on every host")
  return os.path.join("runs", datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))


def enable_compilation_cache(jax) -> None:
  """Persist compiled programs across runs (restarts, later stages, reruns).

  The supernet compiles a few hundred small programs (per op kind and shape, forward and
  backward-with-update, glue), most in under 0.1 s but ~12 s together for the default's
  first candidates on 2 CPU cores; so every program is cached, however quick, and a
  restart loads them instead (measured: the benchmark's stage 1 was blocked 5.6 s instead
  of 19.1 s). Beside it, `program_store` keeps the supernet programs that compile-only
  passes compiled, which later runs load without tracing them (stage 1 blocked 0.9 s).
  The JAX_COMPILATION_CACHE_DIR, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS and
  JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES environment variables take precedence.
  """
  if not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", os.path.join(
        os.path.expanduser("~"), ".cache", "autospace_jax", "xla"))
  if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  if "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES" not in os.environ:
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def run_pipeline(config, workdir: str) -> dict:
  """Run the configured stages in order; each skips itself when its outputs exist."""
  import jax  # noqa: PLC0415 -- after distributed initialisation.

  from autospace_jax import arch_search  # noqa: PLC0415
  from autospace_jax import metrics as metrics_lib  # noqa: PLC0415
  from autospace_jax import report  # noqa: PLC0415
  from autospace_jax import space_search  # noqa: PLC0415
  from autospace_jax import train  # noqa: PLC0415
  from autospace_jax.parallel import DataParallel  # noqa: PLC0415

  enable_compilation_cache(jax)
  parallel = DataParallel()
  writer = metrics_lib.MetricWriter(workdir, enabled=jax.process_index() == 0)
  stages = stage_list(config.stages)
  summary: dict = {"workdir": workdir, "data": config.data.name, "stages": config.stages,
                   "devices": jax.device_count(), "processes": jax.process_count()}
  space_path = None
  if "space" in stages:
    space_path = space_search.run(config, workdir, writer, parallel)
  elif config.search.space not in ("learned", "irb"):
    space_path = config.search.space
  else:
    space_path = os.path.join(workdir, "space", space_search.SPACE_CONFIG)
  results = []
  if "search" in stages:
    results = arch_search.run(config, workdir, space_path, writer, parallel)
  if "train" in stages:
    if config.train.net:
      summary["final"] = "net"
      train.run(config, config.train.net, os.path.join(workdir, "train", train.GIVEN_NET_RUN),
                writer, parallel, "train")
    for result in results:
      tag = arch_search.run_name(result["space"], result["target_madds"])
      train.run(config, os.path.join(workdir, "search", tag, netspec.NET_FILE),
                os.path.join(workdir, "train", tag), writer, parallel, f"train {tag}")
  learned = [r for r in results if r["space"] == "learned"] or results
  if learned and not config.train.net:
    best = max(learned, key=lambda r: r["target_madds"])
    summary["final"] = arch_search.run_name(best["space"], best["target_madds"])
  writer.close()
  if jax.process_index() == 0:
    print(f"report: {report.write_report(workdir, summary)}")
  return summary


class _OrbaxInfoFilter(std_logging.Filter):
  """Orbax logs several INFO lines per checkpoint; keep its warnings, drop the chatter."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or "orbax" not in record.pathname


def write_config_record(config, workdir: str) -> None:
  """`workdir/config.json`, rewritten only when the config changed (a rerun of a finished
  job with the same command leaves every file untouched)."""
  path = epath.Path(workdir) / "config.json"
  text = json.dumps(config.to_dict(), indent=1, default=list)
  if not (path.exists() and path.read_text() == text):
    files.write_text(path, text)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  config = _CONFIG.value
  try:
    config.keys()  # ml_collections defers a config file's load error to the first read
  except OSError as error:
    exit_with_error(f"--config: {_last_line(str(error))}")
  try:
    workdir = resolve_workdir(config)
    config_validation.validate(config, workdir)
    if distributed.maybe_initialize():
      config_validation.check_devices(config)  # The global device count is known now.
    if config.data.name in input_pipeline.DOWNLOADABLE:
      if distributed.is_main_process():  # one host downloads CIFAR-10 if it must ...
        config_validation.check_data(config, download=True)
      distributed.sync_processes("data prepared")
    config_validation.check_data(config)  # ... and every host checks it can read the data
  except config_validation.ConfigError as e:
    exit_with_error(str(e))
  logging.get_absl_handler().addFilter(_OrbaxInfoFilter())
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  if distributed.is_main_process():
    write_config_record(config, workdir)
  logging.info("workdir: %s", workdir)

  from autospace_jax import checkpointing  # noqa: PLC0415
  from autospace_jax import supernet  # noqa: PLC0415
  checkpointing.install_sigterm_handler()
  try:
    run_pipeline(config, workdir)
  except checkpointing.Preempted as e:
    print(f"preempted: checkpoint saved at step {e.step} in {e.directory}; rerun the same "
          f"command to resume, with --workdir={shlex.quote(workdir)}")
    sys.exit(PREEMPTED_EXIT_CODE)
  except supernet.NonFiniteLoss as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(3)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a bad flag as one `error:` line and exit status 2: a value
  of the wrong type, an override of a field the config lacks, a config file that fails."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as error:
    text = str(error)
    if "Traceback (most recent call last)" in text:  # keep the flag and the exception
      flag = re.match(r"(flag --\S+): ", text)
      text = f"{flag.group(1) if flag else 'flag'}: {_last_line(text)}"
    exit_with_error(text)
  except Exception as error:  # noqa: BLE001 -- raised by the user's config file or override
    loaded = flags.FLAGS["config"].value
    config = loaded if isinstance(loaded, ml_collections.ConfigDict) else presets.default()
    if message := _unknown_override(config, argv):
      exit_with_error(message)
    where = "" if isinstance(error, SyntaxError) else "".join(  # its message says where
        f" ({frame.filename}:{frame.lineno})"
        for frame in traceback.extract_tb(error.__traceback__)[-1:])
    exit_with_error(f"--config: {type(error).__name__}: {error}{where}")


def _last_line(text: str) -> str:
  return [line for line in text.splitlines() if line.strip()][-1].strip()


def run_cli() -> None:
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run_cli()
