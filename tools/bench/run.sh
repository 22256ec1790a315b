#!/usr/bin/env bash
# The U-Net benchmark of issue 6 in one command: esddpm (tract) vs ONNX Runtime vs PyTorch.
#
#   tools/bench/run.sh            # full run: ~15-20 min on 2 cores; needs an idle machine
#   tools/bench/run.sh --quick    # smoke run: batch 1, 1 thread, 3 reps (~2 min)
#   tools/bench/run.sh --help     # more options (--models, --batches, --threads, --rounds...)
#
# Needs: cargo, and a Python with torch, diffusers, onnxruntime, onnx, numpy
# (PY=/path/to/python, default /work/venv/bin/python if present, else python3).
# Writes target/bench/results.{json,md,log}; see tools/bench/README.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
if [[ -z "${PY:-}" ]]; then
    if [[ -x /work/venv/bin/python ]]; then PY=/work/venv/bin/python; else PY=python3; fi
fi
exec "$PY" tools/bench/run.py "$@"
