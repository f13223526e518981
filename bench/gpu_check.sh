#!/usr/bin/env bash
# One prepared GPU check (<= 8 min on one GPU): SAM masks ours vs stock (vit_b, vit_h, pps 16),
# SAM 2.1 tiny and large (sam2 package), convnext_base_w training step at 256x256 fp32 vs AMP,
# opensam predict images/s, peak memory.
# Needs only this repository and the package registries; prints one JSON object (last line).
# On a machine without a CUDA GPU it prints {"skipped": ...} and exits 0.
#   bash bench/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import opensam, torch, segment_anything, sam2, open_clip" >/dev/null 2>&1; then
  if [ ! -x .venv-gpu/bin/python ]; then
    echo "gpu_check: installing requirements into .venv-gpu (a few minutes)" >&2
    "$PY" -m venv .venv-gpu
    # sam2 is an sdist: SAM2_BUILD_CUDA=0 skips its optional CUDA extension (hole filling only)
    SAM2_BUILD_CUDA=0 .venv-gpu/bin/pip install -q -r requirements.txt -e . >&2
  fi
  PY=.venv-gpu/bin/python
fi
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo '{"skipped": "no CUDA GPU on this machine (torch.cuda.is_available() is False): nothing measured"}'
  exit 0
fi
"$PY" -c "import torch; print('gpu_check:', torch.cuda.get_device_name(0), torch.__version__)" >&2
exec timeout 480 "$PY" bench/gpu_check.py "$@"
