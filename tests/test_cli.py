"""The ``reprlab`` command teaches: ``--help`` at the top and per stage (every config key with its default and
choices, the registries, two examples, plain text), ``--version``, ``reprlab list``, ``reprlab export`` wired to
reprlab.export, and one-line errors (``--debug`` for the traceback, 130 on Ctrl-C, bugs keep their traceback).

Before (issue 18): the three --help outputs were the same 10 lines with raw RST backticks and no keys, and
``reprlab --version`` answered "required: stage, overrides"."""

from __future__ import annotations

import dataclasses
import runpy
import sys
import typing
from pathlib import Path

import pytest

import reprlab
from reprlab import cli
from reprlab.cli import main
from reprlab.config import ConfigError, EvaluateConfig, FinetuneConfig, PretrainConfig, dataclass_in
from reprlab.hardware import PRECISIONS
from reprlab.optim import OPTIMIZERS

ROOT = Path(__file__).resolve().parents[1]
STAGES = {"pretrain": PretrainConfig, "finetune": FinetuneConfig, "evaluate": EvaluateConfig}


def dotted_keys(cls: type, prefix: str = "") -> list[str]:
    hints = typing.get_type_hints(cls)
    keys = []
    for f in dataclasses.fields(cls):
        section = dataclass_in(hints[f.name])
        keys += dotted_keys(section, f"{prefix}{f.name}.") if section else [prefix + f.name]
    return keys


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_version(capsys):
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.strip() == f"reprlab {reprlab.__version__}"


def test_top_level_help_names_every_command_and_the_options(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for word in ("pretrain", "finetune", "evaluate", "export", "list", "--version", "--debug", "examples:"):
        assert word in out
    assert run(capsys)[0] == 2  # no command: the help on stderr, and a usage error


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_help_lists_every_key_with_default_choices_registries_and_examples(capsys, stage):
    code, out, _ = run(capsys, stage, "--help")
    assert code == 0
    assert "``" not in out and ":class:" not in out  # plain text, no RST
    for key in dotted_keys(STAGES[stage]):
        assert f"    {key} = " in out, key
    defaults = STAGES[stage]()
    if stage != "evaluate":
        assert f"train.batch_size = {defaults.train.batch_size}" in out
        assert "one of: " + " | ".join(OPTIMIZERS) in out and "one of: " + " | ".join(PRECISIONS) in out
    examples = out.split("examples:\n")[1].split("\n\n")[0].splitlines()
    assert len(examples) == 2 and all(line.startswith(f"  reprlab {stage} ") for line in examples)
    assert "timm:<model>" in out and "hf:<hub id or local dir>" in out and "digits, npz:<dir>" in out
    if stage == "pretrain":
        assert all(f"\n  {name} " in out for name in reprlab.METHODS)
        assert "temperature=0.5" in out  # each method's parameters with their defaults
    if stage == "finetune":
        assert all(f"\n  {name} " in out for name in reprlab.POLICIES) and "decay=0.65" in out


def test_script_help_is_the_stage_help(capsys, monkeypatch):
    expected = run(capsys, "pretrain", "--help")[1]
    monkeypatch.setattr(sys, "argv", ["scripts/pretrain.py", "--help"])
    with pytest.raises(SystemExit) as caught:
        runpy.run_path(str(ROOT / "scripts" / "pretrain.py"), run_name="__main__")
    assert caught.value.code == 0 and capsys.readouterr().out == expected


def test_list_shows_configs_methods_policies_encoders_datasets_loggers(capsys):
    code, out, _ = run(capsys, "list")
    assert code == 0
    assert "simclr_digits.yaml" in out and "linear_probe_digits.yaml" in out
    for name in [*reprlab.METHODS, *reprlab.POLICIES, "resnet18", "timm:<model>", "hf:<hub id", "cifar10", "jsonl",
                 "tensorboard", "lars", "cosine"]:
        assert name in out, name
    code, out, _ = run(capsys, "list", "methods")
    assert code == 0 and "simclr" in out and "linear_probe" not in out
    code, _, err = run(capsys, "list", "gadgets")
    assert code == 2 and err.startswith("error: unknown list 'gadgets'") and len(err.splitlines()) == 1


def test_export_is_wired_to_reprlab_export(capsys, monkeypatch, tmp_path):
    import reprlab.export

    seen = []
    monkeypatch.setattr(reprlab.export, "main", lambda argv: seen.append(argv) or 0)
    assert main(["export", str(tmp_path), "--format", "onnx"]) == 0
    assert seen == [[str(tmp_path), "--format", "onnx"]]
    monkeypatch.undo()
    code, _, err = run(capsys, "export", str(tmp_path / "missing"), "--format", "onnx")  # the real one
    assert code == 2 and err.startswith("error: ") and "Traceback" not in err


def test_unknown_command_and_bad_arguments_are_one_line(capsys):
    code, _, err = run(capsys, "pretrian")
    assert code == 2 and err.count("\n") == 1 and "'pretrian'" in err and "pretrain" in err
    code, _, err = run(capsys, "pretrain", "--confg", "x.yaml")
    assert code == 2 and err.count("\n") == 1 and "--confg" in err and "reprlab pretrain --help" in err


def test_debug_shows_the_traceback_and_bugs_keep_theirs(monkeypatch):
    with pytest.raises(ConfigError, match="train.epochs=0"):
        main(["pretrain", "train.epochs=0", "--debug"])

    def crash(stage, config):
        raise RuntimeError("a bug")

    monkeypatch.setattr(cli, "_run", crash)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["pretrain", "train.device=cpu"])


def test_ctrl_c_still_exits_130_with_the_resume_hint(capsys, monkeypatch):
    def interrupted(stage, config):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_run", interrupted)
    code, _, err = run(capsys, "pretrain", "train.device=cpu")
    assert code == 130 and "rerun the same command to resume" in err
