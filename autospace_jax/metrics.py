"""Training metrics as TensorBoard events and as a JSON-lines file, written by one process.

TensorBoard is for watching a run; `metrics.jsonl` (one object per `write_scalars` call)
is for scripts and the report, which can read it without TensorBoard or TensorFlow.
Every process may call the writer, but only the enabled one (process 0 by default) writes,
so a multi-host job produces one copy of each file. A resumed run appends to both;
`read_jsonl` keeps its record of a step it logs again.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
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
    self._summary = None
    self._jsonl = None

  def _open(self) -> None:
    """Files are created on the first write, so a run that resumes a finished job (and
    logs nothing) leaves the work directory exactly as it was."""
    if self._summary is None:
      epath.Path(self.workdir).mkdir(parents=True, exist_ok=True)
      self._summary = tensorboardX.SummaryWriter(
          logdir=os.path.join(self.workdir, TENSORBOARD_DIR))
      path = epath.Path(self.workdir) / JSONL_FILE
      cut_short = path.exists() and not path.read_bytes().endswith(b'\n')
      self._jsonl = path.open('a')
      if cut_short:  # a killed run's last line: keep it apart from the records to come
        self._jsonl.write('\n')

  def write_scalars(self, step: int, scalars: Mapping[str, float], stage: str = '') -> None:
    """Logs each scalar under the tag `stage/name` (just `name` without a stage)."""
    if not self.enabled:
      return
    self._open()
    values = {name: float(value) for name, value in scalars.items()}
    for name, value in values.items():
      self._summary.add_scalar(_tag(stage, name), value, global_step=step)
    self._jsonl.write(json.dumps({'step': int(step), 'stage': stage, **values}) + '\n')
    self._jsonl.flush()

  def write_histogram(self, step: int, tag: str, values: Any) -> None:
    if self.enabled:
      self._open()
      self._summary.add_histogram(tag, np.asarray(values), global_step=step)

  def flush(self) -> None:
    if self.enabled and self._summary is not None:
      self._summary.flush()
      self._jsonl.flush()

  def close(self) -> None:
    if self.enabled and self._summary is not None:
      self._summary.close()
      self._jsonl.close()
    self.enabled = False


def _tag(stage: str, name: str) -> str:
  """`stage/name` in TensorBoard's tag alphabet (stage names like 'train irb_0.32M' hold
  spaces, which it would replace itself with a warning per tag)."""
  return re.sub(r'[^A-Za-z0-9_.\-/]', '_', f'{stage}/{name}' if stage else name)


def read_jsonl(path: str) -> list[dict]:
  """The records of a metrics.jsonl file, one per (stage, step), in order.

  Lines cut short by a killed process are dropped, and where a resumed run logged a
  step again (it restarts from its last checkpoint) its later record wins.
  """
  records: dict[tuple[str, int], dict] = {}
  for line in epath.Path(path).read_text().splitlines():
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      continue
    records[record.get('stage', ''), record['step']] = record
  return list(records.values())
