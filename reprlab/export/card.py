"""The two files every export folder carries: ``README.md`` (the loading recipe, runnable as written; also the
model card on the Hub) and ``reprlab_export.json`` (what the export is, for programs)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from reprlab.checkpoint import library_versions
from reprlab.export.source import Source, Written

MANIFEST = "reprlab_export.json"
HUB_LIBRARIES = {"timm", "transformers", "onnx"}  # library_name values the Hub knows for these folders


def features_sentence(source: Source, written: Written) -> str:
    """What the export's features are, exactly."""
    c, h, w = source.shape
    pooling = source.encoder.patch_pooling
    pooled = "" if pooling is None else (f", each image embedded as the mean over a {pooling.grid}x{pooling.grid} "
                                         f"grid of its patches")
    return (f"the (B, {source.encoder.feature_dim}) features of reprlab.load_encoder({str(source.run_dir)!r})"
            f"(images) for float RGB images (B, {c}, {h}, {w}) in [0, 1]{pooled}: {written.output}")


def manifest(source: Source, fmt: str, written: Written, files: list[str], normalized_inside: bool) -> dict:
    encoder = {"name": source.encoder.spec["name"], "kwargs": source.kwargs}
    if source.encoder.patch_pooling is not None:
        encoder["patch_pooling"] = source.encoder.spec["patch_pooling"]
    normalization = ("inside the model: feed images in [0, 1]" if normalized_inside
                     else "yours: (images - mean) / std before the model (the image processor's, for hf)")
    return {"format": fmt, "library": written.library, "source_run": str(source.run_dir), "encoder": encoder,
            "feature_dim": source.encoder.feature_dim, "input_size": source.shape, "mean": source.mean,
            "std": source.std, "normalization": normalization, "features": features_sentence(source, written),
            "files": sorted([*files, MANIFEST]), "versions": library_versions(), **written.extra}


def _sorted_imports(lines: list[str]) -> str:
    """Import lines as isort would write them: the standard library, then the rest; ``import`` before ``from``."""
    def key(line: str) -> tuple[bool, str]:
        return line.startswith("from "), line.split()[1]

    lines = [line for line in lines if line]
    stdlib = sorted((line for line in lines if line.split()[1].split(".")[0] in sys.stdlib_module_names), key=key)
    rest = sorted((line for line in lines if line not in stdlib), key=key)
    return "\n\n".join("\n".join(group) for group in (stdlib, rest) if group)


def readme(source: Source, fmt: str, written: Written, folder: Path) -> str:
    """The folder's README: what it holds and a snippet that runs as is (``images`` is the one line to change)."""
    c, h, w = source.shape
    front = f"---\nlibrary_name: {written.library}\ntags: [reprlab, image-feature-extraction]\n---\n\n" \
        if written.library in HUB_LIBRARIES else ""
    notes = "".join(f"\n{note}\n" for note in written.notes)
    lines = written.snippet.splitlines()
    split = next(i for i, line in enumerate(lines) if line and not line.startswith(("import ", "from ")))
    imports, code = _sorted_imports(["import numpy as np", *lines[:split]]), "\n".join(lines[split:])
    return f"""{front}# {source.run_dir.name}: `{source.encoder.spec['name']}` exported as {fmt}

Written by `reprlab export {source.run_dir} --format {fmt}`; it loads with {written.library} alone, without
reprlab. `features` below are {features_sentence(source, written)}.

```python
{imports}

folder = {str(folder)!r}  # this folder (from the Hub: huggingface_hub.snapshot_download(repo_id))
images = np.random.rand(2, {c}, {h}, {w}).astype(np.float32)  # yours: float32 RGB (B, {c}, {h}, {w}) in [0, 1]
{code}
```

Greyscale images: repeat them to three channels first (`images.repeat(3, axis=1)`). `reprlab_export.json`
records the source run, feature dimension, input size, mean and std.
{notes}"""


def write_card(out: Path, folder: Path, source: Source, fmt: str, written: Written, normalized_inside: bool) -> None:
    """Write README.md and reprlab_export.json into ``out``, the folder that will become ``folder``."""
    files = sorted(p.name for p in out.iterdir() if p.is_file())
    (out / "README.md").write_text(readme(source, fmt, written, folder))
    data = manifest(source, fmt, written, [*files, "README.md"], normalized_inside)
    (out / MANIFEST).write_text(json.dumps(data, indent=2) + "\n")
