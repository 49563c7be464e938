#!/usr/bin/env bash
# Creates .venv (if missing) and installs the project with the given extras, CPU torch first.
# Usage: bash scripts/setup.sh [extras], e.g. bash scripts/setup.sh test,examples
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-examples}"
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# The CPU build of torch; any recent torch works, this one installs fast and needs no GPU.
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[${extras}]"
