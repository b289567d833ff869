"""Runs survive: SIGKILL and SIGTERM lose nothing, finished work is never redone, and a
stage runs alone on the files another run left.

Each test drives the real command line (`python -m autospace_jax.main`) in a subprocess
on a tiny digits config written to a config file.
"""

import hashlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from autospace_jax.main import PREEMPTED_EXIT_CODE
from conftest import ROOT

pytestmark = pytest.mark.slow
TESTS = Path(__file__).resolve().parent
CONFIG_TEMPLATE = """
import sys
sys.path.insert(0, {tests!r})
from conftest import short_schedule, tiny_config


def get_config():
  config = short_schedule(tiny_config(), warmup={warmup}, main={main})
  config.checkpoint.every_steps = 3
  config.log_every_steps = 1
  return config
"""


def write_config(tmp_path: Path, warmup: float = 0.1, main: float = 0.3) -> Path:
  path = tmp_path / "tiny_config.py"
  path.write_text(CONFIG_TEMPLATE.format(tests=str(TESTS), warmup=warmup, main=main))
  return path


def command(config: Path, workdir: Path, *flags: str) -> list[str]:
  return [sys.executable, "-m", "autospace_jax.main", f"--config={config}",
          f"--workdir={workdir}", *flags]


def run(cmd: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
  result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
  return result


def checkpoint_steps(directory: Path) -> list[int]:
  if not directory.exists():
    return []
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def start_and_signal(cmd: list[str], checkpoints: Path, after_step: int, sig: int,
                     timeout: float = 600) -> subprocess.Popen:
  """Start ``cmd`` and send ``sig`` once a checkpoint at ``after_step`` or later exists."""
  process = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
  deadline = time.time() + timeout
  while time.time() < deadline and process.poll() is None:
    if any(s >= after_step for s in checkpoint_steps(checkpoints)):
      process.send_signal(sig)
      break
    time.sleep(0.05)
  else:
    out, err = process.communicate(timeout=60)
    pytest.fail(f"the run ended (or timed out) before step {after_step}:\n{out}\n{err}")
  return process


def learned_space(workdir: Path) -> tuple[list, np.ndarray]:
  record = json.loads((workdir / "space" / "learned_space.json").read_text())
  genomes = [[cell["matrix"] for cell in layer] for layer in record["cells"]]
  alpha = np.array([[cell["alpha"] for cell in layer] for layer in record["cells"]])
  return genomes, alpha


def reference_result_dir(workdir: Path) -> str:
  [result] = (workdir / "search").glob("*/result.json")
  return result.parent.name


def search_result(workdir: Path) -> dict:
  [result] = (workdir / "search").glob("*/result.json")
  return json.loads(result.read_text())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  """One uninterrupted run of every stage: the reference for every resumed run."""
  tmp = tmp_path_factory.mktemp("uninterrupted")
  config = write_config(tmp)
  run(command(config, tmp / "run", "--config.search.compare_irb=False"))
  return config, tmp / "run"


def test_sigkill_during_evolution_then_restart_gives_the_same_learned_space(
    uninterrupted, tmp_path):
  config, reference = uninterrupted
  total = json.loads((reference / "space" / "learned_space.json").read_text())["steps"]
  kill_after = int(np.random.default_rng().integers(2, total - 6))
  workdir = tmp_path / "run"
  cmd = command(config, workdir, "--config.stages=space")
  process = start_and_signal(cmd, workdir / "space" / "checkpoints", kill_after,
                             signal.SIGKILL)
  process.communicate(timeout=60)
  assert process.returncode == -signal.SIGKILL
  assert not (workdir / "space" / "learned_space.json").exists(), "killed too late"
  run(cmd)
  genomes, alpha = learned_space(workdir)
  ref_genomes, ref_alpha = learned_space(reference)
  assert genomes == ref_genomes, f"killed after step {kill_after}"
  np.testing.assert_allclose(alpha, ref_alpha, atol=1e-6, rtol=0)


def test_sigterm_then_sigkill_during_architecture_search_then_restart_gives_the_same_net(
    uninterrupted, tmp_path):
  config, reference = uninterrupted
  space = reference / "space" / "learned_space.config"
  workdir = tmp_path / "run"
  cmd = command(config, workdir, "--config.stages=search", f"--config.search.space={space}",
                "--config.search.compare_irb=False")
  reference_result = search_result(reference)
  checkpoints = workdir / "search" / reference_result_dir(reference) / "checkpoints"
  total = reference_result["steps"]

  # SIGTERM (a preemption notice): checkpoint, message, and an exit status that tells a
  # scheduler the run was interrupted, not finished.
  process = start_and_signal(cmd, checkpoints, 2, signal.SIGTERM)
  out, err = process.communicate(timeout=120)
  assert process.returncode == PREEMPTED_EXIT_CODE == 128 + signal.SIGTERM, err[-3000:]
  assert "preempted: checkpoint saved at step" in out
  assert "rerun the same command to resume" in out
  assert checkpoint_steps(checkpoints) and not (checkpoints.parent / "result.json").exists()

  # SIGKILL of the resumed run, at a random later step: nothing checkpointed is lost.
  kill_after = int(np.random.default_rng().integers(max(checkpoint_steps(checkpoints)) + 1,
                                                    total - 3))
  process = start_and_signal(cmd, checkpoints, kill_after, signal.SIGKILL)
  process.communicate(timeout=60)
  assert process.returncode == -signal.SIGKILL
  assert not (checkpoints.parent / "result.json").exists(), "killed too late"

  run(cmd)
  result = search_result(workdir)
  assert result["choice"] == reference_result["choice"], f"killed after step {kill_after}"
  np.testing.assert_allclose(result["alpha"], reference_result["alpha"], atol=1e-6, rtol=0)


def digest(workdir: Path) -> dict[str, tuple[str, int]]:
  """Content hash and mtime of every output file (checkpoints included)."""
  return {str(p.relative_to(workdir)): (hashlib.sha256(p.read_bytes()).hexdigest(),
                                        p.stat().st_mtime_ns)
          for p in sorted(workdir.rglob("*")) if p.is_file()}


def test_rerunning_a_finished_pipeline_changes_no_output(uninterrupted):
  config, workdir = uninterrupted  # the finished reference run, rerun in place
  before = digest(workdir)
  assert "report.md" in before
  second = run(command(config, workdir, "--config.search.compare_irb=False"))
  after = digest(workdir)
  changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
  assert changed == [], changed
  assert "report:" in second.stdout


def test_train_stage_alone_trains_a_given_net_file(uninterrupted, tmp_path):
  config, reference = uninterrupted
  [net] = (reference / "search").glob("*/net.json")
  workdir = tmp_path / "run"
  result = run(command(config, workdir, "--config.stages=train", f"--config.train.net={net}"))
  metrics = json.loads((workdir / "train" / "net" / "metrics.json").read_text())
  assert 0.0 <= metrics["top1"] <= metrics["top5"] <= 1.0
  assert "train: top-1" in result.stdout
  assert not (workdir / "space").exists() and not (workdir / "search").exists()


def test_sigkill_during_training_then_restart_gives_the_same_metrics(uninterrupted, tmp_path):
  config, reference = uninterrupted
  [net] = (reference / "search").glob("*/net.json")
  flags = ("--config.stages=train", f"--config.train.net={net}",
           "--config.train.epochs=0.4", "--config.train.eval_every_epochs=0.1")
  run(command(config, tmp_path / "reference", *flags))
  expected = json.loads((tmp_path / "reference" / "train" / "net" / "metrics.json").read_text())
  assert len(expected["history"]) >= 3  # evaluations before and after the kill

  workdir = tmp_path / "run"
  cmd = command(config, workdir, *flags)
  kill_after = expected["history"][1]["step"]  # at least one evaluation is behind it
  process = start_and_signal(cmd, workdir / "train" / "net" / "checkpoints", kill_after,
                             signal.SIGKILL)
  process.communicate(timeout=60)
  assert process.returncode == -signal.SIGKILL
  metrics_path = workdir / "train" / "net" / "metrics.json"
  assert not metrics_path.exists(), "killed too late"
  run(cmd)
  assert json.loads(metrics_path.read_text()) == expected
