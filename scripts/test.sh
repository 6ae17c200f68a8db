#!/usr/bin/env bash
# Set up the environment (idempotent) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# tests/test_report.py renders the HTML report in headless Chromium; install Debian's package
# when it is missing and we can (root or passwordless sudo), else that test is skipped.
if ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null \
    && command -v apt-get >/dev/null; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo -n"
  { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium; } \
    >/dev/null 2>&1 || echo "could not install chromium; the report rendering test will be skipped"
fi
. .venv/bin/activate
python -m pytest -q "$@"
