"""``reprlab export RUN_DIR --format F [--out DIR] [--input-size N] [--push-to-hub REPO_ID]``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from reprlab.export import FORMATS, ExportError, export

EPILOG = """\
formats:
  timm         timm encoders: model.safetensors + config.json (timm's hub layout, our mean/std/input size)
  torchvision  torchvision encoders: model.safetensors + config.json (constructor, module replacements)
  hf           hf: encoders: save_pretrained folder + preprocessor_config.json (AutoModel, AutoImageProcessor)
  onnx         any encoder: model.onnx, float images in [0, 1] -> features (onnxruntime)
  torchscript  any encoder: model.pt, float images in [0, 1] -> features (torch.jit.load)

examples:
  reprlab export runs/simclr_cifar10 --format torchvision
  reprlab export runs/simclr_cifar10 --format onnx --out exported/simclr_onnx
  reprlab export runs/simclr_hf_vit --format hf --push-to-hub my-name/simclr-vit-cifar10

Each folder's README.md holds a snippet that loads it without reprlab; reprlab_export.json says what it is."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not usage + message
        self.exit(2, f"error: {message} (see `reprlab export --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="reprlab export", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
                     description="Export a run's encoder for timm, torchvision, transformers, ONNX or TorchScript, "
                                 "loadable without reprlab.")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (encoder.safetensors + meta.json)")
    parser.add_argument("--format", "-f", required=True, choices=list(FORMATS), metavar="F",
                        help=f"what to write: {' | '.join(FORMATS)} (below)")
    parser.add_argument("--out", "-o", metavar="DIR", help="output folder (default: RUN_DIR/export/<format>/)")
    parser.add_argument("--input-size", type=int, metavar="N",
                        help="square image size the export takes (default: the run's data.image_size, else its "
                             "dataset's native size)")
    parser.add_argument("--push-to-hub", metavar="REPO_ID",
                        help="then upload the folder to this Hugging Face model repo (huggingface_hub; needs a "
                             "login or HF_TOKEN)")
    return parser


def push_to_hub(folder: Path, repo_id: str, format: str) -> str:
    """Upload ``folder`` to the Hub model repo ``repo_id`` (created if missing); returns the commit URL."""
    import huggingface_hub

    huggingface_hub.create_repo(repo_id, exist_ok=True)
    info = huggingface_hub.upload_folder(repo_id=repo_id, folder_path=str(folder),
                                         commit_message=f"reprlab export ({format})")
    return str(getattr(info, "commit_url", info))


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (2: an error, reported in one line on stderr)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:  # --help (0) or a usage error (2): a code to return, as for every other outcome
        return int(done.code or 0)
    from reprlab.checkpoint import CheckpointError

    try:
        if args.push_to_hub:  # a bad repo id fails now, not after the export
            from huggingface_hub.utils import HFValidationError, validate_repo_id

            try:
                validate_repo_id(args.push_to_hub)
            except HFValidationError as err:
                raise ExportError(f"--push-to-hub {args.push_to_hub!r} is not a repo id ({err}); give "
                                  f"'<user or org>/<name>'") from None
        out = export(args.run_dir, args.format, args.out, args.input_size)
    except (ExportError, CheckpointError) as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return 2
    print(f"exported {args.run_dir} as {args.format} to {out} (loading snippet: {out / 'README.md'})")
    if args.push_to_hub:
        try:
            url = push_to_hub(out, args.push_to_hub, args.format)
        except Exception as err:  # noqa: BLE001 - network, auth and permission errors all end the same way
            print(f"error: exported to {out}, but uploading it to {args.push_to_hub!r} failed "
                  f"({type(err).__name__}: {_one_line(err)[:300]}); log in with `hf auth login` or set HF_TOKEN, "
                  f"check the repo id, then rerun", file=sys.stderr)
            return 2
        print(f"uploaded to {url}")
    return 0
