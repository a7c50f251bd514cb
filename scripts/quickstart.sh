#!/usr/bin/env bash
# The whole pipeline on the built-in digits data: pretrain (SimCLR) -> fine-tune (linear probe) -> evaluate.
# Writes runs/simclr_digits, runs/linear_probe_digits and runs/eval_digits; ends with the comparison table.
set -euo pipefail
cd "$(dirname "$0")/.."
python scripts/pretrain.py --config configs/pretrain/simclr_digits.yaml "$@"
python scripts/finetune.py --config configs/finetune/linear_probe_digits.yaml encoder=runs/simclr_digits
python scripts/evaluate.py --config configs/eval/digits.yaml
