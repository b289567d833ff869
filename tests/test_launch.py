"""Tests of the launch recipes in launch/, without a cloud account.

The shell launchers run with --dry-run and their printed commands are parsed back with
shlex, which also checks that the quoting round-trips. Scripts go through shellcheck when
it is installed, and the Kubernetes manifests are checked for the fields that make a
multi-host job work.
"""

from __future__ import annotations

import math
import pathlib
import re
import shlex
import shutil
import subprocess
import tomllib

import pytest

LAUNCH = pathlib.Path(__file__).resolve().parent.parent / 'launch'


def _dry_run(script: str, *args: str) -> list[list[str]]:
  """The commands `script --dry-run args` prints, each split into its arguments."""
  result = subprocess.run(['bash', str(LAUNCH / script), '--dry-run', *args],
                          capture_output=True, text=True, check=True, timeout=60)
  lines = [line for line in result.stdout.splitlines() if line.startswith('+ ')]
  return [shlex.split(line[2:]) for line in lines]


def _option(argv: list[str], name: str) -> str:
  [value] = [arg.split('=', 1)[1] for arg in argv if arg.startswith(name + '=')]
  return value


def _installed_extras(command: str) -> set[str]:
  """The extras of this package that the `pip install -e .[...]` in `command` installs."""
  [words] = [words for words in map(shlex.split, command.split('&&')) if '-e' in words]
  target = words[words.index('-e') + 1]
  match = re.fullmatch(r'\.(?:\[(.*)\])?', target)
  assert match, target
  return set(filter(None, (match[1] or '').split(',')))


def _tfds_extras() -> set[str]:
  """The extras of pyproject.toml that bring TFDS (ImageNet's input pipeline)."""
  pyproject = tomllib.loads((LAUNCH.parent / 'pyproject.toml').read_text())
  extras = pyproject['project']['optional-dependencies']
  return {name for name, requirements in extras.items()
          if any(r.startswith('tensorflow-datasets') for r in requirements)}


def test_tpu_vm_dry_run_commands():
  commands = _dry_run('tpu_vm.sh', '--name', 'nas', '--zone', 'us-central2-b', '--type',
                      'v4-32', '--bucket', 'gs://my-bucket/', '--project', 'proj', '--spot',
                      '--', '--config.search.note=two words')
  create, mkdir, scp, install, start = commands
  assert create[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'create', 'nas']
  assert {'--zone=us-central2-b', '--accelerator-type=v4-32', '--project=proj',
          '--spot'} <= set(create)
  assert _option(create, '--version')
  assert scp[:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp']
  assert {'--recurse', '--worker=all', 'autospace_jax'} <= set(scp)
  assert scp[-1].startswith('nas:')
  for ssh in (mkdir, install, start):
    assert ssh[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'nas']
    assert '--worker=all' in ssh
  setup = _option(install, '--command')
  assert 'pip install' in setup and 'jax[tpu]' in setup
  assert _installed_extras(setup) & _tfds_extras()
  assert 'libtpu_releases' in setup
  remote = shlex.split(_option(start, '--command'))
  main = remote[remote.index('-m') - 1:remote.index('>')]
  assert main[1:3] == ['-m', 'autospace_jax.main']
  assert main[3:] == ['--config=configs/imagenet.py',
                      '--workdir=gs://my-bucket/autospace/nas',
                      '--config.data.data_dir=gs://my-bucket/tensorflow_datasets',
                      '--config.search.note=two words']
  assert 'AUTOSPACE_CLUSTER=tpu' in remote


def test_tpu_vm_skips_and_requires_a_bucket():
  commands = _dry_run('tpu_vm.sh', '--skip-create', '--skip-install', '--workdir=gs://b/run',
                      '--data-dir', 'gs://b/tfds')
  [start] = commands
  assert '--worker=all' in start and 'autospace_jax.main' in _option(start, '--command')
  result = subprocess.run(['bash', str(LAUNCH / 'tpu_vm.sh'), '--dry-run'],
                          capture_output=True, text=True, timeout=60)
  assert result.returncode != 0 and '--bucket' in result.stderr


@pytest.mark.parametrize('options', [('--workdir', '/tmp/run dir', '--gpus', '0,1'),
                                     ('--workdir=/tmp/run dir', '--gpus=0,1')])
def test_multi_gpu_dry_run_command(options):
  [command] = _dry_run('multi_gpu.sh', *options, '--', '--config.x=1')
  assert 'CUDA_VISIBLE_DEVICES=0,1' in command
  assert 'AUTOSPACE_CLUSTER=none' in command
  start = command.index('-m') - 1
  assert command[start + 1:] == ['-m', 'autospace_jax.main', '--config=configs/imagenet.py',
                                 '--workdir=/tmp/run dir', '--config.x=1']


def test_dockerfile_installs_the_package_with_its_data_pipeline():
  text = (LAUNCH / 'Dockerfile').read_text().replace('\\\n', ' ')
  [install] = [line.removeprefix('RUN ') for line in text.splitlines()
               if line.startswith('RUN ') and 'pip install' in line]
  assert _installed_extras(install) & _tfds_extras()
  assert 'jax[${JAX_EXTRA}]' in shlex.split(install)


@pytest.mark.parametrize('script', ['tpu_vm.sh', 'multi_gpu.sh'])
def test_help(script):
  result = subprocess.run(['bash', str(LAUNCH / script), '--help'], capture_output=True,
                          text=True, check=True, timeout=60)
  assert 'Usage:' in result.stdout and '--dry-run' in result.stdout


def test_shellcheck():
  if shutil.which('shellcheck') is None:
    pytest.skip('shellcheck is not installed (apt-get install shellcheck)')
  scripts = sorted(str(path) for path in LAUNCH.glob('*.sh'))
  result = subprocess.run(['shellcheck', *scripts], capture_output=True, text=True,
                          timeout=60)
  assert result.returncode == 0, result.stdout


def _pod_spec(path: str) -> tuple[dict, dict, dict]:
  """(job spec, pod spec, container) of the only replicated job in a JobSet manifest."""
  yaml = pytest.importorskip('yaml', reason='PyYAML is needed to parse the manifests')
  jobset = yaml.safe_load((LAUNCH / path).read_text())
  assert jobset['apiVersion'].startswith('jobset.x-k8s.io/')
  assert jobset['kind'] == 'JobSet'
  [replicated] = jobset['spec']['replicatedJobs']
  job = replicated['template']['spec']
  pod = job['template']['spec']
  [container] = pod['containers']
  assert job['parallelism'] == job['completions'] >= 2
  assert job['completionMode'] == 'Indexed'
  assert container['command'][:3] == ['python', '-m', 'autospace_jax.main']
  assert '--config=configs/imagenet.py' in container['command']
  return jobset, job, container


def test_jobset_tpu_manifest():
  _, job, container = _pod_spec('jobset_tpu.yaml')
  selector = job['template']['spec']['nodeSelector']
  assert selector['cloud.google.com/gke-tpu-accelerator'].startswith('tpu-')
  assert 'cloud.google.com/gke-tpu-topology' in selector
  chips = container['resources']['limits']['google.com/tpu']
  assert container['resources']['requests']['google.com/tpu'] == chips
  topology = [int(n) for n in selector['cloud.google.com/gke-tpu-topology'].split('x')]
  assert chips * job['parallelism'] == math.prod(topology)


def test_jobset_gpu_manifest():
  jobset, job, container = _pod_spec('jobset_gpu.yaml')
  assert container['resources']['limits']['nvidia.com/gpu'] >= 1
  env = {item['name']: item for item in container['env']}
  coordinator = env['AUTOSPACE_COORDINATOR']['value']
  name = jobset['metadata']['name']
  job_name = jobset['spec']['replicatedJobs'][0]['name']
  host, port = coordinator.rsplit(':', 1)
  assert host == f'{name}-{job_name}-0-0.{name}'
  assert int(port) in [p['containerPort'] for p in container['ports']]
  assert int(env['AUTOSPACE_NUM_PROCESSES']['value']) == job['parallelism']
  field = env['AUTOSPACE_PROCESS_ID']['valueFrom']['fieldRef']['fieldPath']
  assert 'job-completion-index' in field
  assert jobset['spec']['network']['enableDNSHostnames'] is True


@pytest.mark.parametrize('manifest', ['jobset_tpu.yaml', 'jobset_gpu.yaml'])
def test_jobset_restarts_a_preempted_run_without_using_up_its_restarts(manifest):
  """The exit status `main` gives a preemption (and an eviction) fails the Job through
  its pod failure policy, which the JobSet answers with an uncounted restart."""
  from autospace_jax.main import PREEMPTED_EXIT_CODE  # noqa: PLC0415 -- defines flags
  jobset, job, container = _pod_spec(manifest)
  pod_rules = job['podFailurePolicy']['rules']
  assert {'action': 'FailJob', 'onExitCodes': {
      'containerName': container['name'], 'operator': 'In',
      'values': [PREEMPTED_EXIT_CODE]}} in pod_rules
  assert any(rule['action'] == 'FailJob' and {'type': 'DisruptionTarget', 'status': 'True'}
             in rule.get('onPodConditions', []) for rule in pod_rules)
  assert job['template']['spec']['restartPolicy'] == 'Never'  # podFailurePolicy needs it
  [rule] = [r for r in jobset['spec']['failurePolicy']['rules']
            if 'PodFailurePolicy' in r.get('onJobFailureReasons', [])]
  assert rule['action'] == 'RestartJobSetAndIgnoreMaxRestarts'
