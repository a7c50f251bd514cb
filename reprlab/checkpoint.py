"""Self-describing checkpoints: safetensors weights + JSON metadata, and atomic resume state.

Weights are only ever read from safetensors; resume state only through ``torch.load(weights_only=True)``, so a
user-supplied file is never unpickled. Every file is written to a temporary name, fsynced and renamed, so a
crash mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import platform
import random
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


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)``, fsync it, then rename over ``path`` (atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
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


def load_weights(path: str | Path, module: nn.Module) -> None:
    """Strictly load safetensors weights into ``module``; errors name the file and the mismatched keys."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {str(path)!r} does not exist")
    try:
        missing, unexpected = load_model(module, str(path), strict=False)
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"cannot read weights file {str(path)!r} (corrupt or not safetensors): {err}") from err
    except RuntimeError as err:  # shape mismatch
        raise CheckpointError(f"weights file {str(path)!r} does not fit the model: {err}") from err
    if missing or unexpected:
        raise CheckpointError(f"weights file {str(path)!r} does not fit the model: missing keys {sorted(missing)[:5]}, "
                              f"unexpected keys {sorted(unexpected)[:5]}")


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
    from reprlab.models.encoders import create_encoder

    path = Path(path)
    run_dir = path.parent if path.suffix == ".safetensors" else path
    meta = read_meta(run_dir)
    spec = meta["encoder"]
    encoder = create_encoder(spec["name"], **spec.get("kwargs", {}))
    load_weights(run_dir / "encoder.safetensors", encoder)
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


def save_state(path: str | Path, state: dict[str, Any]) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_state(path: str | Path) -> dict[str, Any]:
    """Load resume state with ``weights_only=True``: tensors and plain containers only, never arbitrary objects."""
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"resume state {str(path)!r} does not exist") from None
    except Exception as err:  # noqa: BLE001 - torch raises many types for corrupt or unsafe files
        if "weights_only" in str(err) or "Unsupported global" in str(err):
            raise CheckpointError(f"refusing to load {str(path)!r}: it holds Python objects other than tensors, "
                                  f"which could run code when unpickled; delete it or restart with resume: false") from None
        raise CheckpointError(f"resume state {str(path)!r} is corrupt or truncated ({type(err).__name__}); delete "
                              f"it to start over or set train.resume=false") from None
