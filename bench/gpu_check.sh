#!/usr/bin/env bash
# GPU readiness check (issue 14): bf16 warm-up, score, select and sparse training of random-initialised
# Llama-3.2-1B/3B-shaped models, with peak memory, examples/s and the ratio to a plain bf16 training pass.
# One command, at most 8 minutes (the timeout below); extra arguments go to bench/gpu_check.py
# (e.g. --sizes 1b --seq-len 1024). Needs a CUDA machine with torch, transformers, peft, safetensors, tqdm and
# PyYAML (no download: models are random, data synthetic); runs from the checkout without installing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check.sh: no CUDA device visible to torch')"
OUT_JSON="${OUT:-bench/results}/gpu_check.json"
timeout 480 "$PY" bench/gpu_check.py --out "$OUT_JSON" "$@"
