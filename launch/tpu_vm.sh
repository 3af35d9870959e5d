#!/usr/bin/env bash
# Runs `python -m vit_jax train --distributed FLAGS` on every worker of a Cloud TPU VM slice
# (or of N slices created together as one queued resource).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'USAGE'
Usage: launch/tpu_vm.sh --name NAME --zone ZONE [options] -- VIT_JAX_MAIN_FLAGS...

On a Cloud TPU VM slice (through `gcloud compute tpus tpu-vm`):
  1. creates the slice unless one named NAME exists; with --slices N > 1, creates N slices
     as one queued resource NAME (nodes NAME-0 .. NAME-<N-1>) unless it exists, and waits
     until it is ACTIVE,
  2. copies this repository (tracked files) to every worker and installs it with its `tpu`
     extra, `pip install -e ~/vit_jax[tpu]`: jax with libtpu, in setup.py's jax range
     (--worker=all),
  3. starts `python3 -m vit_jax train VIT_JAX_MAIN_FLAGS... --distributed` on all workers,
     detached (a dropped connection does not stop the run), each logging to ~/vit_jax.log,
  4. streams worker 0's log (of slice 0) until its process ends and exits with its status,
  5. with --delete, deletes the slice (or the queued resource and its slices) afterwards
     (with no flags after --, only deletes).

Options:
  --name NAME               TPU VM name (required)
  --zone ZONE               zone, e.g. us-central2-b (required)
  --project PROJECT         Google Cloud project (default: gcloud's)
  --accelerator-type TYPE   slice type for creation (default v4-32)
  --slices N                slices (default 1); N > 1: a multi-slice queued resource
  --version VERSION         TPU VM runtime image (default tpu-ubuntu2204-base)
  --spot                    create a Spot slice
  --source DIR              repository to copy (default: the one holding this script)
  --no-install              skip copying and installing (already done)
  --delete                  delete the slice when the run ends (or now, without flags)
  --dry-run                 print the commands, one per line, and run nothing
  -h, --help                this help

Example:
  launch/tpu_vm.sh --name vit-h14 --zone us-central2-b --accelerator-type v4-64 -- \
    --config=vit:H/14,imagenet21k,pretrain --workdir=gs://bucket/h14 --config.mesh.fsdp=16
USAGE
}

name=""
zone=""
project=""
accelerator="v4-32"
slices=1
version="tpu-ubuntu2204-base"
spot=0
source_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
install=1
delete=0
dry_run=0
while (($#)); do
  case $1 in
    --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}" ;;
    --name) name=$(value "$1" "${2-}"); shift 2 ;;
    --zone) zone=$(value "$1" "${2-}"); shift 2 ;;
    --project) project=$(value "$1" "${2-}"); shift 2 ;;
    --accelerator-type) accelerator=$(value "$1" "${2-}"); shift 2 ;;
    --slices) slices=$(value "$1" "${2-}"); shift 2 ;;
    --version) version=$(value "$1" "${2-}"); shift 2 ;;
    --source) source_dir=$(value "$1" "${2-}"); shift 2 ;;
    --spot) spot=1; shift ;;
    --no-install) install=0; shift ;;
    --delete) delete=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; break ;;
    *) die "unknown option '$1'; put the vit_jax train flags after --" ;;
  esac
done
flags=("$@")
[[ -n $name ]] || die "--name is required (see --help)"
[[ -n $zone ]] || die "--zone is required (see --help)"
((${#flags[@]} || delete)) || die "no vit_jax train flags after -- (and no --delete)"
positive --slices "$slices"

tpu=(gcloud compute tpus tpu-vm)
where=(--zone="$zone")
[[ -z $project ]] || where+=(--project="$project")
archive="/tmp/vit_jax-$name.tar.gz"
# The TPU VMs: the slice itself, or the queued resource's nodes (named <node prefix>-<i>).
queued=(gcloud compute tpus queued-resources)
nodes=("$name")
if ((slices > 1)); then
  nodes=()
  for ((i = 0; i < slices; i++)); do nodes+=("$name-$i"); done
fi

# Prints (dry run) or runs one command given as words.
step() {
  if ((dry_run)); then
    quote "$@"
    echo
  else
    "$@"
  fi
}

# Prints (dry run) or runs one shell command line.
step_line() {
  if ((dry_run)); then
    echo "$1"
  else
    bash -c "$1"
  fi
}

# Runs shell line $1 on all workers of every slice.
ssh_all() {
  local node
  for node in "${nodes[@]}"; do
    step "${tpu[@]}" ssh "$node" "${where[@]}" --worker=all --command="$1"
  done
}

if ((${#flags[@]})); then
  if ((slices > 1)); then
    create=("${queued[@]}" create "$name" --node-count="$slices" --node-prefix="$name"
      --accelerator-type="$accelerator" --runtime-version="$version" "${where[@]}")
    ((spot == 0)) || create+=(--spot)
    step_line "$(quote "${queued[@]}" describe "$name" "${where[@]}") > /dev/null 2>&1 || $(quote "${create[@]}")"
    # A queued resource is created asynchronously: wait until its slices are up.
    state="$(quote "${queued[@]}" describe "$name" "${where[@]}" --format='value(state.state)')"
    step_line "until s=\$($state) && [ \"\$s\" = ACTIVE ]; do case \$s in FAILED|SUSPENDED) echo \"queued resource $name: \$s\" >&2; exit 1;; esac; sleep 30; done"
  else
    create=("${tpu[@]}" create "$name" "${where[@]}" --accelerator-type="$accelerator" --version="$version")
    ((spot == 0)) || create+=(--spot)
    step_line "$(quote "${tpu[@]}" describe "$name" "${where[@]}") > /dev/null 2>&1 || $(quote "${create[@]}")"
  fi
  if ((install)); then
    step_line "git -C $(quote "$source_dir") ls-files -z | tar -C $(quote "$source_dir") --null -T - -czf $(quote "$archive")"
    for node in "${nodes[@]}"; do
      step "${tpu[@]}" scp "$archive" "$node:vit_jax.tar.gz" "${where[@]}" --worker=all
    done
    ssh_all "rm -rf ~/vit_jax && mkdir -p ~/vit_jax && tar -xzf ~/vit_jax.tar.gz -C ~/vit_jax && pip install -q -e \"\$HOME/vit_jax[tpu]\""
  fi
  run="cd ~/vit_jax && $(quote python3 "${MAIN[@]}" "${flags[@]}" --distributed)"
  # Paths under ~ are expanded by the workers' shells.
  ssh_all "rm -f ~/vit_jax.status ~/vit_jax.log; nohup bash -c $(quote_arg "$run > ~/vit_jax.log 2>&1; echo \$? > ~/vit_jax.status") > /dev/null 2>&1 < /dev/null &"
  # Worker 0 (of slice 0) is process 0: follow its log until it writes its exit status.
  follow="until [ -e ~/vit_jax.log ]; do sleep 1; done; tail -n +1 -f ~/vit_jax.log & until [ -s ~/vit_jax.status ]; do sleep 5; done; sleep 1; kill %1; exit \$(cat ~/vit_jax.status)"
  status=0
  step "${tpu[@]}" ssh "${nodes[0]}" "${where[@]}" --worker=0 --command="$follow" || status=$?
fi
if ((delete && slices > 1)); then
  step "${queued[@]}" delete "$name" "${where[@]}" --force --quiet  # --force: its slices too
elif ((delete)); then
  step "${tpu[@]}" delete "$name" "${where[@]}" --quiet
fi
exit "${status:-0}"
