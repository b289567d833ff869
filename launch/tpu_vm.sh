#!/usr/bin/env bash
# Runs autospace_jax on a Cloud TPU VM slice: create the slice, copy this checkout to every
# worker, install it there, and start the same main command on every worker at once (one
# JAX process per host; autospace_jax/distributed.py joins them into one job).
#
# Every option has an environment variable of the same meaning; flags win. --dry-run
# prints each command, quoted so it can be pasted into a shell, and runs none.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/tpu_vm.sh [options] [-- extra flags for autospace_jax.main]

Creates a Cloud TPU VM slice, copies the code to every worker, installs it, and starts
  python -m autospace_jax.main --config=CONFIG --workdir=WORKDIR --config.data.data_dir=DATA_DIR
on all workers. Training runs detached; its output goes to ~/autospace/train.log on
each worker.

Options (environment variable in brackets):
  --name NAME            TPU VM name [AUTOSPACE_TPU_NAME] (default: autospace)
  --zone ZONE            zone [AUTOSPACE_TPU_ZONE] (default: us-central2-b)
  --type TYPE            accelerator type, e.g. v4-32, v5litepod-16 [AUTOSPACE_TPU_TYPE]
                         (default: v4-32)
  --version VERSION      TPU runtime version [AUTOSPACE_TPU_VERSION]
                         (default: tpu-ubuntu2204-base; v5e: v2-alpha-tpuv5-lite)
  --project PROJECT      GCP project [AUTOSPACE_GCP_PROJECT] (default: gcloud's)
  --bucket BUCKET        GCS bucket without gs:// [AUTOSPACE_BUCKET] (required unless
                         both --workdir and --data-dir are given)
  --workdir URL          run directory [AUTOSPACE_WORKDIR]
                         (default: gs://BUCKET/autospace/NAME)
  --data-dir URL         TFDS data_dir holding imagenet2012 [AUTOSPACE_DATA_DIR]
                         (default: gs://BUCKET/tensorflow_datasets)
  --config FILE          config file [AUTOSPACE_CONFIG] (default: configs/imagenet.py)
  --python VERSION       Python for the workers' venv, fetched by uv [AUTOSPACE_PYTHON]
                         (default: 3.12)
  --spot                 create a Spot slice [AUTOSPACE_TPU_SPOT=1]
  --preemptible          create a preemptible slice [AUTOSPACE_TPU_PREEMPTIBLE=1]
  --skip-create          use an existing slice of that name
  --skip-install         skip copying and installing (code already there)
  --dry-run              print the commands instead of running them
  -h, --help             show this help

Arguments after -- go to autospace_jax.main unchanged, e.g.
  launch/tpu_vm.sh --bucket my-bucket -- --config.search.batch_size=1024
EOF
}

name=${AUTOSPACE_TPU_NAME:-autospace}
zone=${AUTOSPACE_TPU_ZONE:-us-central2-b}
accelerator=${AUTOSPACE_TPU_TYPE:-v4-32}
version=${AUTOSPACE_TPU_VERSION:-tpu-ubuntu2204-base}
project=${AUTOSPACE_GCP_PROJECT:-}
bucket=${AUTOSPACE_BUCKET:-}
workdir=${AUTOSPACE_WORKDIR:-}
data_dir=${AUTOSPACE_DATA_DIR:-}
config=${AUTOSPACE_CONFIG:-configs/imagenet.py}
python_version=${AUTOSPACE_PYTHON:-3.12}
spot=${AUTOSPACE_TPU_SPOT:-0}
preemptible=${AUTOSPACE_TPU_PREEMPTIBLE:-0}
skip_create=0
skip_install=0
dry_run=0
extra=()

die() {
  echo "tpu_vm.sh: $*" >&2
  exit 2
}

# The value of option $1, which must be present as $2.
need_value() {
  [[ $# -ge 2 && -n $2 ]] || die "$1 needs a value"
}

while [[ $# -gt 0 ]]; do
  # --option=value, as the main command's own flags are written, is --option value.
  [[ $1 == --?*=* ]] && set -- "${1%%=*}" "${1#*=}" "${@:2}"
  case $1 in
    --name) need_value "$@"; name=$2; shift 2 ;;
    --zone) need_value "$@"; zone=$2; shift 2 ;;
    --type) need_value "$@"; accelerator=$2; shift 2 ;;
    --version) need_value "$@"; version=$2; shift 2 ;;
    --project) need_value "$@"; project=$2; shift 2 ;;
    --bucket) need_value "$@"; bucket=$2; shift 2 ;;
    --workdir) need_value "$@"; workdir=$2; shift 2 ;;
    --data-dir) need_value "$@"; data_dir=$2; shift 2 ;;
    --config) need_value "$@"; config=$2; shift 2 ;;
    --python) need_value "$@"; python_version=$2; shift 2 ;;
    --spot) spot=1; shift ;;
    --preemptible) preemptible=1; shift ;;
    --skip-create) skip_create=1; shift ;;
    --skip-install) skip_install=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; extra=("$@"); break ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done

bucket=${bucket#gs://}
bucket=${bucket%/}
if [[ -z $workdir || -z $data_dir ]]; then
  [[ -n $bucket ]] || die "--bucket is required unless --workdir and --data-dir are given"
fi
workdir=${workdir:-gs://$bucket/autospace/$name}
data_dir=${data_dir:-gs://$bucket/tensorflow_datasets}
[[ $spot == 1 && $preemptible == 1 ]] && die "choose one of --spot and --preemptible"

# Commands run from the repository root so the copied paths are short and relative.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ $dry_run == 0 ]]; then
  [[ -f $config ]] || die "config file $config not found under $(pwd)"
  command -v gcloud >/dev/null || die "gcloud not found; install the Google Cloud CLI"
fi

# Prints the command, shell-quoted; runs it unless this is a dry run.
run() {
  printf '+'
  printf ' %q' "$@"
  printf '\n'
  if [[ $dry_run == 0 ]]; then
    "$@"
  fi
}

# The arguments as one shell-quoted string, for a command that runs on the workers.
quote() {
  local out
  printf -v out ' %q' "$@"
  printf '%s' "${out# }"
}

common=(--zone="$zone")
[[ -n $project ]] && common+=(--project="$project")
ssh_all=(gcloud compute tpus tpu-vm ssh "$name" "${common[@]}" --worker=all)
remote_dir=autospace
venv=\~/autospace_venv

if [[ $skip_create == 0 ]]; then
  create=(gcloud compute tpus tpu-vm create "$name" "${common[@]}"
    --accelerator-type="$accelerator" --version="$version")
  [[ $spot == 1 ]] && create+=(--spot)
  [[ $preemptible == 1 ]] && create+=(--preemptible)
  run "${create[@]}"
fi

if [[ $skip_install == 0 ]]; then
  sources=()
  for path in pyproject.toml setup.py requirements.txt README.md autospace_jax configs reference; do
    [[ -e $path ]] && sources+=("$path")
  done
  run "${ssh_all[@]}" --command="mkdir -p $remote_dir"
  run gcloud compute tpus tpu-vm scp "${common[@]}" --worker=all --recurse \
    "${sources[@]}" "$name:$remote_dir/"
  # uv brings a Python new enough for current JAX (TPU images ship 3.10). The data extra
  # brings TensorFlow and TFDS: ImageNet's input pipeline and the gs:// backend of epath.
  install="python3 -m pip install --quiet --user uv"
  install+=" && ~/.local/bin/uv venv --seed --python $(quote "$python_version") $venv"
  install+=" && cd $remote_dir && $venv/bin/pip install --quiet -e '.[data]' 'jax[tpu]'"
  install+=" -f https://storage.googleapis.com/jax-releases/libtpu_releases.html"
  run "${ssh_all[@]}" --command="$install"
fi

main=(python -m autospace_jax.main --config="$config" --workdir="$workdir"
  --config.data.data_dir="$data_dir" "${extra[@]}")
# AUTOSPACE_CLUSTER=tpu: a gcloud-created slice keeps its topology in the metadata
# server, so maybe_initialize() is told to let JAX detect it.
start="cd $remote_dir && AUTOSPACE_CLUSTER=tpu nohup $venv/bin/$(quote "${main[@]}")"
start+=" > train.log 2>&1 < /dev/null &"
run "${ssh_all[@]}" --command="$start"

if [[ $dry_run == 0 ]]; then
  echo "Started on every worker of $name. Follow process 0 with:"
  quote "${ssh_all[@]/--worker=all/--worker=0}" --command="tail -f $remote_dir/train.log"
  echo
fi
