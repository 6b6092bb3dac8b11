#!/usr/bin/env bash
# The GPU check (issue "GPU speed"): correctness and speed on one lent H100/H200 in at most 8 minutes,
# no downloads, one JSON file. See bench/README.md.
#
#   bench/gpu_check.sh                       # writes $OUT/gpu_check.json (or ./gpu_check.json)
#   bench/gpu_check.sh --out /tmp/x.json     # any gpu_check.py option passes through
#   bench/gpu_check.sh --dry-run             # tiny shapes on the CPU, Triton through its interpreter
#
# Runs from the source tree (PYTHONPATH=server): the GPU machines have torch, triton and transformers but
# no llamaserve install and no fastapi/uvicorn, which the engine and model do not need.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/server${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PYTHON="${PYTHON:-python3}"
for arg in "$@"; do
  # The interpreter must be on before triton is imported: only the CPU dry run wants it.
  if [ "$arg" = "--dry-run" ]; then export TRITON_INTERPRET=1; fi
done
# 450 s of sections inside an 8-minute hard stop; the JSON is rewritten after every section.
exec timeout --kill-after=10 480 "$PYTHON" bench/gpu_check.py --out "${OUT:-.}/gpu_check.json" "$@"
