"""``reprlab pretrain|finetune|evaluate --config FILE key=value ...`` (the scripts in scripts/ call this)."""

from __future__ import annotations

import argparse
import sys

from reprlab.config import ConfigError, EvaluateConfig, FinetuneConfig, PretrainConfig, load_config

STAGES = {"pretrain": PretrainConfig, "finetune": FinetuneConfig, "evaluate": EvaluateConfig}


def _run(stage: str, config):  # noqa: ANN001 - one of the stage configs
    if stage == "pretrain":
        from reprlab.stages.pretrain import pretrain

        return pretrain(config)
    if stage == "finetune":
        from reprlab.stages.finetune import finetune

        return finetune(config)
    from reprlab.stages.evaluate import evaluate

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
    try:
        run_dir = _run(args.stage, config)
    except KeyboardInterrupt:  # checkpoints are written atomically: the last one is whole
        print("interrupted: the last checkpoint (state.pt) in the run directory is intact; rerun the same "
              "command to resume", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - only the errors that explain themselves lose their traceback
        if not isinstance(err, _user_errors()):
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    from reprlab import distributed

    if distributed.is_main():
        print(f"wrote {run_dir}")
    distributed.teardown()
    return 0


def _user_errors() -> tuple[type[Exception], ...]:
    """Bad input (config, data, checkpoint) or a diverged run: the message says what to change."""
    from reprlab.checkpoint import CheckpointError
    from reprlab.data.datasets import DatasetError
    from reprlab.engine import NonFiniteLossError

    return ConfigError, CheckpointError, DatasetError, NonFiniteLossError


def stage_main(stage: str) -> int:
    """Entry for scripts/<stage>.py: ``python scripts/pretrain.py --config ... key=value``."""
    return main([stage, *sys.argv[1:]])
