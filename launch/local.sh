#!/usr/bin/env bash
# Runs `python -m vit_jax train FLAGS` on this machine: one process, or N processes that join
# over localhost (each with its own CPU devices), as a multi-host run would.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'USAGE'
Usage: launch/local.sh [options] -- VIT_JAX_MAIN_FLAGS...

Runs `python -m vit_jax train VIT_JAX_MAIN_FLAGS...` here. With --processes N > 1 it starts N
processes joined over localhost (--coordinator_address=127.0.0.1:PORT --num_processes=N
--process_id=i); process 0 prints to the terminal, the others write
LOG_DIR/process_<i>.log. It waits for all, stops the others as soon as one fails, and exits
with the failed process's status.

Options:
  --processes N             processes to start (default 1)
  --devices-per-process M   CPU devices per process (passed as --local_device_count=M)
  --port PORT               coordinator port (default: a free one)
  --log-dir DIR             logs of processes 1..N-1 (default: a new folder under $TMPDIR)
  --python PY               Python interpreter (default: $PYTHON or python3)
  --dry-run                 print the commands, one per line, and run nothing
  -h, --help                this help

Example:
  launch/local.sh --processes 2 --devices-per-process 2 -- --config=vit --workdir=/tmp/run
USAGE
}

processes=1
devices=""
port=""
log_dir=""
python="${PYTHON:-python3}"
dry_run=0
while (($#)); do
  case $1 in
    --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}" ;;
    --processes) processes=$(value "$1" "${2-}"); shift 2 ;;
    --devices-per-process) devices=$(value "$1" "${2-}"); shift 2 ;;
    --port) port=$(value "$1" "${2-}"); shift 2 ;;
    --log-dir) log_dir=$(value "$1" "${2-}"); shift 2 ;;
    --python) python=$(value "$1" "${2-}"); shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; break ;;
    *) die "unknown option '$1'; put the vit_jax train flags after --" ;;
  esac
done
flags=("$@")
positive --processes "$processes"
[[ -z $devices ]] || positive --devices-per-process "$devices"

# The command of process $1 (in the array `cmd`).
command_of() {
  cmd=("$python" "${MAIN[@]}" "${flags[@]}")
  [[ -z $devices ]] || cmd+=("--local_device_count=$devices")
  if ((processes > 1)); then
    cmd+=("--coordinator_address=127.0.0.1:$port" "--num_processes=$processes" "--process_id=$1")
  fi
}

if ((processes > 1)); then
  if [[ -z $port ]]; then
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  fi
  positive --port "$port"
  if [[ -z $log_dir ]]; then
    log_dir=$(mktemp -d -u "${TMPDIR:-/tmp}/vit_jax_local.XXXXXX")
  fi
fi

if ((dry_run)); then
  ((processes == 1)) || echo "mkdir -p $(quote "$log_dir")"
  for ((i = 1; i < processes; i++)); do
    command_of "$i"
    echo "$(quote "${cmd[@]}") > $(quote "$log_dir/process_$i.log") 2>&1 &"
  done
  command_of 0
  quote "${cmd[@]}"
  echo
  exit 0
fi

# Each process gets its own process group, so stopping it stops its children too.
set -m
pids=()
stop_all() {
  local pid
  for pid in "${pids[@]}"; do
    kill -- "-$pid" 2>/dev/null || true
  done
  wait || true
}
trap 'stop_all; exit 130' INT TERM

if ((processes > 1)); then
  mkdir -p "$log_dir"
  echo "local.sh: $processes processes on 127.0.0.1:$port; logs of processes 1..$((processes - 1)) in $log_dir" >&2
fi
for ((i = 0; i < processes; i++)); do
  command_of "$i"
  if ((i == 0)); then
    "${cmd[@]}" &
  else
    "${cmd[@]}" >"$log_dir/process_$i.log" 2>&1 &
  fi
  pids+=("$!")
done

for ((left = processes; left > 0; left--)); do
  status=0
  wait -n || status=$?
  if ((status != 0)); then
    for i in "${!pids[@]}"; do
      if ! kill -0 "${pids[$i]}" 2>/dev/null; then
        where=""
        ((i == 0)) || where=" (log: $log_dir/process_$i.log)"
        echo "local.sh: process $i exited${where}" >&2
      fi
    done
    echo "local.sh: a process failed with status $status; stopping the others" >&2
    stop_all
    exit "$status"
  fi
done
