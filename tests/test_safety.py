"""Safe loading: a malicious pickle where a checkpoint should be is refused before any of it runs; corrupt or
truncated checkpoints give a CheckpointError naming the file, with no torch/safetensors traceback attached."""

from __future__ import annotations

import hashlib
import io
import json
import pathlib
import pickle
import re
import traceback
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from reprlab import checkpoint, contracts
from reprlab.checkpoint import CheckpointError, load_encoder, load_state, load_weights
from reprlab.data.datasets import ImageSet
from reprlab.data.loader import Batches
from reprlab.engine import FitOptions, fit

ROOT = Path(__file__).resolve().parents[1]


class Malicious:
    """Unpickling this creates ``marker``: the proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def plant(path: Path, marker: Path, as_torch_save: bool = True, checksum: bool = True) -> None:
    """A malicious file; with ``checksum`` it carries a valid state checksum (anyone can compute one), so only
    the weights-only unpickler stands between it and the payload."""
    payload = {"model": Malicious(marker), "epoch": 0}
    if as_torch_save:
        buffer = io.BytesIO()
        torch.save(payload, buffer)  # the zip format torch.load reads
        body = buffer.getvalue()
    else:
        body = pickle.dumps(payload)  # a bare pickle
    trailer = checkpoint.DIGEST_MAGIC + hashlib.sha256(body).hexdigest().encode() if checksum else b""
    path.write_bytes(body + trailer)


def assert_clean(err: CheckpointError, path: Path) -> None:
    """Names the file; no chained exception and no frame from inside torch or safetensors."""
    assert str(path) in str(err)
    assert err.__cause__ is None and err.__suppress_context__
    text = "".join(traceback.format_exception(err))
    assert not re.search(r"torch[/\\]serialization\.py|safetensors[/\\]torch\.py|_weights_only_unpickler", text)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("as_torch_save", [True, False])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, as_torch_save):
    marker = tmp_path / "pwned"
    state = tmp_path / "state.pt"
    plant(state, marker, as_torch_save)
    with open(state, "rb") as f:  # the payload is live: plain pickle would run it
        assert b"touch" in f.read()
    with pytest.raises(CheckpointError, match="refusing to load") as caught:
        load_state(state)
    if as_torch_save:  # the zip format gets as far as naming the object it refused
        assert "could run code" in str(caught.value)
    assert_clean(caught.value, state)
    assert not marker.exists()


def test_fit_refuses_a_malicious_resume_state(tmp_path):
    marker = tmp_path / "pwned"
    plant(tmp_path / "state.pt", marker)
    task = Task()
    data = ImageSet(torch.zeros(8, 1, 2, 2, dtype=torch.uint8), torch.zeros(8, dtype=torch.long), ["a"])
    with pytest.raises(CheckpointError, match=r"refusing to load .*state\.pt.*train\.resume=false"):
        fit(task, Batches(data, 4), torch.optim.SGD(task.parameters(), lr=0.1), None,
            FitOptions(epochs=1, device=torch.device("cpu"), run_dir=tmp_path, progress=False))
    assert not marker.exists()


class Task(contracts.Task):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 1)

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"loss": self.linear(batch["images"].flatten(1).float()).pow(2).mean()}


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_planted_file_without_our_checksum_is_refused_before_unpickling(tmp_path):
    marker = tmp_path / "pwned"
    plant(tmp_path / "state.pt", marker, checksum=False)
    with pytest.raises(CheckpointError, match="has no checksum") as caught:
        load_state(tmp_path / "state.pt")
    assert_clean(caught.value, tmp_path / "state.pt")
    assert not marker.exists()


def test_truncated_resume_state(tmp_path):
    path = tmp_path / "state.pt"
    checkpoint.save_state(path, {"model": {"w": torch.randn(100, 100)}})
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated") as caught:
        load_state(path)
    assert_clean(caught.value, path)


def test_garbage_resume_state(tmp_path):
    path = tmp_path / "state.pt"
    path.write_bytes(b"\x00\x01 not a checkpoint at all")
    with pytest.raises(CheckpointError, match="no checksum") as caught:
        load_state(path)
    assert_clean(caught.value, path)
    body = b"\x00\x01 not a checkpoint at all"  # garbage that carries a valid checksum
    path.write_bytes(body + checkpoint.DIGEST_MAGIC + hashlib.sha256(body).hexdigest().encode())
    with pytest.raises(CheckpointError, match="corrupt or not a reprlab checkpoint") as caught:
        load_state(path)
    assert_clean(caught.value, path)


def test_a_byte_changed_inside_a_weight_tensor_is_refused(tmp_path):
    """Before the checksum, such a state loaded silently and a finished rerun re-exported the corrupted weights."""
    path = tmp_path / "state.pt"
    weight = torch.zeros(1000)
    checkpoint.save_state(path, {"model": {"w": weight}})
    data = bytearray(path.read_bytes())
    at = data.find(bytes(weight[:64].numpy().tobytes()))  # the tensor's storage, inside the zip
    assert at > 0
    data[at + 100] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="no longer match the checksum") as caught:
        load_state(path)
    assert_clean(caught.value, path)


def encoder_run(tmp_path: Path) -> tuple[Path, nn.Module]:
    """A run directory holding a small torchvision ResNet."""
    from reprlab.models.encoders import create_encoder

    torch.manual_seed(0)
    encoder = create_encoder("resnet18", cifar_stem=True)
    checkpoint.save_encoder(tmp_path, encoder, {"method": "test"})
    return tmp_path, encoder


def test_encoder_round_trip_and_corrupt_weights(tmp_path):
    run_dir, encoder = encoder_run(tmp_path)
    loaded = load_encoder(run_dir)
    assert all(torch.equal(a, b) for a, b in zip(encoder.state_dict().values(), loaded.state_dict().values()))
    weights = run_dir / "encoder.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated
    with pytest.raises(CheckpointError, match="corrupt, truncated or not safetensors") as caught:
        load_encoder(run_dir)
    assert_clean(caught.value, weights)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickle_disguised_as_safetensors_is_refused(tmp_path):
    run_dir, _ = encoder_run(tmp_path)
    marker = tmp_path / "pwned"
    plant(run_dir / "encoder.safetensors", marker, as_torch_save=False)
    with pytest.raises(CheckpointError, match="not safetensors"):
        load_encoder(run_dir)
    module = nn.Linear(2, 2)
    plant(tmp_path / "w.safetensors", marker)
    with pytest.raises(CheckpointError, match="not safetensors"):
        load_weights(tmp_path / "w.safetensors", module)
    assert not marker.exists()


def test_corrupt_meta_json_and_missing_run(tmp_path):
    run_dir, _ = encoder_run(tmp_path)
    (run_dir / "meta.json").write_text("{ not json")
    with pytest.raises(CheckpointError, match=r"meta\.json is not valid JSON"):
        load_encoder(run_dir)
    with pytest.raises(CheckpointError, match="is not a run directory"):
        load_encoder(tmp_path / "nope")


def test_the_package_never_unpickles_without_weights_only():
    """Every torch.load in reprlab passes weights_only=True (pickle.load is not used at all)."""
    for path in (ROOT / "reprlab").rglob("*.py"):
        source = path.read_text()
        assert "pickle.load" not in source, path
        for call in re.findall(r"torch\.load\(([^)]*)\)", source):
            assert "weights_only=True" in call, f"{path}: torch.load({call})"


def test_cli_reports_a_bad_checkpoint_without_a_traceback(tmp_path, capsys):
    from reprlab.cli import main

    run_dir, _ = encoder_run(tmp_path / "run")
    (run_dir / "encoder.safetensors").write_bytes(b"garbage")
    meta = json.loads((run_dir / "meta.json").read_text())
    assert meta["encoder"]["name"] == "resnet18"
    code = main(["finetune", f"encoder={run_dir}", f"out_dir={tmp_path}", "data.limit=60", "train.epochs=1",
                 "train.device=cpu", "train.progress=false"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: cannot read weights file") and "Traceback" not in err
