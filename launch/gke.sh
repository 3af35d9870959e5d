#!/usr/bin/env bash
# Runs `python3 -m vit_jax train FLAGS --distributed` on every host of N TPU slices in a GKE
# cluster: writes a Kubernetes JobSet manifest (one Job per slice) and applies it with kubectl.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'USAGE'
Usage: launch/gke.sh --tpu-type TYPE --topology TOPO --image IMAGE [options] -- VIT_JAX_MAIN_FLAGS...

Writes a JobSet manifest (jobset.x-k8s.io/v1alpha2; the JobSet controller must be installed
in the cluster) and runs `kubectl apply -f MANIFEST`. The JobSet has one replicated job with
one replica per slice; each replica is an indexed Job of one pod per host of the slice
(parallelism = completions = hosts per slice), scheduled on TPU nodes of the given type and
topology, requesting the host's chips (google.com/tpu). Every pod runs
  python3 -m vit_jax train VIT_JAX_MAIN_FLAGS... --distributed
in IMAGE (an image with this repository installed with its `tpu` extra). The environment
jax.distributed reads (worker ids and hostnames, and the slice ids of a multi-slice run) is
left to the JobSet and GKE's TPU node pools: the manifest sets none of it. Nothing is
followed: the script returns once the manifest is applied.

Options:
  --tpu-type TYPE           slice type: v4-N, v5p-N (N TensorCores, 2 per chip),
                            v5litepod-N or v6e-N (N chips) (required)
  --topology TOPO           slice topology, e.g. 2x4x4 for v4-64 (required; the product of
                            its dimensions must be the slice's chip count)
  --image IMAGE             container image with vit_jax installed (required)
  --slices N                slices (default 1)
  --hosts-per-slice H       hosts (pods) per slice (default: from the type: 4 chips per host,
                            one host for v5litepod/v6e slices of up to 8 chips)
  --name NAME               JobSet name (default vit-jax)
  --namespace NS            Kubernetes namespace (default default)
  --manifest PATH           where to write the manifest (default ./<name>.yaml)
  --dry-run                 print the commands (writing the manifest, then kubectl) and run
                            nothing
  -h, --help                this help

Example:
  launch/gke.sh --name vit-g14 --tpu-type v5p-256 --topology 4x4x8 --slices 2 \
    --image us-docker.pkg.dev/proj/vit/vit_jax:latest -- \
    --config=vit:g/14,imagenet21k,pretrain --workdir=gs://bucket/g14
USAGE
}

name="vit-jax"
namespace="default"
slices=1
tpu_type=""
topology=""
image=""
hosts=""
manifest=""
dry_run=0
while (($#)); do
  case $1 in
    --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}" ;;
    --name) name=$(value "$1" "${2-}"); shift 2 ;;
    --namespace) namespace=$(value "$1" "${2-}"); shift 2 ;;
    --slices) slices=$(value "$1" "${2-}"); shift 2 ;;
    --tpu-type) tpu_type=$(value "$1" "${2-}"); shift 2 ;;
    --topology) topology=$(value "$1" "${2-}"); shift 2 ;;
    --image) image=$(value "$1" "${2-}"); shift 2 ;;
    --hosts-per-slice) hosts=$(value "$1" "${2-}"); shift 2 ;;
    --manifest) manifest=$(value "$1" "${2-}"); shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; break ;;
    *) die "unknown option '$1'; put the vit_jax train flags after --" ;;
  esac
done
flags=("$@")
((${#flags[@]})) || die "no vit_jax train flags after -- (see --help)"
[[ -n $tpu_type ]] || die "--tpu-type is required (see --help)"
[[ -n $topology ]] || die "--topology is required (see --help)"
[[ -n $image ]] || die "--image is required (see --help)"
positive --slices "$slices"
[[ $name =~ ^[a-z0-9]([-a-z0-9]*[a-z0-9])?$ ]] \
  || die "--name must be lowercase letters, digits and '-' (a Kubernetes name), got '$name'"
manifest=${manifest:-./$name.yaml}

# The slice type: its node label (cloud.google.com/gke-tpu-accelerator) and chip count.
[[ $tpu_type =~ ^(v4|v5p|v5litepod|v6e)-([1-9][0-9]*)$ ]] \
  || die "--tpu-type must be v4-N, v5p-N, v5litepod-N or v6e-N, got '$tpu_type'"
size=${BASH_REMATCH[2]}
case ${BASH_REMATCH[1]} in
  v4) accelerator=tpu-v4-podslice; chips=$((size / 2)) ;;
  v5p) accelerator=tpu-v5p-slice; chips=$((size / 2)) ;;
  v5litepod) accelerator=tpu-v5-lite-podslice; chips=$size ;;
  v6e) accelerator=tpu-v6e-slice; chips=$size ;;
esac
((chips > 0)) || die "--tpu-type '$tpu_type' has no whole chip"
[[ $topology =~ ^[1-9][0-9]*(x[1-9][0-9]*)+$ ]] || die "--topology must look like 2x4x4, got '$topology'"
product=$((${topology//x/*}))
((product == chips)) || die "--topology $topology has $product chips, but $tpu_type has $chips"
if [[ -z $hosts ]]; then
  if [[ $accelerator == tpu-v5-lite-podslice || $accelerator == tpu-v6e-slice ]] && ((chips <= 8)); then
    hosts=1
  else
    hosts=$(((chips + 3) / 4))
  fi
fi
positive --hosts-per-slice "$hosts"
((chips % hosts == 0)) || die "--hosts-per-slice $hosts does not divide the $chips chips of $tpu_type"
chips_per_host=$((chips / hosts))

# One YAML scalar, single-quoted: no character but ' is special inside.
yaml() {
  [[ $1 != *$'\n'* ]] || die "a value with a newline cannot go into the manifest: '$1'"
  printf "'%s'" "${1//\'/\'\'}"
}

# The container's command: run directly (no shell), so each flag reaches vit_jax train as given.
command=(python3 "${MAIN[@]}" "${flags[@]}" --distributed)

jobset() {
  echo "# launch/gke.sh: $slices x $tpu_type ($topology), $hosts host(s) per slice, $chips_per_host chip(s) each."
  echo "# Each pod runs: $(quote "${command[@]}")"
  echo "apiVersion: jobset.x-k8s.io/v1alpha2"
  echo "kind: JobSet"
  echo "metadata:"
  echo "  name: $(yaml "$name")"
  echo "  namespace: $(yaml "$namespace")"
  echo "  annotations:"
  echo "    # Each slice (Job) on a node pool of its own."
  echo "    alpha.jobset.sigs.k8s.io/exclusive-topology: cloud.google.com/gke-nodepool"
  echo "spec:"
  echo "  failurePolicy:"
  echo "    maxRestarts: 0"
  echo "  replicatedJobs:"
  echo "    - name: slice"
  echo "      replicas: $slices  # one Job per slice"
  echo "      template:"
  echo "        spec:"
  echo "          parallelism: $hosts  # one pod per host of the slice"
  echo "          completions: $hosts"
  echo "          completionMode: Indexed"
  echo "          backoffLimit: 0"
  echo "          template:"
  echo "            spec:"
  echo "              restartPolicy: Never"
  echo "              nodeSelector:"
  echo "                cloud.google.com/gke-tpu-accelerator: $accelerator"
  echo "                cloud.google.com/gke-tpu-topology: $(yaml "$topology")"
  echo "              containers:"
  echo "                - name: vit-jax"
  echo "                  image: $(yaml "$image")"
  echo "                  # No env: the JobSet and GKE's TPU node pools provide what"
  echo "                  # jax.distributed.initialize() reads (--distributed)."
  echo "                  command:"
  local word
  for word in "${command[@]}"; do
    echo "                    - $(yaml "$word")"
  done
  echo "                  resources:"
  echo "                    requests:"
  echo "                      google.com/tpu: $chips_per_host"
  echo "                    limits:"
  echo "                      google.com/tpu: $chips_per_host"
}

apply=(kubectl apply -f "$manifest")
if ((dry_run)); then
  echo "cat > $(quote "$manifest") <<'YAML'"
  jobset
  echo "YAML"
  quote "${apply[@]}"
  echo
  exit 0
fi
jobset >"$manifest"
echo "gke.sh: wrote $manifest ($slices slice(s) x $hosts host(s))" >&2
"${apply[@]}"
echo "gke.sh: process 0's log: $(quote kubectl logs -n "$namespace" -f -l "jobset.sigs.k8s.io/jobset-name=$name,jobset.sigs.k8s.io/job-index=0,batch.kubernetes.io/job-completion-index=0")" >&2
