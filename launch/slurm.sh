#!/usr/bin/env bash
# Submits `python -m vit_jax train FLAGS` as a multi-node SLURM job, one process per GPU or per
# node, joined through jax.distributed.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'USAGE'
Usage: launch/slurm.sh [options] -- VIT_JAX_MAIN_FLAGS...

Writes an sbatch script and submits it. Inside the job, srun starts one process per GPU
(or per node with --per-node); process 0 runs on the first node of SLURM_JOB_NODELIST, whose
address is the coordinator, and each process passes
  --coordinator_address=<first node>:PORT --num_processes=<tasks> --process_id=$SLURM_PROCID
(or --distributed with --auto, letting jax.distributed read SLURM's environment).

Options:
  --nodes N              nodes (default 1)
  --gpus-per-node G      GPUs per node (default 8)
  --per-node             one process per node that drives all its GPUs (default: per GPU)
  --partition NAME       SLURM partition
  --time LIMIT           time limit, e.g. 24:00:00
  --account NAME         account to charge
  --job-name NAME        job name (default vit_jax)
  --port PORT            coordinator port on the first node (default 12355)
  --auto                 pass --distributed instead of explicit process flags
  --setup CMD            shell line run first in the job (e.g. 'source ~/venv/bin/activate')
  --install EXTRA        cuda12, cuda13 or none (default): first install the repository into
                         the job's environment (after --setup, once, from the first node;
                         a shared file system) with `pip install -e SOURCE[EXTRA]`
  --source DIR           repository to install (default: the one holding this script)
  --python PY            Python interpreter on the nodes (default python3)
  --script PATH          where to write the sbatch script (default ./<job name>.sbatch)
  --dry-run              print the commands (writing the script, then sbatch) and run nothing
  -h, --help             this help

Example:
  launch/slurm.sh --nodes 4 --partition gpu --time 48:00:00 -- \
    --config=vit:B/16,imagenet2012,pretrain --workdir=/ckpt/b16
USAGE
}

nodes=1
gpus=8
per_node=0
partition=""
time_limit=""
account=""
job_name="vit_jax"
port=12355
auto=0
setup=""
python="python3"
install="none"
source_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
script=""
dry_run=0
while (($#)); do
  case $1 in
    --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}" ;;
    --nodes) nodes=$(value "$1" "${2-}"); shift 2 ;;
    --gpus-per-node) gpus=$(value "$1" "${2-}"); shift 2 ;;
    --partition) partition=$(value "$1" "${2-}"); shift 2 ;;
    --time) time_limit=$(value "$1" "${2-}"); shift 2 ;;
    --account) account=$(value "$1" "${2-}"); shift 2 ;;
    --job-name) job_name=$(value "$1" "${2-}"); shift 2 ;;
    --port) port=$(value "$1" "${2-}"); shift 2 ;;
    --setup) setup=$(value "$1" "${2-}"); shift 2 ;;
    --python) python=$(value "$1" "${2-}"); shift 2 ;;
    --install) install=$(value "$1" "${2-}"); shift 2 ;;
    --source) source_dir=$(value "$1" "${2-}"); shift 2 ;;
    --script) script=$(value "$1" "${2-}"); shift 2 ;;
    --per-node) per_node=1; shift ;;
    --auto) auto=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; break ;;
    *) die "unknown option '$1'; put the vit_jax train flags after --" ;;
  esac
done
flags=("$@")
((${#flags[@]})) || die "no vit_jax train flags after -- (see --help)"
positive --nodes "$nodes"
positive --gpus-per-node "$gpus"
positive --port "$port"
case $install in
  cuda12 | cuda13 | none) ;;
  *) die "--install must be cuda12, cuda13 or none, got '$install'" ;;
esac
script=${script:-./$job_name.sbatch}

if ((per_node)); then
  tasks_per_node=1
  resources="#SBATCH --gpus-per-node=$gpus"
else
  tasks_per_node=$gpus
  resources="#SBATCH --gpus-per-task=1"
fi
num_processes=$((nodes * tasks_per_node))

# The per-task command: SLURM_PROCID and the coordinator are read inside each task.
main=$(quote "$python" "${MAIN[@]}" "${flags[@]}")
if ((auto)); then
  task="exec $main --distributed"
else
  task="exec $main --coordinator_address=\"\$COORDINATOR\" --num_processes=$num_processes --process_id=\"\$SLURM_PROCID\""
fi

sbatch_script() {
  echo "#!/bin/bash"
  echo "#SBATCH --job-name=$job_name"
  echo "#SBATCH --nodes=$nodes"
  echo "#SBATCH --ntasks-per-node=$tasks_per_node"
  echo "$resources"
  [[ -z $partition ]] || echo "#SBATCH --partition=$partition"
  [[ -z $time_limit ]] || echo "#SBATCH --time=$time_limit"
  [[ -z $account ]] || echo "#SBATCH --account=$account"
  echo "#SBATCH --output=vit_jax_%j.log"
  echo "set -euo pipefail"
  [[ -z $setup ]] || echo "$setup"
  if [[ $install != none ]]; then
    echo "# vit_jax[$install]: jax with its CUDA plugin, in setup.py's jax range."
    quote "$python" -m pip install -q -e "$source_dir[$install]"
    echo
  fi
  echo "# Process 0 runs on the first node; its address is the coordinator's."
  echo "first_node=\$(scontrol show hostnames \"\$SLURM_JOB_NODELIST\" | sed -n 1p)"
  echo "export COORDINATOR=\"\$first_node:$port\""
  echo "srun --kill-on-bad-exit=1 bash -c $(quote_arg "$task")"
}

if ((dry_run)); then
  echo "cat > $(quote "$script") <<'SBATCH'"
  sbatch_script
  echo "SBATCH"
  quote sbatch "$script"
  echo
  exit 0
fi
sbatch_script >"$script"
echo "slurm.sh: wrote $script ($num_processes process(es) on $nodes node(s))" >&2
sbatch "$script"
