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


def _scalars(logdir: Path, tag: str) -> list[tuple[int, float]]:
  return [(e.step, e.value) for e in _events(logdir).Scalars(tag)]


def test_scalars_reach_tensorboard_and_jsonl(tmp_path):
  """Each stage is a TensorBoard run, so one metric of several stages shares a chart."""
  writer = metrics.MetricWriter(str(tmp_path), enabled=True)
  writer.write_scalars(5, {'loss': 2.5, 'top1': np.float32(0.25)}, stage='space')
  writer.write_scalars(10, {'loss': 1.5, 'top1': 0.5}, stage='space')
  writer.write_scalars(10, {'lr': 0.1})
  writer.close()

  runs = tmp_path / metrics.TENSORBOARD_DIR
  assert set(_events(runs / 'space').Tags()['scalars']) == {'loss', 'top1'}
  assert _scalars(runs / 'space', 'loss') == [(5, 2.5), (10, 1.5)]
  assert _scalars(runs / 'space', 'top1') == [(5, 0.25), (10, 0.5)]
  assert _scalars(runs, 'lr') == [(10, np.float32(0.1))]

  assert metrics.read_jsonl(str(tmp_path / metrics.JSONL_FILE)) == [
      {'step': 5, 'stage': 'space', 'loss': 2.5, 'top1': 0.25},
      {'step': 10, 'stage': 'space', 'loss': 1.5, 'top1': 0.5},
      {'step': 10, 'stage': '', 'lr': 0.1}]


def test_stage_names_with_spaces_become_valid_run_directories(tmp_path):
  writer = metrics.MetricWriter(str(tmp_path), enabled=True)
  writer.write_scalars(1, {'loss': 1.0}, stage='train irb_0.32M')
  writer.close()
  assert _events(tmp_path / metrics.TENSORBOARD_DIR / 'train_irb_0.32M').Tags()[
      'scalars'] == ['loss']
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


def test_a_resumed_stage_s_tensorboard_run_drops_the_points_it_logs_again(tmp_path):
  """TensorBoard would otherwise draw both runs' points for the steps after the
  checkpoint; another stage's run, with its own step counter, keeps all of its points."""
  writer = metrics.MetricWriter(str(tmp_path), enabled=True)
  for step in range(1, 11):
    writer.write_scalars(step, {'loss': 1.0}, 'search/learned_0.74M')
    writer.write_scalars(step, {'loss': 1.0}, 'space')
  writer.close()
  resumed = metrics.MetricWriter(str(tmp_path), enabled=True)  # from the step-5 checkpoint
  for step in range(6, 11):
    resumed.write_scalars(step, {'loss': 2.0}, 'search/learned_0.74M')
  resumed.close()
  runs = tmp_path / metrics.TENSORBOARD_DIR
  assert _scalars(runs / 'search' / 'learned_0.74M', 'loss') == (
      [(s, 1.0) for s in range(1, 6)] + [(s, 2.0) for s in range(6, 11)])
  assert _scalars(runs / 'space', 'loss') == [(s, 1.0) for s in range(1, 11)]


def test_records_of_one_step_merge(tmp_path):
  """Stage 3 logs its last training step and its final evaluation at the same step."""
  writer = metrics.MetricWriter(str(tmp_path), enabled=True)
  writer.write_scalars(100, {'loss': 0.5, 'top1': 0.8}, 'train net')
  writer.write_scalars(100, {'eval_top1': 0.9}, 'train net')
  writer.close()
  assert metrics.read_jsonl(str(tmp_path / metrics.JSONL_FILE)) == [
      {'step': 100, 'stage': 'train net', 'loss': 0.5, 'top1': 0.8, 'eval_top1': 0.9}]


def test_disabled_writer_writes_nothing(tmp_path):
  workdir = tmp_path / 'run'
  writer = metrics.MetricWriter(str(workdir), enabled=False)
  writer.write_scalars(1, {'loss': 1.0}, 'space')
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
