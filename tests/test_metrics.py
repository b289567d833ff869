"""MetricWriter: TensorBoard and metrics.jsonl get the same scalars; others write nothing."""

import subprocess
import sys
from pathlib import Path

import numpy as np
from tensorboard.backend.event_processing import event_accumulator

from autospace_jax import metrics

ROOT = Path(__file__).resolve().parents[1]


def _events(logdir: Path) -> event_accumulator.EventAccumulator:
  acc = event_accumulator.EventAccumulator(str(logdir), size_guidance={
      event_accumulator.SCALARS: 0, event_accumulator.HISTOGRAMS: 0})
  acc.Reload()
  return acc


def test_scalars_reach_tensorboard_and_jsonl(tmp_path):
  writer = metrics.MetricWriter(str(tmp_path), enabled=True)
  writer.write_scalars(5, {'loss': 2.5, 'top1': np.float32(0.25)}, stage='space')
  writer.write_scalars(10, {'loss': 1.5, 'top1': 0.5}, stage='space')
  writer.write_scalars(10, {'lr': 0.1})
  writer.write_histogram(10, 'space/alpha', np.linspace(0.0, 1.0, 50))
  writer.close()

  acc = _events(tmp_path / metrics.TENSORBOARD_DIR)
  assert set(acc.Tags()['scalars']) == {'space/loss', 'space/top1', 'lr'}
  assert [(e.step, e.value) for e in acc.Scalars('space/loss')] == [(5, 2.5), (10, 1.5)]
  assert [(e.step, e.value) for e in acc.Scalars('space/top1')] == [(5, 0.25), (10, 0.5)]
  assert [(e.step, e.value) for e in acc.Scalars('lr')] == [(10, np.float32(0.1))]
  (histogram,) = acc.Histograms('space/alpha')
  assert histogram.step == 10 and histogram.histogram_value.num == 50

  assert metrics.read_jsonl(str(tmp_path / metrics.JSONL_FILE)) == [
      {'step': 5, 'stage': 'space', 'loss': 2.5, 'top1': 0.25},
      {'step': 10, 'stage': 'space', 'loss': 1.5, 'top1': 0.5},
      {'step': 10, 'stage': '', 'lr': 0.1}]


def test_stage_names_with_spaces_become_valid_tensorboard_tags(tmp_path):
  writer = metrics.MetricWriter(str(tmp_path), enabled=True)
  writer.write_scalars(1, {'loss': 1.0}, stage='train irb_0.32M')
  writer.close()
  assert _events(tmp_path / metrics.TENSORBOARD_DIR).Tags()['scalars'] == [
      'train_irb_0.32M/loss']
  assert metrics.read_jsonl(str(tmp_path / metrics.JSONL_FILE))[0]['stage'] == (
      'train irb_0.32M')


def test_resumed_run_appends_to_jsonl(tmp_path):
  for step in (1, 2):
    writer = metrics.MetricWriter(str(tmp_path), enabled=True)
    writer.write_scalars(step, {'loss': float(step)}, 'train')
    writer.close()
  records = metrics.read_jsonl(str(tmp_path / metrics.JSONL_FILE))
  assert [r['step'] for r in records] == [1, 2]


def test_jsonl_is_readable_before_close(tmp_path):
  """A killed run keeps every line written so far, and a line cut short is dropped."""
  writer = metrics.MetricWriter(str(tmp_path), enabled=True)
  writer.write_scalars(1, {'loss': 1.0})
  path = tmp_path / metrics.JSONL_FILE
  with open(path, 'a') as f:
    f.write('{"step": 2, "lo')
  assert metrics.read_jsonl(str(path)) == [{'step': 1, 'stage': '', 'loss': 1.0}]
  writer.close()


def test_a_resumed_run_s_records_replace_the_steps_it_logs_again(tmp_path):
  writer = metrics.MetricWriter(str(tmp_path), enabled=True)
  for step in (1, 2, 3):
    writer.write_scalars(step, {'loss': 1.0}, 'space')
  path = tmp_path / metrics.JSONL_FILE
  with open(path, 'a') as f:
    f.write('{"step": 4, "sta')  # killed mid-line
  writer.close()
  resumed = metrics.MetricWriter(str(tmp_path), enabled=True)  # from the step-1 checkpoint
  for step in (2, 3, 4):
    resumed.write_scalars(step, {'loss': 2.0}, 'space')
  resumed.close()
  assert [(r['step'], r['loss']) for r in metrics.read_jsonl(str(path))] == [
      (1, 1.0), (2, 2.0), (3, 2.0), (4, 2.0)]


def test_disabled_writer_writes_nothing(tmp_path):
  workdir = tmp_path / 'run'
  writer = metrics.MetricWriter(str(workdir), enabled=False)
  writer.write_scalars(1, {'loss': 1.0}, 'space')
  writer.write_histogram(1, 'alpha', [0.1, 0.9])
  writer.flush()
  writer.close()
  assert not workdir.exists()


def test_import_does_not_start_jax_or_tensorflow():
  """The default `enabled` is read at construction, after `jax.distributed.initialize`."""
  code = ('import sys; from jax._src import xla_bridge; import autospace_jax.metrics; '
          'assert not xla_bridge.backends_are_initialized(); '
          'assert "tensorflow" not in sys.modules; print("ok")')
  result = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
  assert result.stdout.strip() == 'ok', result.stderr[-2000:]
