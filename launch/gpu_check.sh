#!/usr/bin/env bash
# The accelerator check (python -m cmedl_jax.bench accelerator) on a machine with one NVIDIA GPU and no network.
#
#   launch/gpu_check.sh WHEELS_DIR OUT_DIR [options of the check, e.g. --stages tests,step]
#
# The machine's Python has jax[cuda], flax, optax, orbax-checkpoint, numpy, scipy and torch (CUDA); WHEELS_DIR holds
# what it may lack, downloaded on a machine with network (Python 3.12, manylinux x86-64; about 25 MB):
#
#   pip download --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d WHEELS_DIR \
#       grain==0.2.18 nibabel ml_collections tensorboardX pynrrd
#
# Only the wheels whose distribution is not installed are installed (--no-deps, into OUT_DIR/site, so the
# machine's numpy, jax and torch stay as they are); the repository is used in place (PYTHONPATH). Then the check
# runs every stage, most valuable first, writing OUT_DIR/accelerator.json after each and OUT_DIR/accelerator.log.
# On an H200 it takes about 5 minutes. Exit status: the check's (1 if a stage failed).
set -euo pipefail

usage() { sed -n '2,17p' "$0"; exit 2; }
[[ $# -ge 2 ]] || usage
WHEELS=$1 OUT=$2
shift 2
[[ -d "${WHEELS}" ]] || { echo "gpu_check: ${WHEELS}: no such folder of wheels" >&2; exit 2; }
REPO_ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
mkdir -p "${OUT}"
SITE=$(cd "${OUT}" && pwd)/site

missing=()
for wheel in "${WHEELS}"/*.whl; do
  [[ -e "${wheel}" ]] || continue
  # The distribution name of NAME-VERSION-...whl; installed ones (any version) are kept.
  name=$(basename "${wheel}" | cut -d- -f1)
  if ! "${PYTHON}" -c "import importlib.metadata as m, sys; m.version(sys.argv[1])" "${name}" 2>/dev/null; then
    missing+=("${wheel}")
  fi
done
if [[ ${#missing[@]} -gt 0 ]]; then
  names=$(for w in "${missing[@]}"; do basename "$w" | cut -d- -f1-2; done | tr '\n' ' ')
  echo "gpu_check: installing ${#missing[@]} wheel(s) into ${SITE}: ${names}"
  "${PYTHON}" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "${SITE}" \
    "${missing[@]}"
fi
export PYTHONPATH="${REPO_ROOT}:${SITE}${PYTHONPATH:+:${PYTHONPATH}}"
export PYTHONUNBUFFERED=1
# Every process of the check shares the one GPU: none takes most of its memory up front.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
cd "${REPO_ROOT}"
"${PYTHON}" -c "import grain, nibabel, ml_collections, tensorboardX, nrrd, jax, torch; \
print('gpu_check: jax', jax.__version__, jax.devices(), '| torch', torch.__version__, torch.cuda.is_available())"
exec "${PYTHON}" -m cmedl_jax.bench accelerator --out "${OUT}" "$@"
