"""Training metrics as TensorBoard events and as a JSON-lines file, written by one process.

TensorBoard is for watching a run; `metrics.jsonl` (one object per `write_scalars` call)
is for scripts and the report, which can read it without TensorBoard or TensorFlow.
Every process may call the writer, but only the enabled one (process 0 by default) writes,
so a multi-host job produces one copy of each file. A resumed run appends to both and logs
again the steps after its checkpoint: each stage is its own TensorBoard run
(`tensorboard/<stage>`), opened with `purge_step` at the first step this process logs, so
TensorBoard drops the interrupted run's points from there on; `read_jsonl` merges a
step's records, the later values winning.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Mapping
from typing import Any

import jax
import tensorboardX
from etils import epath
from tensorboardX import record_writer

JSONL_FILE = 'metrics.jsonl'
TENSORBOARD_DIR = 'tensorboard'


class _EpathEventFiles:
  """tensorboardX's writer factory for `gs://` logdirs: event files go through
  etils.epath like every other file in the work directory (tensorboardX's own GCS
  writer would need google-cloud-storage)."""

  def open(self, path: str) -> Any:
    return epath.Path(path).open('wb')

  def directory_check(self, path: str) -> None:
    epath.Path(path).mkdir(parents=True, exist_ok=True)


record_writer.register_writer_factory('gs', _EpathEventFiles())


class MetricWriter:
  """Writes `workdir/tensorboard/` events and `workdir/metrics.jsonl`; no-op when disabled."""

  def __init__(self, workdir: str, enabled: bool | None = None):
    """`enabled` defaults to `jax.process_index() == 0`, read here rather than at import
    so that importing this module does not start JAX before `jax.distributed` does."""
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.workdir = workdir
    self._runs: dict[str, tensorboardX.SummaryWriter] = {}
    self._jsonl = None

  def _run(self, stage: str, step: int) -> tensorboardX.SummaryWriter:
    """The stage's TensorBoard run, opened at its first step logged here. Files are
    created on the first write, so a run that resumes a finished job (and logs nothing)
    leaves the work directory exactly as it was."""
    if self._jsonl is None:
      epath.Path(self.workdir).mkdir(parents=True, exist_ok=True)
      path = epath.Path(self.workdir) / JSONL_FILE
      cut_short = path.exists() and not path.read_bytes().endswith(b'\n')
      self._jsonl = path.open('a')
      if cut_short:  # a killed run's last line: keep it apart from the records to come
        self._jsonl.write('\n')
    if stage not in self._runs:
      # Event files are named by the second and the host, and read in name order; the
      # nanoseconds keep a resumed run's file from replacing, or sorting before, the one
      # it resumes within the same second.
      self._runs[stage] = tensorboardX.SummaryWriter(
          logdir=os.path.join(self.workdir, TENSORBOARD_DIR, run_directory(stage)),
          purge_step=step, filename_suffix=f'.{time.time_ns()}')
    return self._runs[stage]

  def write_scalars(self, step: int, scalars: Mapping[str, float], stage: str = '') -> None:
    """Logs each scalar under its name in the TensorBoard run of ``stage``."""
    if not self.enabled:
      return
    run = self._run(stage, step)
    values = {name: float(value) for name, value in scalars.items()}
    for name, value in values.items():
      run.add_scalar(name, value, global_step=step)
    self._jsonl.write(json.dumps({'step': int(step), 'stage': stage, **values}) + '\n')
    self._jsonl.flush()

  def flush(self) -> None:
    if self.enabled and self._jsonl is not None:
      for run in self._runs.values():
        run.flush()
      self._jsonl.flush()

  def close(self) -> None:
    if self.enabled and self._jsonl is not None:
      for run in self._runs.values():
        run.close()
      self._jsonl.close()
    self.enabled = False


def run_directory(stage: str) -> str:
  """A stage's TensorBoard run directory, in a portable alphabet ('train irb_0.32M' ->
  'train_irb_0.32M'; 'search/learned_0.74M' stays nested); '.' for no stage."""
  return re.sub(r'[^A-Za-z0-9_.\-/]', '_', stage) or '.'


def read_jsonl(path: str) -> list[dict]:
  """The records of a metrics.jsonl file, one per (stage, step), in order.

  Lines cut short by a killed process are dropped. Records of one step merge: a stage may
  log a step twice (stage 3 its last training step and its evaluation), and where a
  resumed run logged a step again (it restarts from its last checkpoint) its values win.
  """
  records: dict[tuple[str, int], dict] = {}
  for line in epath.Path(path).read_text().splitlines():
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      continue
    key = record.get('stage', ''), record['step']
    records[key] = {**records.get(key, {}), **record}
  return list(records.values())
