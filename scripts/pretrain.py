"""Pretrain: `python scripts/pretrain.py --config configs/... key=value ...` (same as `reprlab pretrain`)."""

import sys

from reprlab.cli import stage_main

if __name__ == "__main__":
    sys.exit(stage_main("pretrain"))
