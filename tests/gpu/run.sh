#!/usr/bin/env bash
# The GPU check (issue 16): every CUDA path, one JSON line per figure, under 8 minutes on one GPU.
# On the device machine, from the repository root, after tests/gpu/prepare.sh ran here:
#   device run, carry [".gpu"], command: tests/gpu/run.sh
# Here (no GPU) `tests/gpu/run.sh --device cpu --small` runs the same steps on CPU as a dry run.
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-python3}
if [ -d .gpu/wheels ] && ls .gpu/wheels/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/wb-site .gpu/wheels/*.whl || exit 1
    export PYTHONPATH=/tmp/wb-site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
exec $PY tests/gpu/run.py "$@"
