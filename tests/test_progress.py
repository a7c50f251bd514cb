"""Progress bars of the data side: the folder and shard scans and the in-memory decode show a bar with images/s
(and the ETA where the total is known) on a terminal when asked, and nothing otherwise."""

from __future__ import annotations

import io
import sys
import tarfile
from pathlib import Path

import torch
from torchvision.io import encode_png, write_png

from reprlab.data import progress
from reprlab.data.datasets import load_dataset


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _terminal(monkeypatch) -> _Terminal:
    """stderr as a terminal, and bars that show at once (not after DELAY_S). Called in the test itself: pytest
    puts its own sys.stderr back between a fixture's setup and the test."""
    out = _Terminal()
    monkeypatch.setattr(sys, "stderr", out)
    monkeypatch.setattr(progress, "DELAY_S", 0.0)
    return out


def _folder(root: Path) -> Path:
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for j in range(6):
            write_png(torch.full((3, 9, 9), 20 * j, dtype=torch.uint8), str(root / c / f"{j}.png"))
    return root


def test_scan_and_decode_show_bars_with_rates_on_a_terminal(tmp_path: Path, monkeypatch) -> None:
    terminal = _terminal(monkeypatch)
    load_dataset(f"folder:{_folder(tmp_path / 'f')}", image_size=8, val_fraction=0, stream=False)
    shown = terminal.getvalue()
    assert "scanning" in shown and "decoding 12 images" in shown and "img/s" in shown
    assert "0/12 [00:00<?" in shown  # a total: the decode bar has a percentage and an ETA (after the "<")
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        for i in range(3):
            data = encode_png(torch.zeros(3, 4, 4, dtype=torch.uint8)).numpy().tobytes()
            info = tarfile.TarInfo(f"{i}.png")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    load_dataset(f"shards:{tmp_path / 's.tar'}", image_size=8, val_fraction=0, stream=True)
    assert "scanning 1 shards" in terminal.getvalue() and "shard/s" in terminal.getvalue()


def test_no_bar_when_not_asked_or_not_a_terminal(tmp_path: Path, monkeypatch) -> None:
    root = _folder(tmp_path / "f")
    terminal = _terminal(monkeypatch)
    load_dataset(f"folder:{root}", image_size=8, val_fraction=0, stream=False, progress=False)
    assert terminal.getvalue() == ""
    piped = io.StringIO()  # not a terminal: tqdm's disable=None
    monkeypatch.setattr(sys, "stderr", piped)
    load_dataset(f"folder:{root}", image_size=8, val_fraction=0, stream=False)
    assert piped.getvalue() == ""
