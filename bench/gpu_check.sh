#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py) on a machine with CUDA, torch and nothing of this project
# installed: no pip, no Ray, under 8 minutes (R-50 800x1333 training fp32/bf16 + peak memory,
# inference, DCN on CUDA, input pipeline with GPU decode).
#
#   bench/gpu_check.sh                         # report on stdout
#   bench/gpu_check.sh --json "$OUT/gpu_check.json"
#
# The repository root goes on PYTHONPATH (the package is not installed). torchvision is taken from
# the machine when it imports (the project's GPU image has 0.26.0, built for its torch 2.11);
# otherwise from a wheel in $TORCHVISION_WHEEL or .whl/ (git-ignored; carry it), unpacked to /tmp:
#   pip download --no-deps 'torchvision==0.26.*' --python-version 3.12 --only-binary=:all: \
#       --platform manylinux_2_28_x86_64 -d .whl      # 7.5 MB
# GPU_CHECK_TIMEOUT (seconds, default 470) bounds the whole run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torchvision" 2>/dev/null; then
    whl=${TORCHVISION_WHEEL:-$(ls .whl/torchvision-*.whl 2>/dev/null | head -n 1 || true)}
    if [ -z "$whl" ]; then
        echo "gpu_check: torchvision is not importable and no wheel was found in \$TORCHVISION_WHEEL or .whl/" >&2
        exit 2
    fi
    rm -rf /tmp/atss_torchvision && "$PY" -m zipfile -e "$whl" /tmp/atss_torchvision
    export PYTHONPATH=/tmp/atss_torchvision${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
"$PY" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, \
'cuda', torch.cuda.is_available(), flush=True)"
exec timeout "${GPU_CHECK_TIMEOUT:-470}" "$PY" bench/gpu_check.py "$@"
