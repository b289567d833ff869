"""Tests of the multi-process start-up decision; nothing here joins a real cluster.

`detect_cluster` and `explicit_settings` are pure functions of an environment mapping, so
each cluster's variables are checked directly. `maybe_initialize` is checked only on the
paths that return before `jax.distributed.initialize` would run, or with it replaced.
"""

from __future__ import annotations

import jax
import pytest

from autospace_jax import distributed

EXPLICIT = {
    'AUTOSPACE_COORDINATOR': '10.0.0.1:1234',
    'AUTOSPACE_NUM_PROCESSES': '4',
    'AUTOSPACE_PROCESS_ID': '2',
}
SLURM = {
    'SLURM_JOB_ID': '123',
    'SLURM_STEP_NODELIST': 'node[001-004]',
    'SLURM_NTASKS': '4',
    'SLURM_PROCID': '1',
    'SLURM_LOCALID': '0',
}
K8S = {
    'KUBERNETES_SERVICE_HOST': '10.1.0.1',
    'JOB_COMPLETION_INDEX': '3',
    'JAX_COORDINATOR_ADDRESS': 'train-workers-0-0.train:1234',
}


@pytest.mark.parametrize('environ', [
    {},
    {'HOME': '/root', 'COLAB_RELEASE_TAG': 'release-colab'},
    {'TPU_WORKER_HOSTNAMES': 'localhost', 'TPU_WORKER_ID': '0'},
    {'MEGASCALE_NUM_SLICES': '1', 'TPU_WORKER_HOSTNAMES': 'host-0'},
    {**SLURM, 'SLURM_NTASKS': '1', 'SLURM_PROCID': '0'},
    {k: v for k, v in SLURM.items() if k != 'SLURM_STEP_NODELIST'},  # sbatch, not srun
    {'KUBERNETES_SERVICE_HOST': '10.1.0.1', 'JOB_COMPLETION_INDEX': '0'},
    {**EXPLICIT, 'AUTOSPACE_NUM_PROCESSES': '1', 'AUTOSPACE_PROCESS_ID': '0'},
    {**EXPLICIT, 'AUTOSPACE_CLUSTER': 'none'},
])
def test_single_process_environments(environ):
  assert distributed.detect_cluster(environ) is None


@pytest.mark.parametrize('environ, expected', [
    (EXPLICIT, 'explicit'),
    ({'TPU_WORKER_HOSTNAMES': 'h0,h1,h2,h3', 'TPU_WORKER_ID': '1'}, 'tpu'),
    ({'TPU_PROCESS_ADDRESSES': 'h0:8476,h1:8476', 'TPU_WORKER_ID': '0'}, 'tpu'),
    ({'TPU_WORKER_HOSTNAMES': 'h0', 'MEGASCALE_NUM_SLICES': '2'}, 'tpu'),
    (SLURM, 'slurm'),
    (K8S, 'k8s'),
    ({'AUTOSPACE_CLUSTER': 'tpu'}, 'tpu'),
    ({'AUTOSPACE_CLUSTER': ' Slurm '}, 'slurm'),
    # Explicit values win over the scheduler they run under; a forced choice wins over all.
    ({**SLURM, **EXPLICIT}, 'explicit'),
    ({**K8S, **EXPLICIT}, 'explicit'),
    ({**K8S, 'TPU_WORKER_HOSTNAMES': 'h0,h1'}, 'tpu'),
    ({**EXPLICIT, 'AUTOSPACE_CLUSTER': 'k8s'}, 'k8s'),
])
def test_multi_process_environments(environ, expected):
  assert distributed.detect_cluster(environ) == expected


def test_explicit_settings_parse():
  assert distributed.explicit_settings(EXPLICIT) == ('10.0.0.1:1234', 4, 2)
  assert distributed.explicit_settings({}) is None


@pytest.mark.parametrize('environ', [
    {'AUTOSPACE_COORDINATOR': '10.0.0.1:1234'},
    {**EXPLICIT, 'AUTOSPACE_PROCESS_ID': ''},
    {**EXPLICIT, 'AUTOSPACE_PROCESS_ID': '4'},
    {**EXPLICIT, 'AUTOSPACE_NUM_PROCESSES': 'four'},
    {'AUTOSPACE_CLUSTER': 'mpi'},
])
def test_misconfiguration_raises(environ):
  with pytest.raises(ValueError):
    distributed.detect_cluster(environ)


def test_maybe_initialize_single_host_does_nothing(monkeypatch):
  for name in (*EXPLICIT, *SLURM, *K8S, 'TPU_WORKER_HOSTNAMES', 'TPU_PROCESS_ADDRESSES',
               'MEGASCALE_NUM_SLICES', 'AUTOSPACE_CLUSTER'):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setattr(jax.distributed, 'initialize', _fail)
  assert not distributed.maybe_initialize()
  assert not distributed.maybe_initialize('10.0.0.1:1234', 1, 0)


def test_maybe_initialize_explicit_arguments(monkeypatch):
  for name in (*EXPLICIT, 'AUTOSPACE_CLUSTER'):
    monkeypatch.delenv(name, raising=False)
  calls = []
  monkeypatch.setattr(jax.distributed, 'initialize', lambda **kw: calls.append(kw))
  assert distributed.maybe_initialize('10.0.0.1:1234', 2, 1)
  assert calls == [dict(coordinator_address='10.0.0.1:1234', num_processes=2,
                        process_id=1, cluster_detection_method='deactivate')]


def test_maybe_initialize_auto_detected_passes_no_arguments(monkeypatch):
  monkeypatch.setenv('AUTOSPACE_CLUSTER', 'tpu')
  calls = []
  monkeypatch.setattr(jax.distributed, 'initialize', lambda *a, **kw: calls.append((a, kw)))
  assert distributed.maybe_initialize()
  assert calls == [((), {})]


def test_maybe_initialize_skips_when_already_initialised(monkeypatch):
  monkeypatch.setenv('AUTOSPACE_CLUSTER', 'tpu')
  monkeypatch.setattr(jax.distributed, 'is_initialized', lambda: True)
  monkeypatch.setattr(jax.distributed, 'initialize', _fail)
  assert not distributed.maybe_initialize()


def test_is_main_process_on_one_host():
  assert distributed.is_main_process()


def _fail(*args, **kwargs):
  raise AssertionError('jax.distributed.initialize must not be called')
