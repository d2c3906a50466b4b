#!/usr/bin/env bash
# CMEDL on a multi-host Cloud TPU VM slice (e.g. v4-32: 4 workers): the same command on every worker.
#
#   launch/tpu_vm.sh setup TPU_NAME ZONE                  # copy this repository to every worker and install it
#   launch/tpu_vm.sh train TPU_NAME ZONE --config configs/cmedl.py:translator=cyclegan,segmenter=unet --workdir /mnt/shared/runs/cmedl \
#       --config.data.ct_dir=/mnt/shared/data/Lung_CT --config.data.mri_dir=/mnt/shared/data/Lung_T2w
#   launch/tpu_vm.sh stop TPU_NAME ZONE                   # SIGTERM to every worker's trainer (checkpoint, exit)
#   launch/tpu_vm.sh check TPU_NAME ZONE --no-torch --overwrite   # the accelerator check, single-host slices
#
# Nothing to set for the multi-process start-up: on a TPU VM, JAX reads the worker list and this worker's index
# from the TPU metadata server. --workdir and the data must be on storage mounted at the same path on every
# worker (Filestore NFS, or a bucket mounted with gcsfuse): every worker writes its part of each checkpoint.
# Set PROJECT to pass --project; REMOTE_DIR is where the repository goes on the workers (default cmedl_jax).
set -euo pipefail

usage() { sed -n '2,13p' "$0"; exit 2; }
[[ $# -ge 3 ]] || usage
ACTION=$1 TPU_NAME=$2 ZONE=$3
shift 3
REMOTE_DIR=${REMOTE_DIR:-cmedl_jax}
GCLOUD=(gcloud compute tpus tpu-vm)
WHERE=(--zone="${ZONE}" ${PROJECT:+--project="${PROJECT}"} --worker=all)

case "${ACTION}" in
  setup)
    REPO_ROOT=$(cd "$(dirname "$0")/.." && pwd)
    # The tracked files only (no runs/ or caches); scp then places them on every worker.
    ARCHIVE=$(mktemp -d)/cmedl_jax.tar.gz
    git -C "${REPO_ROOT}" archive --format=tar.gz -o "${ARCHIVE}" HEAD
    "${GCLOUD[@]}" scp "${ARCHIVE}" "${TPU_NAME}:~/cmedl_jax.tar.gz" "${WHERE[@]}"
    "${GCLOUD[@]}" ssh "${TPU_NAME}" "${WHERE[@]}" --command="set -e; mkdir -p ~/${REMOTE_DIR}; \
      tar -xzf ~/cmedl_jax.tar.gz -C ~/${REMOTE_DIR}; cd ~/${REMOTE_DIR}; \
      python3 -m pip install -q -U 'jax[tpu]' && python3 -m pip install -q -e ."
    ;;
  train)
    [[ $# -gt 0 ]] || usage
    ARGS=$(printf '%q ' "$@")
    # Output of every worker streams back here; each worker also keeps its own log and the trainer's pid (stop).
    "${GCLOUD[@]}" ssh "${TPU_NAME}" "${WHERE[@]}" --command="cd ~/${REMOTE_DIR} && \
      export PATH=\$HOME/.local/bin:\$PATH && \
      { cmedl-train ${ARGS} --no_progress > >(tee -a ~/cmedl_train.log) 2>&1 & \
        echo \$! > ~/cmedl_train.pid; wait \$!; }"
    ;;
  check)
    # The accelerator check (cmedl_jax/bench/accelerator.py) on worker 0 of a single-host slice (e.g. v4-8,
    # v5litepod-8): its stages are single-process. PyTorch has no TPU here; --no-torch leaves its rows out.
    ARGS=$(printf '%q ' "$@")
    "${GCLOUD[@]}" ssh "${TPU_NAME}" --zone="${ZONE}" ${PROJECT:+--project="${PROJECT}"} --worker=0 \
      --command="cd ~/${REMOTE_DIR} && python3 -m cmedl_jax.bench accelerator --out ~/cmedl_check ${ARGS}"
    ;;
  stop)
    "${GCLOUD[@]}" ssh "${TPU_NAME}" "${WHERE[@]}" --command="kill -TERM \$(cat ~/cmedl_train.pid) || true"
    ;;
  *)
    usage
    ;;
esac
