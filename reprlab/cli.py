"""The ``reprlab`` command (scripts/<stage>.py call the same code).

``reprlab pretrain|finetune|evaluate [--config FILE] [key=value ...]`` runs a stage, ``reprlab export RUN_DIR
--format F`` exports an encoder, ``reprlab list`` shows what a config can name, ``reprlab --version``.
A user's mistake (a config key or value, a dataset, a checkpoint, a diverged run, a missing optional package) ends
in one line ``error: ...`` on stderr and exit code 2; ``--debug`` shows the traceback instead. Under torchrun only
rank 0 prints it, and every rank exits 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import re
import sys
import textwrap
import time
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from reprlab import __version__

# reprlab.config (and so torch) is imported when a command needs it: `reprlab --version` and `--help` stay quick
STAGES = {"pretrain": "PretrainConfig", "finetune": "FinetuneConfig", "evaluate": "EvaluateConfig"}
COMMANDS = {
    "pretrain": "self-supervised pretraining of an encoder -> runs/<name>/ (encoder.safetensors, metrics.jsonl)",
    "finetune": "an encoder (a pretraining run or random) + a linear head under a freezing policy -> runs/<name>/",
    "evaluate": "kNN, retrieval, linear probes and label-free quality of several encoders -> metrics.json, report",
    "export": "write a run's encoder for timm, torchvision, transformers, ONNX or TorchScript",
    "list": "what a config can name: configs, methods, policies, encoders, datasets, loggers",
}
EXAMPLES = {
    "pretrain": ["reprlab pretrain --config configs/pretrain/simclr_digits.yaml train.epochs=5 optim.lr=0.001",
                 "reprlab pretrain method.name=rotation encoder.name=timm:resnet10t data.name=folder:photos "
                 "data.image_size=64"],
    "finetune": ["reprlab finetune --config configs/finetune/linear_probe_digits.yaml encoder=runs/simclr_digits",
                 "reprlab finetune encoder=runs/simclr_digits policy.name=llrd policy.params.decay=0.65 "
                 "labels_per_class=10 'seeds=[0, 1, 2]'"],
    "evaluate": ["reprlab evaluate --config configs/eval/digits.yaml",
                 "reprlab evaluate encoder=runs/simclr_digits data.name=digits report=false"],
}
CONFIG_DIRS = {"pretrain": "pretrain", "finetune": "finetune", "evaluate": "eval"}
RANK_EXIT_DELAY_S = 3.0  # torchrun stops every rank at the first exit: the others give rank 0 time to print
WIDTH = 118


# --------------------------------------------------------------------------------------------- errors


def _user_errors() -> tuple[type[Exception], ...]:
    """Bad input (config, data, checkpoint, export) or a diverged run: the message says what to change."""
    from reprlab.checkpoint import CheckpointError
    from reprlab.config import ConfigError
    from reprlab.data.datasets import DatasetError
    from reprlab.engine import NonFiniteLossError
    from reprlab.export import ExportError

    return ConfigError, CheckpointError, DatasetError, NonFiniteLossError, ExportError


def _is_user_error(err: BaseException) -> bool:
    # an optional extra that is not installed says how to install it; any other ImportError is a bug
    return isinstance(err, _user_errors()) or (isinstance(err, ImportError) and "pip install" in str(err))


def _rank() -> int:
    from reprlab import distributed

    return distributed.rank() if distributed.is_distributed() else int(os.environ.get("RANK", "0"))


def _report(message: str) -> None:
    """One line on stderr from rank 0; the other ranks of a torchrun job stay silent."""
    if _rank() == 0:
        print(f"error: {' '.join(message.split())}", file=sys.stderr, flush=True)
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
        time.sleep(RANK_EXIT_DELAY_S)


def _guard(run: Callable[[], int], debug: bool, interrupted: str = "interrupted") -> int:
    try:
        return run()
    except KeyboardInterrupt:
        if _rank() == 0:
            print(interrupted, file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - only the errors that explain themselves lose their traceback
        if debug or not _is_user_error(err):
            raise
        _report(str(err))
        return 2


# --------------------------------------------------------------------------------------------- help text


def _plain(text: str) -> str:
    """Docstring text without RST markup: ``x`` -> x, :class:`~a.B` -> B."""
    text = re.sub(r":\w+:`~?([\w.]+)`", lambda m: m.group(1).split(".")[-1], text)
    return " ".join(text.replace("``", "").replace("`", "").split())


def _first_sentence(doc: str | None, cls: type) -> str:
    if not doc or doc.startswith(f"{cls.__name__}("):  # a dataclass without a docstring documents its signature
        return ""
    return re.split(r"(?<! al)(?<! e\.g)\. (?=[A-Z])", _plain(doc))[0].rstrip(".")


def _show(value: Any) -> str:
    """A default as YAML writes it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return repr(value) if len(repr(value)) <= 8 else f"{value:.6g}"
    if dataclasses.is_dataclass(value):
        return f"<{type(value).__name__}>"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(map(_show, value)) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_show(v)}" for k, v in value.items()) + "}"
    return str(value)


def field_comments(cls: type) -> dict[str, str]:
    """The comment of each field of a config dataclass: trailing (``x: int = 1  # ...``) or the lines above it."""
    comments: dict[str, str] = {}
    above: list[str] = []
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return comments
    for line in source.splitlines()[1:]:
        if re.match(r"\s+#", line):
            above.append(line.strip()[1:].strip())
            continue
        match = re.match(r"\s+(\w+): [^#]*(?:#\s*(.*))?$", line)
        if match:
            comments[match.group(1)] = _plain(match.group(2) or " ".join(above))
        above = []
    return comments


def _wrap(head: str, text: str, column: int = 40) -> list[str]:
    if not text:
        return [head]
    if len(head) >= column - 1:
        return [head, *textwrap.wrap(text, WIDTH, initial_indent=" " * column, subsequent_indent=" " * column)]
    return textwrap.wrap(text, WIDTH, initial_indent=head.ljust(column), subsequent_indent=" " * column)


def config_keys(cls: type, instance: Any, prefix: str, choices: dict[str, list[str]]) -> list[str]:
    """One line per key of ``cls`` (defaults from ``instance``: the stage's own), sections with a title line."""
    from reprlab.config import dataclass_in

    lines: list[str] = []
    hints, comments = typing.get_type_hints(cls), field_comments(cls)
    # single keys first, then the sections: a top-level key listed after a section would read as part of it
    for f in sorted(dataclasses.fields(cls), key=lambda f: dataclass_in(hints[f.name]) is not None):
        key, value = prefix + f.name, getattr(instance, f.name)
        section = dataclass_in(hints[f.name])
        if section is not None and dataclasses.is_dataclass(value):
            title = comments.get(f.name) or _first_sentence(section.__doc__, section)
            lines += ["", *_wrap(f"  {key}:", title, 26)]
            lines += config_keys(section, value, f"{key}.", choices)
            continue
        note = comments.get(f.name, "")
        if key in choices:
            note = "one of: " + " | ".join(choices[key]) + (f" ({note})" if "(" not in note and note and
                                                          "|" not in note else "")
        lines += _wrap(f"    {key} = {_show(value)}", note)
    return lines


def _registry_lines(title: str, registry: dict[str, Any], skip: tuple[str, ...] = ()) -> list[str]:
    lines = ["", title]
    for name, cls in registry.items():
        params = [p for n, p in inspect.signature(cls).parameters.items() if n not in skip]
        shown = ", ".join(f"{p.name}={_show(p.default)}" for p in params if p.default is not inspect.Parameter.empty)
        summary = _first_sentence(cls.__doc__, cls)
        lines += _wrap(f"  {name}", summary + (f". params: {shown}" if shown else ""), 22)
    return lines


def _augment_line() -> list[str]:
    from reprlab.data.views import FinetuneAugment, ViewAugment

    return [""] + [line for cls in (ViewAugment, FinetuneAugment) for line in _wrap(
        f"  <{cls.__name__}>", "a mapping of " + ", ".join(f.name for f in dataclasses.fields(cls)), 22)]


def stage_help(stage: str) -> str:
    """``reprlab <stage> --help``: usage, examples, every config key with default and choices, the registries."""
    from reprlab import config
    from reprlab.checks import key_choices, registries

    cls, reg = getattr(config, STAGES[stage]), registries()
    lines = [f"usage: reprlab {stage} [--config FILE] [key=value ...] [--debug]",
             f"       (python scripts/{stage}.py takes the same arguments)", "",
             *textwrap.wrap(f"reprlab {stage}: {COMMANDS[stage]}. The config is a YAML file "
                            f"(configs/{CONFIG_DIRS[stage]}/*.yaml) of the sections below; each key=value override "
                            f"sets one dotted key (values are YAML: 5, 0.1, 1e-4, true, null, [a, b], {{k: v}}).",
                            WIDTH),
             "", "options:", "  -c, --config FILE   a YAML config; without it the defaults below apply",
             "  --debug             show the full traceback of an error instead of one line",
             "  -h, --help          this help", "", "examples:", *(f"  {e}" for e in EXAMPLES[stage]),
             "", "config keys (key = default, then choices or meaning):"]
    lines += config_keys(cls, cls(), "", key_choices())
    if stage == "pretrain":
        from reprlab.ssl import METHODS

        lines += _registry_lines("methods (method.name; method.params.<name>=value):", METHODS, ("encoder",))
        lines += _augment_line()
    if stage == "finetune":
        from reprlab.finetune.policies import POLICIES

        lines += _registry_lines("policies (policy.name; policy.params.<name>=value):", POLICIES)
    lines += [""] + _wrap("encoders (encoder.name, arch.name):", "; ".join(reg["encoders"]) + "; `reprlab list` "
                          "names the torchvision models", 2)
    if stage == "evaluate":
        lines += _wrap("encoders (encoders=[...]):", "run directories, random (the first run's architecture, "
                       "untrained; else arch), pixels; encoder=runs/x is short for encoders=[runs/x]", 2)
    lines += _wrap("datasets (data.name):", ", ".join(reg["datasets"]), 2)
    if stage != "evaluate":
        lines += _wrap("loggers (train.loggers):", ", ".join(reg["loggers"]), 2)
    return "\n".join(lines).rstrip() + "\n"


def top_help() -> str:
    lines = ["usage: reprlab <command> [arguments] [--debug]", "       reprlab --version", "",
             "Self-supervised pretraining, fine-tuning, evaluation and export of image encoders.", "", "commands:"]
    lines += [f"  {name:<10}{text}" for name, text in COMMANDS.items()]
    lines += ["", "options:", "  --version   print the version", "  --debug     show the full traceback of an "
              "error instead of one line", "  -h, --help  this help", "",
              "`reprlab <command> --help` lists every config key with its default and choices.", "", "examples:",
              f"  {EXAMPLES['pretrain'][0]}", f"  {EXAMPLES['finetune'][0]}",
              "  reprlab evaluate encoder=runs/simclr_digits", "  reprlab export runs/simclr_digits --format onnx",
              "  reprlab list methods"]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------- list


def _configs_dir() -> Path | None:
    for candidate in (Path.cwd() / "configs", Path(__file__).resolve().parents[1] / "configs"):
        if candidate.is_dir():
            return candidate
    return None


def list_sections() -> dict[str, list[str]]:
    """``reprlab list``: every name a config can pick, by section."""
    from reprlab.checks import registries, torchvision_encoders

    reg = registries()
    sections: dict[str, list[str]] = {}
    configs = _configs_dir()
    if configs is not None:
        shown = configs.relative_to(Path.cwd()) if configs.is_relative_to(Path.cwd()) else configs
        sections[f"configs ({shown}/, --config FILE)"] = [
            f"{d.name}: " + ", ".join(p.name for p in sorted(d.glob("*.yaml"))) for d in sorted(configs.iterdir())
            if d.is_dir() and any(d.glob("*.yaml"))]
    sections["methods (method.name)"] = [", ".join(reg["methods"])]
    sections["policies (policy.name)"] = [", ".join(reg["policies"])]
    sections["encoders (encoder.name, arch.name)"] = [
        "torchvision: " + ", ".join(torchvision_encoders()),
        "timm:<model>: any of timm.list_models(), e.g. timm:resnet18, timm:vit_small_patch16_224",
        "hf:<hub id or local dir>: a transformers AutoModel, e.g. hf:google/vit-base-patch16-224, hf:./my_model"]
    sections["datasets (data.name)"] = [", ".join(reg["datasets"])]
    sections["loggers (train.loggers)"] = [", ".join(reg["loggers"])]
    sections["optimizers (optim.name)"] = [", ".join(reg["optimizers"])]
    sections["schedules (optim.schedule)"] = [", ".join(reg["schedules"])]
    return sections


def list_command(argv: list[str]) -> int:
    sections = list_sections()
    if argv and argv[0] in ("-h", "--help"):
        print("usage: reprlab list [" + " | ".join(s.split()[0] for s in sections) + "]")
        return 0
    if argv:
        picked = {t: v for t, v in sections.items() if t.split()[0] == argv[0]}
        if not picked:
            from reprlab.config import ConfigError

            raise ConfigError(f"unknown list {argv[0]!r}; choose from {[s.split()[0] for s in sections]}")
        sections = picked
    for title, entries in sections.items():
        print(f"{title}:")
        for entry in entries:
            print("\n".join(textwrap.wrap(entry, WIDTH, initial_indent="  ", subsequent_indent="      ")))
    return 0


# --------------------------------------------------------------------------------------------- stages


class _StageParser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:  # one line, not usage + message
        from reprlab.config import ConfigError

        raise ConfigError(f"{message}; see `{self.prog} --help`")


def _run(stage: str, config: Any) -> Path:
    if stage == "pretrain":
        from reprlab.stages.pretrain import pretrain

        return pretrain(config)
    if stage == "finetune":
        from reprlab.stages.finetune import finetune

        return finetune(config)
    from reprlab.stages.evaluate import evaluate

    return evaluate(config)


def run_stage(stage: str, argv: list[str]) -> int:
    """``reprlab <stage> [--config FILE] [key=value ...]``: load and check the config, run, print the run dir."""
    parser = _StageParser(prog=f"reprlab {stage}", add_help=False)
    parser.add_argument("-h", "--help", action="store_true")
    parser.add_argument("--config", "-c")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args(argv)
    if args.help:
        print(stage_help(stage), end="")
        return 0
    overrides = list(args.overrides)
    if stage == "evaluate":  # `encoder=runs/x` is shorthand for a single-entry `encoders` list
        overrides = [f"encoders=[{o.split('=', 1)[1]}]" if o.startswith("encoder=") else o for o in overrides]
    from reprlab import config as schema
    from reprlab import distributed

    config = schema.load_config(getattr(schema, STAGES[stage]), args.config, overrides)

    try:
        run_dir = _run(stage, config)
        if distributed.is_main():
            print(f"wrote {run_dir}")
    finally:
        distributed.teardown()
    return 0


def main(argv: list[str] | None = None) -> int:
    """``reprlab <command> ...``; returns the exit code (0, 2 for a user's error, 130 when interrupted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(top_help(), end="", file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command in ("-V", "--version"):
        print(f"reprlab {__version__}")
        return 0
    if command in STAGES:
        return _guard(lambda: run_stage(command, rest), debug, interrupted="interrupted: the last checkpoint "
                      "(state.pt) in the run directory is intact; rerun the same command to resume")
    if command == "export":
        from reprlab.export import main as export_main

        return _guard(lambda: export_main(rest), debug)
    if command == "list":
        return _guard(lambda: list_command(rest), debug)
    _report(f"unknown command {command!r}; choose from {list(COMMANDS)} (or --version); see `reprlab --help`")
    return 2


def stage_main(stage: str) -> int:
    """Entry for scripts/<stage>.py: ``python scripts/pretrain.py --config ... key=value`` (``reprlab <stage>``)."""
    return main([stage, *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
