#!/usr/bin/env bash
# Set up the environment (idempotent) and run the quickstart scenario.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
fedsim run scenarios/quickstart.yaml "$@"
