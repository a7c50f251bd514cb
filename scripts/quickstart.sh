#!/usr/bin/env bash
# The mission on the built-in digits data: pretrain SimCLR without labels, then use only 5 labels per class:
# evaluate (kNN and linear probe with 5 labeled images per class) SimCLR beside the same network untrained
# (random) and raw pixels, and fine-tune a linear probe on the SimCLR encoder with the same 5 labels per class.
# Writes runs/simclr_digits, runs/eval_digits and runs/linear_probe_digits; prints the comparison table.
set -euo pipefail
cd "$(dirname "$0")/.."
python scripts/pretrain.py --config configs/pretrain/simclr_digits.yaml "$@"
python scripts/evaluate.py --config configs/eval/digits.yaml labels_per_class=5
python scripts/finetune.py --config configs/finetune/linear_probe_digits.yaml encoder=runs/simclr_digits \
  labels_per_class=5
