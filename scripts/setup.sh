#!/usr/bin/env bash
# Create .venv with fedsim and its dependencies (CPU torch unless torch is already there).
#   bash scripts/setup.sh            CPU machines: installs torch==2.13.0 (CPU build)
#   TORCH_SPEC=skip bash scripts/setup.sh   keep the torch you installed yourself (GPU users)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
if [ "${TORCH_SPEC:-torch==2.13.0}" != skip ]; then
  python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
python -m pip install -q -e ".[dev]"
