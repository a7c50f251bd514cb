"""Self-describing checkpoints: safetensors weights + JSON metadata, and atomic resume state.

Weights are only ever read from safetensors; resume state only through ``torch.load(weights_only=True)``, so a
user-supplied file is never unpickled. Every file is written to a temporary name, fsynced and renamed, so a
crash mid-write leaves the previous checkpoint intact. Resume state ends in a SHA-256 of its bytes, verified on
every load, so a state whose bytes changed (a bad disk, a copy cut short, an edit) is refused, never trained on.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import platform
import random
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import reprlab


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, corrupt, unsafe or does not fit the model."""


def _file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask  # what open() would give: mkstemp's 0600 made config.yaml and weights differ


def _no_space(err: BaseException) -> bool:
    # torch's zip writer reports a full disk as "[enforce fail at inline_container.cc:...] ... file write failed"
    return (isinstance(err, OSError) and err.errno == errno.ENOSPC) or (
        isinstance(err, RuntimeError) and ("inline_container" in str(err) or "file write failed" in str(err)))


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)``, fsync it, then rename over ``path`` (atomic on POSIX). A full disk is a
    :class:`CheckpointError` saying so; the previous ``path`` is kept either way."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:
        if not _no_space(err):
            raise
        free = shutil.disk_usage(path.parent).free / 2**20
        kept = f"the previous {path.name} is kept" if path.exists() else f"no {path.name} was written"
        raise CheckpointError(f"no space left on the device of {path.parent} to write {path.name} ({free:.0f} MiB "
                              f"free); {kept}. Free some space (or set out_dir elsewhere) and rerun the same "
                              f"command to resume") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_json(path: str | Path, data: dict) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2, default=str) + "\n"))


def library_versions() -> dict[str, str]:
    versions = {"reprlab": reprlab.__version__, "torch": torch.__version__, "python": platform.python_version()}
    for module in ("torchvision", "timm", "transformers", "faiss", "sklearn", "safetensors"):
        try:
            versions[module] = __import__(module).__version__
        except Exception:  # noqa: BLE001 - an optional library that is absent or broken is just not recorded
            pass
    return versions


def save_weights(path: str | Path, module: nn.Module) -> None:
    """Write ``module``'s state dict to ``path`` as safetensors (shared tensors handled), atomically."""
    from safetensors.torch import save_model

    atomic_write(path, lambda tmp: save_model(module, tmp))


def load_weights(path: str | Path, module: nn.Module, expected: str | None = None) -> None:
    """Strictly load safetensors weights into ``module``; errors name the file, the model it was loaded into
    (``expected``, e.g. the encoder spec) and the mismatched keys or shapes, without torch's stack trace."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    path = Path(path)
    target = expected or type(module).__name__
    if not path.is_file():
        raise CheckpointError(f"weights file {str(path)!r} does not exist")
    try:
        missing, unexpected = load_model(module, str(path), strict=False)
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"cannot read weights file {str(path)!r} (corrupt, truncated or not safetensors): "
                              f"{err}") from None
    except RuntimeError as err:  # shape mismatch: keep torch's "size mismatch for <key>: ..." lines, not its trace
        lines = [line.strip() for line in str(err).splitlines() if "size mismatch" in line] or [str(err)]
        raise CheckpointError(f"weights file {str(path)!r} does not fit {target}: {' '.join(lines[:2])}"
                              + (f" (and {len(lines) - 2} more)" if len(lines) > 2 else "")) from None
    if missing or unexpected:
        raise CheckpointError(f"weights file {str(path)!r} does not fit {target}: missing keys "
                              f"{sorted(missing)[:5]}, unexpected keys {sorted(unexpected)[:5]}")


def save_encoder(run_dir: str | Path, encoder: nn.Module, meta: dict[str, Any]) -> None:
    """Write ``encoder.safetensors`` and ``meta.json`` (encoder spec, feature_dim, versions + ``meta``)."""
    run_dir = Path(run_dir)
    save_weights(run_dir / "encoder.safetensors", encoder)
    full = {"encoder": encoder.spec, "feature_dim": encoder.feature_dim, "versions": library_versions(), **meta}
    write_json(run_dir / "meta.json", full)


def read_meta(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / "meta.json"
    if not path.is_file():
        raise CheckpointError(f"{str(run_dir)!r} is not a run directory: it has no meta.json "
                              f"(expected the output folder of scripts/pretrain.py or scripts/finetune.py)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from err


def load_encoder(path: str | Path):  # -> Encoder (import kept lazy: models pull in torchvision)
    """Rebuild the encoder saved in a run directory (``meta.json`` + ``encoder.safetensors``), strictly."""
    from reprlab.models.encoders import encoder_from_spec

    path = Path(path)
    run_dir = path.parent if path.suffix == ".safetensors" else path
    meta = read_meta(run_dir)
    spec = meta["encoder"]
    encoder = encoder_from_spec(spec)
    kwargs = {k: v for k, v in spec.get("kwargs", {}).items() if k != "hf_config"}  # HF configs are long
    load_weights(run_dir / "encoder.safetensors", encoder,
                 expected=f"the encoder {spec['name']!r} {kwargs} named in {run_dir / 'meta.json'}")
    return encoder.eval()


# --- resume state --------------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """RNG states of torch (CPU and CUDA), numpy and python as weights_only-loadable values."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


DIGEST_MAGIC = b"\nreprlab-sha256:"  # then 64 hex digits: the last 80 bytes of every state file


def save_state(path: str | Path, state: dict[str, Any]) -> None:
    """Write resume state atomically: ``torch.save`` bytes, then :data:`DIGEST_MAGIC` and their SHA-256."""

    def write(tmp: str) -> None:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        body = buffer.getbuffer()
        with open(tmp, "wb") as f:
            f.write(body)
            f.write(DIGEST_MAGIC + hashlib.sha256(body).hexdigest().encode())

    atomic_write(path, write)


def _verified_body(path: Path, start_over: str) -> io.BytesIO:
    """The torch.save bytes of a state file whose trailing SHA-256 matches them."""
    data = path.read_bytes()
    trailer = len(DIGEST_MAGIC) + 64
    if len(data) < trailer or data[-trailer:-64] != DIGEST_MAGIC:
        raise CheckpointError(f"resume state {str(path)!r} has no checksum: it is truncated, or was not written "
                              f"by this version of reprlab; {start_over}") from None
    body, digest = memoryview(data)[:-trailer], data[-64:].decode(errors="replace")
    if hashlib.sha256(body).hexdigest() != digest:
        raise CheckpointError(f"resume state {str(path)!r} is corrupt: its bytes no longer match the checksum "
                              f"written with it; {start_over}") from None
    return io.BytesIO(body)


def load_state(path: str | Path) -> dict[str, Any]:
    """Load resume state after verifying its checksum, with ``weights_only=True``: tensors and plain containers
    only, never arbitrary objects."""
    import re

    path = Path(path)
    start_over = "delete it, or set train.resume=false to start over"
    if not path.is_file():
        raise CheckpointError(f"resume state {str(path)!r} does not exist")
    body = _verified_body(path, start_over)
    try:
        return torch.load(body, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for corrupt or unsafe files
        text = str(err)
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        if found:
            raise CheckpointError(f"refusing to load {str(path)!r}: it holds Python objects other than tensors "
                                  f"({found.group(1)}), which could run code when unpickled; it was not written "
                                  f"by reprlab: {start_over}") from None
        if "Weights only load failed" in text:
            reason = re.search(r"WeightsUnpickler error:\s*(.+)", text)
            raise CheckpointError(f"refusing to load {str(path)!r}: it is corrupt or not a reprlab checkpoint "
                                  f"(weights-only unpickling failed: {reason.group(1) if reason else 'unknown'}), "
                                  f"and unpickling it fully could run code; {start_over}") from None
        first_line = text.strip().splitlines()[0][:200] if text.strip() else ""
        raise CheckpointError(f"resume state {str(path)!r} is corrupt or truncated ({type(err).__name__}: "
                              f"{first_line}); {start_over}") from None
