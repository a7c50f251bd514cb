"""reprlab export: each format's folder loads in a fresh interpreter that cannot import reprlab, through the
snippet in the folder's own README.md, and gives the features of ``load_encoder(run_dir)`` on fixed images."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from reprlab.checkpoint import load_encoder, save_encoder
from reprlab.export import ExportError, export, main
from reprlab.export.source import resolve_input_size
from reprlab.models.encoders import PatchPooling, create_encoder

REPO = Path(__file__).resolve().parents[1]

# Before the snippet: drop the repo and reprlab's editable-install finder from the import system and put a
# blocker in front (so a regular install is no way in either), then prove `import reprlab` fails. A virtual
# environment inside the repo (.venv) keeps its site-packages: that is where numpy and torch come from.
PRELUDE = f"""\
import importlib.abc
import sys

sys.path[:] = [p for p in sys.path if p and (not p.startswith({str(REPO)!r}) or p.startswith(sys.prefix))]
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]


class NoReprlab(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "reprlab":
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)


sys.meta_path.insert(0, NoReprlab())
try:
    import reprlab
except ImportError:
    pass
else:
    raise SystemExit(f"reprlab is importable from {{reprlab.__file__}}")
"""
SAVE = """
import numpy as np

np.savez("out.npz", **{k: np.asarray(v) for k, v in dict(globals()).items() if k.startswith("features")})
"""


def readme_snippet(folder: Path) -> str:
    """The Python block of the folder's README, reading the test's images instead of random ones."""
    block = re.search(r"```python\n(.*?)```", (folder / "README.md").read_text(), re.S).group(1)
    block, count = re.subn(r"^images = .*$", 'images = np.load("images.npy")', block, flags=re.M)
    assert count == 1, block
    return block


def load_without_reprlab(folder: Path, images: np.ndarray, work: Path, extra: str = "") -> dict[str, np.ndarray]:
    """Run the README snippet (+ ``extra``) in ``python -I`` from ``work``; every ``features*`` it defines."""
    work.mkdir(exist_ok=True)
    np.save(work / "images.npy", images)
    script = PRELUDE + readme_snippet(folder) + extra + SAVE
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    done = subprocess.run([sys.executable, "-I", "-c", script], cwd=work, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    with np.load(work / "out.npz") as out:
        return dict(out)


def test_the_subprocess_cannot_import_reprlab(tmp_path):
    """The guard the tests above rely on: a snippet that needs reprlab fails there."""
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "README.md").write_text(
        "```python\nimport numpy as np\nimages = 0\nfrom reprlab.checkpoint import load_encoder\n```\n")
    with pytest.raises(AssertionError, match="No module named 'reprlab"):
        load_without_reprlab(tmp_path / "export", fixed_images(2), tmp_path / "user")


def reference(run_dir: Path, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return load_encoder(run_dir)(torch.from_numpy(images)).numpy()


def fixed_images(size: int, batch: int = 3) -> np.ndarray:
    """Three images: the exports were traced with two, so the batch axis is shown to be free."""
    return np.random.default_rng(0).random((batch, 3, size, size), dtype=np.float32)


@pytest.fixture(scope="module")
def resnet_run(tmp_path_factory) -> Path:
    """torchvision ResNet-18 with the CIFAR stem; the run's config says 16 px images."""
    run_dir = tmp_path_factory.mktemp("resnet_run")
    torch.manual_seed(0)
    save_encoder(run_dir, create_encoder("resnet18", cifar_stem=True),
                 {"method": "test", "dataset": "cifar10", "config": {"data": {"name": "cifar10", "image_size": 16}}})
    return run_dir


@pytest.fixture(scope="module")
def timm_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("timm_run")
    torch.manual_seed(0)
    save_encoder(run_dir, create_encoder("timm:test_resnet"), {"method": "test"})
    return run_dir


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory) -> Path:
    """A tiny HF ViT (16 px, pooler) saved with save_pretrained, then used as `hf:<dir>` with pretrained=True."""
    from transformers import ViTConfig, ViTModel

    base = tmp_path_factory.mktemp("vit_run")
    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       image_size=16, patch_size=8)
    torch.manual_seed(0)
    ViTModel(config).save_pretrained(base / "tiny-vit")
    save_encoder(base / "run", create_encoder(f"hf:{base / 'tiny-vit'}", pretrained=True), {"method": "test"})
    return base / "run"


def test_torchvision_export_loads_with_torchvision_alone(resnet_run, tmp_path):
    (resnet_run / "export" / "torchvision").mkdir(parents=True, exist_ok=True)
    (resnet_run / "export" / "torchvision" / "reprlab_export.json").write_text("{}")  # a previous export
    (resnet_run / "export" / "torchvision" / "stale.bin").write_bytes(b"old")
    folder = export(resnet_run, "torchvision")
    assert folder == (resnet_run / "export" / "torchvision").resolve()
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors",
                                                        "reprlab_export.json"]  # replaced whole
    config = json.loads((folder / "config.json").read_text())
    assert config["constructor"] == "torchvision.models.resnet18" and config["input_size"] == [3, 16, 16]
    assert config["replace_modules"] == {
        "conv1": "torch.nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)",
        "maxpool": "torch.nn.Identity()", "fc": "torch.nn.Identity()"}
    assert config["mean"] == [0.485, 0.456, 0.406] and config["std"] == [0.229, 0.224, 0.225]
    images = fixed_images(16)
    out = load_without_reprlab(folder, images, tmp_path / "user")
    np.testing.assert_allclose(out["features"], reference(resnet_run, images), rtol=0, atol=1e-5)
    manifest = json.loads((folder / "reprlab_export.json").read_text())
    assert manifest["feature_dim"] == 512 and manifest["source_run"] == str(resnet_run.resolve())
    assert "fc replaced by Identity" in manifest["features"]


def test_timm_export_loads_with_timm_alone(timm_run, tmp_path):
    folder = export(timm_run, "timm", tmp_path / "timm", input_size=16)
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "test_resnet" and config["num_classes"] == 0
    cfg = config["pretrained_cfg"]
    assert cfg["input_size"] == [3, 16, 16] and cfg["mean"] == [0.5] * 3 and cfg["crop_pct"] == 1.0
    images = fixed_images(16)
    other_ways = """

def run(model):
    with torch.no_grad():
        return model.eval()((torch.from_numpy(images) - mean) / std)


features_local_dir = run(timm.create_model(f"local-dir:{folder}", pretrained=True))
weights = f"{folder}/model.safetensors"
features_checkpoint = run(timm.create_model("test_resnet", num_classes=0, checkpoint_path=weights))
"""
    out = load_without_reprlab(folder, images, tmp_path / "user", other_ways)
    expected = reference(timm_run, images)
    for name in ("features", "features_local_dir", "features_checkpoint"):
        np.testing.assert_allclose(out[name], expected, rtol=0, atol=1e-5, err_msg=name)


def test_hf_export_loads_with_transformers_alone(vit_run, tmp_path):
    folder = export(vit_run, "hf", tmp_path / "hf")
    assert "_reprlab" not in json.loads((folder / "config.json").read_text())
    processor = json.loads((folder / "preprocessor_config.json").read_text())
    assert processor["image_mean"] == [0.5] * 3 and processor["size"] == {"height": 16, "width": 16}
    manifest = json.loads((folder / "reprlab_export.json").read_text())
    assert manifest["output"] == "CLS token after the final norm"  # an HF ViT pools its CLS token by default
    images = fixed_images(16)
    out = load_without_reprlab(folder, images, tmp_path / "user")
    np.testing.assert_allclose(out["features"], reference(vit_run, images), rtol=0, atol=1e-5)


def test_onnx_export_runs_on_onnxruntime_alone(resnet_run, tmp_path):
    folder = export(resnet_run, "onnx", tmp_path / "onnx")
    images = fixed_images(16)
    checks = """
assert "torch" not in sys.modules, "the ONNX snippet imported torch"
assert session.get_inputs()[0].shape == ["batch", 3, 16, 16], session.get_inputs()[0].shape
"""
    out = load_without_reprlab(folder, images, tmp_path / "user", checks)
    np.testing.assert_allclose(out["features"], reference(resnet_run, images), rtol=0, atol=1e-4)
    assert json.loads((folder / "reprlab_export.json").read_text())["max_abs_diff_at_export"] < 1e-4


def test_torchscript_export_keeps_normalization_and_resize_inside(vit_run, tmp_path):
    folder = export(vit_run, "torchscript", tmp_path / "ts", input_size=24)  # the encoder resizes 24 -> 16 px
    images = fixed_images(24)
    out = load_without_reprlab(folder, images, tmp_path / "user")
    np.testing.assert_allclose(out["features"], reference(vit_run, images), rtol=0, atol=1e-5)


def test_patch_pooled_encoders_export_traced_only(tmp_path):
    torch.manual_seed(0)
    encoder = create_encoder("timm:test_resnet").pool_patches(PatchPooling(grid=3, size=8))
    save_encoder(tmp_path / "run", encoder, {"method": "jigsaw"})
    with pytest.raises(ExportError, match="patch_pooling.*--format onnx or torchscript"):
        export(tmp_path / "run", "timm", input_size=24)
    folder = export(tmp_path / "run", "torchscript", input_size=24)  # checked against the encoder on export
    manifest = json.loads((folder / "reprlab_export.json").read_text())
    assert manifest["encoder"]["patch_pooling"]["grid"] == 3 and "3x3 grid" in manifest["features"]
    assert manifest["max_abs_diff_at_export"] < 1e-5


def test_formats_refuse_encoders_of_another_library(resnet_run, timm_run, vit_run):
    with pytest.raises(ExportError, match=r"--format timm needs a timm encoder.*use --format torchvision"):
        export(resnet_run, "timm")
    with pytest.raises(ExportError, match=r"use --format timm, onnx or torchscript"):
        export(timm_run, "torchvision")
    with pytest.raises(ExportError, match=r"holds 'hf:.*use --format hf"):
        export(vit_run, "timm")
    with pytest.raises(ExportError, match=r"unknown format 'tflite'; choose from"):
        export(timm_run, "tflite")


def test_input_size_comes_from_the_run(timm_run):
    encoder = load_encoder(timm_run)
    assert resolve_input_size({"config": {"data": {"name": "cifar10", "image_size": 48}}}, encoder, None) == 48
    assert resolve_input_size({"dataset": "cifar10", "config": {"data": {"name": "cifar10"}}}, encoder, None) == 32
    assert resolve_input_size({"dataset": "folder:/data/x"}, encoder, None) == 64
    assert resolve_input_size({}, encoder, None) == 160  # timm's pretrained_cfg of test_resnet
    assert resolve_input_size({"dataset": "digits"}, encoder, 12) == 12
    with pytest.raises(ExportError, match="--input-size 32"):
        resolve_input_size({}, encoder, 0)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err


def test_command_line_errors_are_one_line_with_exit_code_2(timm_run, tmp_path, capsys):
    assert main(["--help"]) == 0
    assert "reprlab export runs/" in capsys.readouterr().out  # the examples
    assert main([str(timm_run), "--format", "tflite"]) == 2
    assert "'tflite'" in one_line_error(capsys)
    assert main([str(timm_run)]) == 2
    assert "--format" in one_line_error(capsys)
    assert main([str(tmp_path / "nope"), "--format", "onnx"]) == 2
    assert "is not a run directory" in one_line_error(capsys)
    assert main([str(timm_run), "--format", "torchvision"]) == 2
    assert "use --format timm" in one_line_error(capsys)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    assert main([str(timm_run), "--format", "timm", "--out", str(tmp_path / "mine")]) == 2
    assert "not a reprlab export" in one_line_error(capsys)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_push_to_hub_uploads_the_export_folder(timm_run, tmp_path, monkeypatch, capsys):
    """Offline: huggingface_hub's calls are replaced; the test checks what would be uploaded."""
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    calls: list[tuple[str, dict]] = []

    def create_repo(repo_id, **kwargs):
        calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))

    def upload_folder(**kwargs):
        calls.append(("upload_folder", {**kwargs, "files": sorted(p.name for p in Path(kwargs["folder_path"])
                                                                  .iterdir())}))
        return "https://huggingface.co/me/tiny/commit/0"

    monkeypatch.setattr(huggingface_hub, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub, "upload_folder", upload_folder)
    out = tmp_path / "hub"
    args = [str(timm_run), "--format", "timm", "--out", str(out), "--input-size", "16", "--push-to-hub", "me/tiny"]
    assert main(args) == 0
    assert "uploaded to https://huggingface.co/me/tiny" in capsys.readouterr().out
    (_, created), (_, uploaded) = calls
    assert created == {"repo_id": "me/tiny", "exist_ok": True}
    assert uploaded["repo_id"] == "me/tiny" and Path(uploaded["folder_path"]) == out.resolve()
    assert uploaded["files"] == ["README.md", "config.json", "model.safetensors", "reprlab_export.json"]
    assert (out / "README.md").read_text().startswith("---\nlibrary_name: timm\n")  # the Hub's model card

    def fail(**kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(huggingface_hub, "upload_folder", fail)
    assert main(args) == 2
    assert "uploading it to 'me/tiny' failed (ConnectionError: no network)" in one_line_error(capsys)
    assert (out / "model.safetensors").is_file()  # the export itself is kept
    assert main([str(timm_run), "--format", "timm", "--out", str(tmp_path / "x"), "--push-to-hub", "a b"]) == 2
    assert "is not a repo id" in one_line_error(capsys) and not (tmp_path / "x").exists()
