"""Evaluate: `python scripts/evaluate.py --config configs/... key=value ...` (same as `reprlab evaluate`)."""

import sys

from reprlab.cli import stage_main

if __name__ == "__main__":
    sys.exit(stage_main("evaluate"))
