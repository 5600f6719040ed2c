#!/usr/bin/env bash
# The project's test command (README). Kernel tests run the Triton kernels on CPU through the
# interpreter, which must be switched on before triton is imported; model tests run plain.
# Extra arguments go to both pytest runs (e.g. -x, -k name).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
TRITON_INTERPRET=1 "$PY" -m pytest tests/kernels -q "$@"
"$PY" -m pytest tests/model -q "$@"
"$PY" -m pytest tests/bench -q "$@"
