"""Checkpointing: what a preemptible NAS run relies on to resume without losing work."""

import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from autospace_jax import checkpointing

ROOT = Path(__file__).resolve().parents[1]


def _state(seed: int = 0):
  """Params with mixed dtypes plus an sgd+nesterov optax state that has seen one update."""
  key = jax.random.PRNGKey(seed)
  params = {'conv': {'kernel': jax.random.normal(key, (3, 3, 4, 8))},
            'bn': {'scale': jnp.ones(8, jnp.bfloat16)},
            'alpha': jnp.arange(6, dtype=jnp.float32).reshape(2, 3)}
  opt = optax.chain(optax.clip_by_global_norm(1.0),
                    optax.sgd(0.1, momentum=0.9, nesterov=True))
  opt_state = opt.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  _, opt_state = opt.update(grads, opt_state, params)
  return {'params': params, 'opt_state': opt_state, 'step': jnp.array(7, jnp.int32)}


def _abstract(tree):
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


META = {'step': 7, 'populations': [[{'ops': [1, 2, 3], 'score': 0.5}], [[0, 1], []]],
        'rng': [12, 34], 'data': {'epoch': 1, 'position': 96}}


def _assert_same(restored, expected):
  assert jax.tree.structure(restored) == jax.tree.structure(expected)
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(expected)):
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_round_trip_keeps_optax_state_dtypes_and_meta(tmp_path):
  state = _state()
  ckpt = checkpointing.Checkpointer(str(tmp_path))
  assert ckpt.latest_step() is None
  assert ckpt.restore_latest(lambda meta: _abstract(state)) is None
  assert ckpt.save(7, state, META)
  ckpt.wait()

  assert ckpt.restore_meta(7) == META
  restored = ckpt.restore_arrays(7, _abstract(state))
  _assert_same(restored, state)
  # Optax states come back as their NamedTuples, so `opt.update` accepts them.
  assert isinstance(restored['opt_state'][1][0], optax.TraceState)
  step, arrays, meta = ckpt.restore_latest(lambda meta: _abstract(state))
  assert (step, meta) == (7, META)
  _assert_same(arrays, state)
  for got, want in zip(jax.tree.leaves(arrays), jax.tree.leaves(_abstract(state))):
    assert got.sharding == want.sharding
  ckpt.close()


def test_a_relative_directory_is_taken_from_the_current_directory(tmp_path, monkeypatch):
  # `python -m autospace_jax.main` with no --workdir checkpoints under ./runs/<timestamp>.
  monkeypatch.chdir(tmp_path)
  state = _state()
  ckpt = checkpointing.Checkpointer(os.path.join('runs', 'space', 'checkpoints'))
  assert ckpt.save(7, state, META)
  ckpt.wait()
  ckpt.close()
  again = checkpointing.Checkpointer(str(tmp_path / 'runs' / 'space' / 'checkpoints'))
  step, arrays, meta = again.restore_latest(lambda meta: _abstract(state))
  assert (step, meta) == (7, META)
  _assert_same(arrays, state)
  again.close()


def test_restore_or_init_starts_fresh_then_resumes_replicated(tmp_path):
  from autospace_jax.parallel import DataParallel
  parallel = DataParallel()
  ckpt = checkpointing.Checkpointer(str(tmp_path), async_save=False)
  step, state, meta = ckpt.restore_or_init(_state, parallel, 'test')
  assert (step, meta) == (0, None)
  _assert_same(state, _state())
  ckpt.save(7, _state(1), META)
  step, state, meta = ckpt.restore_or_init(_state, parallel, 'test')
  assert (step, meta) == (7, META)
  _assert_same(state, _state(1))
  assert all(leaf.sharding == parallel.replicated for leaf in jax.tree.leaves(state))
  ckpt.close()


def test_abstract_target_is_built_from_the_restored_meta(tmp_path):
  ckpt = checkpointing.Checkpointer(str(tmp_path), async_save=False)
  ckpt.save(1, {'w': jnp.zeros((2, 5))}, {'width': 5})
  seen = []

  def make_abstract(meta):
    seen.append(meta)
    return {'w': jax.ShapeDtypeStruct((2, meta['width']), jnp.float32)}

  step, arrays, _ = ckpt.restore_latest(make_abstract)
  assert step == 1 and seen == [{'width': 5}] and arrays['w'].shape == (2, 5)
  ckpt.close()


def test_max_to_keep_keeps_the_newest(tmp_path):
  ckpt = checkpointing.Checkpointer(str(tmp_path), max_to_keep=2)
  for step in range(1, 6):
    ckpt.save(step, {'x': jnp.full(3, step)}, {'step': step})
  ckpt.wait()
  assert list(ckpt.all_steps()) == [4, 5]
  ckpt.close()
  assert sorted(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit()) == [4, 5]


def test_saving_a_saved_step_again_is_a_no_op(tmp_path):
  """A loop saves on schedule and then again when it sees the preemption at that step."""
  ckpt = checkpointing.Checkpointer(str(tmp_path))
  assert ckpt.save(5, {'x': jnp.ones(2)}, {'step': 5})
  assert not ckpt.save(5, {'x': jnp.zeros(2)}, {'step': -1}, force=True)
  ckpt.wait()
  np.testing.assert_array_equal(ckpt.restore_arrays(5, {'x': jax.ShapeDtypeStruct(
      (2,), jnp.float32)})['x'], np.ones(2))
  ckpt.close()


def test_async_save_is_readable_by_a_new_checkpointer(tmp_path):
  state = _state(1)
  ckpt = checkpointing.Checkpointer(str(tmp_path), async_save=True)
  assert ckpt.save(3, state, META)
  ckpt.wait()
  # No close(): a preempted process may exit right after wait().
  fresh = checkpointing.Checkpointer(str(tmp_path))
  assert fresh.latest_step() == 3
  step, arrays, meta = fresh.restore_latest(lambda meta: _abstract(state))
  assert (step, meta) == (3, META)
  _assert_same(arrays, state)
  ckpt.close()
  fresh.close()


def _truncate_array_data(step_dir: Path):
  files = [p for p in (step_dir / checkpointing.ARRAYS).rglob('*')
           if p.is_file() and p.parent.name == 'd']
  assert files
  for path in files:
    path.write_bytes(b'')


def _truncate_meta(step_dir: Path):
  files = [p for p in (step_dir / checkpointing.META).iterdir() if p.name != 'commit_success.txt']
  assert files
  for path in files:
    path.write_bytes(b'')


# Orbax's reader leaves an asyncio callback behind when a read fails; that is its noise.
@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
@pytest.mark.parametrize('corrupt', [_truncate_array_data, _truncate_meta])
def test_corrupt_newest_checkpoint_falls_back_to_previous(tmp_path, caplog, corrupt):
  state = _state()
  ckpt = checkpointing.Checkpointer(str(tmp_path))
  ckpt.save(10, state, {**META, 'step': 10})
  ckpt.save(20, state, {**META, 'step': 20})
  ckpt.close()
  corrupt(tmp_path / '20')

  fresh = checkpointing.Checkpointer(str(tmp_path))
  with caplog.at_level(logging.WARNING):
    step, arrays, meta = fresh.restore_latest(lambda meta: _abstract(state))
  assert step == 10 and meta['step'] == 10
  _assert_same(arrays, state)
  warnings = [r.getMessage() for r in caplog.records
              if r.levelno == logging.WARNING and 'unreadable' in r.getMessage()]
  assert len(warnings) == 1 and 'step 20' in warnings[0]
  fresh.close()


@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
def test_after_falling_back_the_run_checkpoints_the_steps_it_retrains(tmp_path, caplog):
  """An unreadable newest checkpoint is removed once every host has fallen back past it:
  Orbax refuses saves at or below its latest step, so a kept one would silently skip
  every save (the preemption save included) until training passed it again."""
  from autospace_jax.parallel import DataParallel
  ckpt = checkpointing.Checkpointer(str(tmp_path), async_save=False)
  ckpt.save(10, _state(), {**META, 'step': 10})
  ckpt.save(20, _state(), {**META, 'step': 20})
  ckpt.close()
  _truncate_array_data(tmp_path / '20')

  resumed = checkpointing.Checkpointer(str(tmp_path), async_save=False)
  with caplog.at_level(logging.WARNING):
    step, _, _ = resumed.restore_or_init(_state, DataParallel(), 'test')
  assert step == 10
  assert any('removing' in r.getMessage() and 'step 20' in r.getMessage()
             for r in caplog.records)
  assert resumed.save(15, _state(1), {**META, 'step': 15}, force=True)
  assert list(resumed.all_steps()) == [10, 15]
  resumed.close()
  step, state, meta = checkpointing.Checkpointer(str(tmp_path)).restore_or_init(
      _state, DataParallel(), 'test')
  assert step == 15 and meta['step'] == 15
  _assert_same(state, _state(1))


def test_no_readable_checkpoint_raises_instead_of_starting_afresh(tmp_path, caplog):
  ckpt = checkpointing.Checkpointer(str(tmp_path))
  ckpt.save(1, {'x': jnp.ones(2)}, {})
  ckpt.close()
  fresh = checkpointing.Checkpointer(str(tmp_path))
  wrong = {'x': jax.ShapeDtypeStruct((3,), jnp.float32), 'y': jax.ShapeDtypeStruct(
      (), jnp.float32)}
  with caplog.at_level(logging.WARNING), pytest.raises(checkpointing.CheckpointError,
                                                       match='move the directory'):
    fresh.restore_latest(lambda meta: wrong)
  fresh.close()


@pytest.fixture
def sigterm_handler():
  previous = signal.getsignal(signal.SIGTERM)
  checkpointing.clear_preemption()
  yield
  signal.signal(signal.SIGTERM, previous)
  checkpointing.clear_preemption()


def test_sigterm_sets_the_flag_and_the_process_survives(sigterm_handler):
  calls = []
  checkpointing.install_sigterm_handler(lambda: calls.append(1))
  assert not checkpointing.preemption_requested()
  assert not checkpointing.should_stop()
  os.kill(os.getpid(), signal.SIGTERM)
  assert checkpointing.preemption_requested()
  assert checkpointing.should_stop()
  assert calls == [1]
  checkpointing.clear_preemption()
  assert not checkpointing.should_stop()


def _saved_steps(directory) -> list[int]:
  return sorted(int(p.name) for p in Path(directory).iterdir() if p.name.isdigit())


def test_save_on_schedule_saves_every_n_steps_and_the_last_then_stops_on_sigterm(
    tmp_path, sigterm_handler):
  checkpointing.install_sigterm_handler()
  ckpt = checkpointing.Checkpointer(str(tmp_path), max_to_keep=10, async_save=False)
  records = []
  for step in range(1, 8):
    ckpt.save_on_schedule(step, {'x': jnp.float32(step)},
                          lambda: records.append(step) or {'step': step}, 3, 7)
  assert _saved_steps(tmp_path) == [3, 6, 7]
  assert records == [3, 6, 7]  # the record is built only for a save
  os.kill(os.getpid(), signal.SIGTERM)
  with pytest.raises(checkpointing.Preempted) as preempted:
    ckpt.save_on_schedule(8, {'x': jnp.float32(8)}, lambda: {'step': 8}, 3, 20)
  assert preempted.value.step == 8 and _saved_steps(tmp_path) == [3, 6, 7, 8]
  ckpt.close()



class _PreemptionSync:
  """JAX's preemption sync as one host sees it: a notice sets the sync point to the largest
  step id reported so far + 1, and only the call with exactly that id is told to stop."""

  def __init__(self):
    self.step_ids = []
    self.sync_point = None

  def notice(self):
    self.sync_point = max(self.step_ids) + 1

  def __call__(self, step_id: int) -> bool:
    self.step_ids.append(step_id)
    return step_id == self.sync_point


def test_multihost_preemption_between_two_loops_stops_the_next_one(tmp_path, monkeypatch):
  """A notice that arrives while one loop writes its outputs stops the next loop at its
  first step, although that loop counts its steps from 1 again."""
  sync = _PreemptionSync()
  monkeypatch.setattr(checkpointing, 'jax', types.SimpleNamespace(process_count=lambda: 2))
  monkeypatch.setattr(checkpointing.multihost_utils, 'reached_preemption_sync_point', sync)
  first = checkpointing.Checkpointer(str(tmp_path / 'first'), async_save=False)
  for step in range(1, 4):
    first.save_on_schedule(step, {'x': jnp.float32(step)}, lambda: {'step': step}, 100, 3)
  first.close()
  sync.notice()
  second = checkpointing.Checkpointer(str(tmp_path / 'second'), async_save=False)
  with pytest.raises(checkpointing.Preempted) as preempted:
    for step in range(1, 4):
      second.save_on_schedule(step, {'x': jnp.float32(step)}, lambda: {'step': step}, 100, 3)
  second.close()
  assert preempted.value.step == 1 and _saved_steps(tmp_path / 'second') == [1]
  assert sync.step_ids == sorted(set(sync.step_ids))  # strictly increasing

_LOOP = textwrap.dedent('''
    import sys, time
    import jax, jax.numpy as jnp
    from autospace_jax import checkpointing

    checkpointing.install_sigterm_handler()
    ckpt = checkpointing.Checkpointer(sys.argv[1], max_to_keep=2)
    restored = ckpt.restore_latest(lambda meta: {'x': jax.ShapeDtypeStruct((), jnp.float32)})
    step = 0 if restored is None else restored[0]
    print('start', step, flush=True)
    try:
      while True:
        step += 1
        time.sleep(0.01)
        ckpt.save_on_schedule(step, {'x': jnp.float32(step)}, lambda: {'step': step}, 50, 10**9)
    except checkpointing.Preempted as e:
      print(f'preempted {e.step} {e.directory}', flush=True)
      sys.exit(0)
''')


def test_preempted_loop_saves_its_step_and_stops_cleanly(tmp_path):
  env = {**os.environ, 'PYTHONPATH': str(ROOT), 'JAX_PLATFORMS': 'cpu'}
  proc = subprocess.Popen([sys.executable, '-c', _LOOP, str(tmp_path)], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  assert proc.stdout.readline().split() == ['start', '0']
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=60)
  assert proc.returncode == 0, err
  _, step, directory = out.split()
  ckpt = checkpointing.Checkpointer(directory)
  assert ckpt.latest_step() == int(step)
  _, arrays, meta = ckpt.restore_latest(
      lambda meta: {'x': jax.ShapeDtypeStruct((), jnp.float32)})
  assert meta == {'step': int(step)} and float(arrays['x']) == int(step)
  ckpt.close()


_SHARDED = textwrap.dedent('''
    import sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from autospace_jax import checkpointing

    mesh = jax.make_mesh((4,), ('data',))
    replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))
    x = jax.device_put(jnp.arange(32.0).reshape(8, 4), replicated)
    ckpt = checkpointing.Checkpointer(sys.argv[1])
    ckpt.save(1, {'x': x, 'y': x}, {})
    ckpt.wait()
    target = {'x': jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=split),
              'y': jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated)}
    _, arrays, _ = ckpt.restore_latest(lambda meta: target)
    assert arrays['x'].sharding == split, arrays['x'].sharding
    assert arrays['y'].sharding == replicated, arrays['y'].sharding
    assert len(arrays['x'].addressable_shards) == 4
    assert arrays['x'].addressable_shards[1].data.shape == (2, 4)
    np.testing.assert_array_equal(np.asarray(arrays['x']), np.arange(32.0).reshape(8, 4))
    ckpt.close()
    print('ok')
''')


def test_restore_onto_a_multi_device_sharding(tmp_path):
  env = {**os.environ, 'PYTHONPATH': str(ROOT), 'JAX_PLATFORMS': 'cpu',
         'XLA_FLAGS': '--xla_force_host_platform_device_count=4'}
  result = subprocess.run([sys.executable, '-c', _SHARDED, str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0 and result.stdout.strip() == 'ok', result.stderr[-3000:]


_HOST = textwrap.dedent('''
    import sys, time
    import jax
    jax.distributed.initialize(coordinator_address=f'localhost:{sys.argv[2]}',
                               num_processes=2, process_id=int(sys.argv[1]))
    from autospace_jax import checkpointing

    checkpointing.install_sigterm_handler()
    print('start', flush=True)
    step, deadline = 0, time.time() + 60
    while time.time() < deadline:
      step += 1
      time.sleep(0.02)
      if checkpointing.should_stop():
        print('stop', step, flush=True)
        sys.exit(0)
    sys.exit(1)
''')


@pytest.mark.parametrize('preemption_service', ['true', 'false'])
def test_all_hosts_stop_at_the_same_step_when_one_is_preempted(preemption_service):
  """With JAX's preemption service (default) or an all-gather of the local flags."""
  with socket.socket() as s:
    s.bind(('localhost', 0))
    port = s.getsockname()[1]
  env = {**os.environ, 'PYTHONPATH': str(ROOT), 'JAX_PLATFORMS': 'cpu',
         'JAX_ENABLE_PREEMPTION_SERVICE': preemption_service}
  hosts = [subprocess.Popen([sys.executable, '-c', _HOST, str(i), str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  for host in hosts:
    assert host.stdout.readline().strip() == 'start'
  hosts[1].send_signal(signal.SIGTERM)
  outputs = []
  for host in hosts:
    out, err = host.communicate(timeout=90)
    assert host.returncode == 0, err[-3000:]
    outputs.append([line for line in out.splitlines() if line.startswith('stop')])
  assert len(outputs[0]) == 1 and outputs[0] == outputs[1]


def test_hosts_that_restore_different_steps_stop_instead_of_diverging(monkeypatch):
  steps_by_host = [3, 3]
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  monkeypatch.setattr(checkpointing.multihost_utils, 'process_allgather',
                      lambda x: np.array(steps_by_host))
  checkpointing.check_same_step_on_every_host(3, 'ckpts')
  steps_by_host[1] = 1  # host 1 could not read step 3 and fell back
  with pytest.raises(checkpointing.CheckpointError, match=r'different steps \[3, 1\]'):
    checkpointing.check_same_step_on_every_host(3, 'ckpts')
