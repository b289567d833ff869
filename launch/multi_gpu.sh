#!/usr/bin/env bash
# Runs autospace_jax on one machine with several GPUs: a single process sees every GPU,
# and the training step is data-parallel over a mesh of all of them (the batch is split
# across GPUs, parameters are replicated). No jax.distributed set-up is needed.
#
# --dry-run prints the command, quoted so it can be pasted into a shell, and runs nothing.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/multi_gpu.sh --workdir DIR [options] [-- extra flags for autospace_jax.main]

Options (environment variable in brackets):
  --workdir DIR       run directory, local or gs:// [AUTOSPACE_WORKDIR] (required)
  --data-dir DIR      TFDS data_dir holding imagenet2012 [AUTOSPACE_DATA_DIR]
                      (default: the config's)
  --config FILE       config file [AUTOSPACE_CONFIG] (default: configs/imagenet.py)
  --gpus LIST         GPUs to use, e.g. 0,1,2,3 [CUDA_VISIBLE_DEVICES] (default: all)
  --python PATH       interpreter [AUTOSPACE_PYTHON_BIN]
                      (default: .venv/bin/python if present, else python3)
  --dry-run           print the command instead of running it
  -h, --help          show this help

The global batch size in the config is split evenly over the GPUs, so it must be a
multiple of their number. Arguments after -- go to autospace_jax.main unchanged.
EOF
}

die() {
  echo "multi_gpu.sh: $*" >&2
  exit 2
}

# The value of option $1, which must be present as $2.
need_value() {
  [[ $# -ge 2 && -n $2 ]] || die "$1 needs a value"
}

cd "$(dirname "${BASH_SOURCE[0]}")/.."

workdir=${AUTOSPACE_WORKDIR:-}
data_dir=${AUTOSPACE_DATA_DIR:-}
config=${AUTOSPACE_CONFIG:-configs/imagenet.py}
gpus=${CUDA_VISIBLE_DEVICES:-}
python_bin=${AUTOSPACE_PYTHON_BIN:-}
dry_run=0
extra=()

while [[ $# -gt 0 ]]; do
  # --option=value, as the main command's own flags are written, is --option value.
  [[ $1 == --?*=* ]] && set -- "${1%%=*}" "${1#*=}" "${@:2}"
  case $1 in
    --workdir) need_value "$@"; workdir=$2; shift 2 ;;
    --data-dir) need_value "$@"; data_dir=$2; shift 2 ;;
    --config) need_value "$@"; config=$2; shift 2 ;;
    --gpus) need_value "$@"; gpus=$2; shift 2 ;;
    --python) need_value "$@"; python_bin=$2; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; extra=("$@"); break ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done

[[ -n $workdir ]] || die "--workdir is required"
if [[ -z $python_bin ]]; then
  if [[ -x .venv/bin/python ]]; then python_bin=.venv/bin/python; else python_bin=python3; fi
fi

# AUTOSPACE_CLUSTER=none: one process even inside a multi-task Slurm or Kubernetes job.
cmd=(env AUTOSPACE_CLUSTER=none)
[[ -n $gpus ]] && cmd+=(CUDA_VISIBLE_DEVICES="$gpus")
cmd+=("$python_bin" -m autospace_jax.main --config="$config" --workdir="$workdir")
[[ -n $data_dir ]] && cmd+=(--config.data.data_dir="$data_dir")
cmd+=("${extra[@]}")

printf '+'
printf ' %q' "${cmd[@]}"
printf '\n'
if [[ $dry_run == 0 ]]; then
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader
  fi
  exec "${cmd[@]}"
fi
