"""Multi-process start-up: join a JAX distributed job when, and only when, there is one.

Every entry point calls `maybe_initialize()` before touching a device. On a single host
(a workstation, Colab, one multi-GPU machine) it does nothing. In a multi-host job it calls
`jax.distributed.initialize`, which must run before any JAX computation, so that each
process sees the global device mesh and Orbax can checkpoint across hosts.

The decision is a pure function of the environment, `detect_cluster`, so it can be tested
without starting anything. Clusters it recognises, first match wins:

- `AUTOSPACE_CLUSTER=tpu|slurm|k8s|none` forces a choice. `launch/tpu_vm.sh` sets `tpu`,
  because a TPU VM created with gcloud keeps its topology in the metadata server, not in
  the environment.
- 'explicit': `AUTOSPACE_COORDINATOR` (host:port of process 0), `AUTOSPACE_NUM_PROCESSES`
  > 1 and `AUTOSPACE_PROCESS_ID`, or the same values passed as arguments (GPU clusters,
  `launch/jobset_gpu.yaml`). Every local device stays visible to the process.
- 'tpu': a TPU slice whose hosts JAX reads from the environment (GKE): more than one host
  in `TPU_WORKER_HOSTNAMES` / `TPU_PROCESS_ADDRESSES`, or `MEGASCALE_NUM_SLICES` > 1.
- 'slurm': an `srun` step with `SLURM_NTASKS` > 1 and the variables JAX's Slurm detection
  reads. JAX then gives each process the single GPU numbered `SLURM_LOCALID`.
- 'k8s': an indexed Kubernetes Job or JobSet pod (`JOB_COMPLETION_INDEX`) that names its
  coordinator in `JAX_COORDINATOR_ADDRESS`. JAX reads the process count from the
  Kubernetes API, which needs `jax[k8s]` and a service account allowed to read pods.

For the auto-detected kinds `jax.distributed.initialize()` runs without arguments and JAX's
own cluster detection fills them in.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import jax
from jax.experimental import multihost_utils

COORDINATOR_VAR = 'AUTOSPACE_COORDINATOR'
NUM_PROCESSES_VAR = 'AUTOSPACE_NUM_PROCESSES'
PROCESS_ID_VAR = 'AUTOSPACE_PROCESS_ID'
CLUSTER_VAR = 'AUTOSPACE_CLUSTER'
AUTO_DETECTED = ('tpu', 'slurm', 'k8s')
# What JAX's Slurm detection (jax/_src/clusters/slurm_cluster.py) needs besides SLURM_NTASKS.
_SLURM_VARS = ('SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_PROCID', 'SLURM_LOCALID')


def explicit_settings(environ: Mapping[str, str]) -> tuple[str, int, int] | None:
  """(coordinator, num_processes, process_id) from the AUTOSPACE_* variables.

  None when none of them is set or when they describe a single process. Raises ValueError
  when only some are set or a number does not parse, since silently running
  single-process would leave the other hosts waiting for this one.
  """
  names = (COORDINATOR_VAR, NUM_PROCESSES_VAR, PROCESS_ID_VAR)
  values = [environ.get(name, '').strip() for name in names]
  if not any(values):
    return None
  if not all(values):
    missing = [name for name, value in zip(names, values) if not value]
    raise ValueError(f'Set all of {", ".join(names)}; missing {", ".join(missing)}.')
  coordinator, num_processes, process_id = values[0], int(values[1]), int(values[2])
  if not 0 <= process_id < num_processes:
    raise ValueError(f'{PROCESS_ID_VAR}={process_id} is outside [0, {num_processes}).')
  if num_processes == 1:
    return None
  return coordinator, num_processes, process_id


def _count(value: str | None) -> int:
  return len([part for part in (value or '').split(',') if part.strip()])


def detect_cluster(environ: Mapping[str, str]) -> str | None:
  """Which kind of multi-process job `environ` describes: 'explicit', 'tpu', 'slurm',
  'k8s', or None for a single-process run."""
  forced = environ.get(CLUSTER_VAR, '').strip().lower()
  if forced:
    if forced == 'none':
      return None
    if forced not in AUTO_DETECTED:
      raise ValueError(f'{CLUSTER_VAR}={forced!r}; expected one of {AUTO_DETECTED + ("none",)}.')
    return forced
  if explicit_settings(environ) is not None:
    return 'explicit'
  hosts = environ.get('TPU_PROCESS_ADDRESSES') or environ.get('TPU_WORKER_HOSTNAMES')
  if _count(hosts) > 1 or int(environ.get('MEGASCALE_NUM_SLICES') or 1) > 1:
    return 'tpu'
  if int(environ.get('SLURM_NTASKS') or 1) > 1 and all(v in environ for v in _SLURM_VARS):
    return 'slurm'
  if 'JOB_COMPLETION_INDEX' in environ and environ.get('JAX_COORDINATOR_ADDRESS'):
    return 'k8s'
  return None


def maybe_initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
  """Initialises jax.distributed if this is a multi-process job; True if it did.

  Arguments override the AUTOSPACE_* variables of the same meaning. Must run before any
  JAX computation.
  """
  if jax.distributed.is_initialized():
    return False
  environ = dict(os.environ)
  for name, value in ((COORDINATOR_VAR, coordinator_address),
                      (NUM_PROCESSES_VAR, num_processes), (PROCESS_ID_VAR, process_id)):
    if value is not None:
      environ[name] = str(value)
  cluster = detect_cluster(environ)
  if cluster is None:
    return False
  if cluster == 'explicit':
    coordinator, count, index = explicit_settings(environ)
    logging.info('jax.distributed: process %d of %d, coordinator %s', index, count,
                 coordinator)
    # 'deactivate' keeps a surrounding Slurm or Kubernetes environment from overriding
    # these values or restricting this process to one GPU.
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=count,
                               process_id=index, cluster_detection_method='deactivate')
  else:
    logging.info('jax.distributed: auto-detecting the %s cluster', cluster)
    jax.distributed.initialize()
  return True


def is_main_process() -> bool:
  """True on process 0, the one that writes reports and logs."""
  return jax.process_index() == 0


def sync_processes(name: str) -> None:
  """Return once every process got here (at once with one process): what process 0
  wrote before it, such as a stage's outputs the next stage loads, is then there for
  the others to read."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)
