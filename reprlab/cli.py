"""``reprlab pretrain|finetune|evaluate --config FILE key=value ...`` (the scripts in scripts/ call this)."""

from __future__ import annotations

import argparse
import sys

from reprlab.config import ConfigError, EvaluateConfig, FinetuneConfig, PretrainConfig, load_config

STAGES = {"pretrain": PretrainConfig, "finetune": FinetuneConfig, "evaluate": EvaluateConfig}


def _run(stage: str, config):  # noqa: ANN001 - one of the stage configs
    if stage == "pretrain":
        from reprlab.ssl.pretrain import pretrain

        return pretrain(config)
    if stage == "finetune":
        from reprlab.finetune.train import finetune

        return finetune(config)
    from reprlab.evaluate.run import evaluate

    return evaluate(config)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="reprlab", description=__doc__)
    parser.add_argument("stage", choices=sorted(STAGES))
    parser.add_argument("--config", "-c", help="YAML file from configs/ (defaults apply when omitted)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.epochs=5 "
                                                     "encoder=runs/simclr_digits")
    args = parser.parse_intermixed_args(argv)
    overrides = list(args.overrides)
    if args.stage == "evaluate":  # `encoder=runs/x` is shorthand for a single-entry `encoders` list
        overrides = [f"encoders=[{o.split('=', 1)[1]}]" if o.startswith("encoder=") else o for o in overrides]
    try:
        config = load_config(STAGES[args.stage], args.config, overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    run_dir = _run(args.stage, config)
    print(f"wrote {run_dir}")
    return 0


def stage_main(stage: str) -> int:
    """Entry for scripts/<stage>.py: ``python scripts/pretrain.py --config ... key=value``."""
    return main([stage, *sys.argv[1:]])
