"""The evaluation report: written by evaluate(), same content in markdown and HTML, pictures that open."""

import json
import re
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from reprlab.config import EncoderConfig
from reprlab.evaluate.plots import _loss_points, confusion_matrix, embed_2d, plot_training_curves
from reprlab.evaluate.report import Document, read_metrics_log, write_report
from reprlab.stages.evaluate import evaluate

sys.path.insert(0, str(Path(__file__).parent))
from test_evaluate import make_run_dir, tiny_config  # noqa: E402 - shared tiny fixtures


def assert_png(path: Path, min_side: int = 200) -> None:
    with Image.open(path) as image:
        image.verify()  # a truncated or corrupt file raises here
    with Image.open(path) as image:
        width, height = image.size
        assert image.format == "PNG" and min(width, height) >= min_side, (path.name, image.size)
        # not a blank canvas: a picture has many distinct colours
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 16) or range(1 << 16)) > 50, path.name


def test_evaluate_writes_a_report_whose_images_open(tmp_path):
    run_dir = make_run_dir(tmp_path / "runs" / "ae_tiny", method="autoencoder")
    Image.new("RGB", (64, 32), (200, 30, 30)).save(run_dir / "reconstructions.png")
    cfg = tiny_config(tmp_path, [str(run_dir), "pixels"], report=True, report_map="pca", arch=EncoderConfig())
    out = evaluate(cfg)

    markdown, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    md_images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)
    html_images = re.findall(r'<img src="([^"]+)"', page)
    assert md_images == html_images  # same content in both
    expected = {"embedding_map.png", "confusion.png", "retrieval_ae_tiny.png", "retrieval_pixels.png",
                "training_curves.png", "reconstructions_ae_tiny.png"}
    assert set(md_images) == expected
    for name in expected - {"reconstructions_ae_tiny.png"}:  # that one is a copy of the run's own file
        assert_png(out / name)
    copied = (out / "reconstructions_ae_tiny.png").read_bytes()
    assert copied == (run_dir / "reconstructions.png").read_bytes()

    summary = json.loads((out / "metrics.json").read_text())
    for label in summary["encoders"]:  # the comparison table, once per document, a row per encoder
        assert f"| {label} |" in markdown and f"<td>{label}</td>" in page
    assert markdown.count("| encoder |") == 1 and page.count("<table>") == 1


def test_document_renders_the_same_blocks_to_markdown_and_html():
    doc = Document()
    doc.heading("Title <1>", 1)
    doc.paragraph("numbers on **test**, dataset `digits`")
    doc.table(["encoder", "top-1"], [["a & b", "90.00"]])
    doc.image("map.png", "a map")
    markdown, page = doc.markdown(), doc.html("t")
    assert markdown.splitlines()[0] == "# Title <1>" and "| a & b | 90.00 |" in markdown
    assert "![a map](map.png)" in markdown
    assert "<h1>Title &lt;1&gt;</h1>" in page and "<b>test</b>" in page and "<code>digits</code>" in page
    assert "<td>a &amp; b</td>" in page and '<img src="map.png" alt="a map">' in page


def test_confusion_matrix_counts_by_hand():
    labels = torch.tensor([0, 0, 1, 2, 2, 2])
    predictions = torch.tensor([0, 1, 1, 2, 0, 2])
    assert confusion_matrix(predictions, labels, 3).tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]


def test_embed_2d_pca_and_tsne():
    features = torch.cat([torch.randn(20, 8) + 5 * torch.eye(8)[0], torch.randn(20, 8) - 5 * torch.eye(8)[0]])
    for method in ("pca", "tsne"):
        points = embed_2d(features, method)
        assert points.shape == (40, 2)
        # two well separated clusters stay separated along some direction of the map
        gap = points[:20].mean(0) - points[20:].mean(0)
        spread = points[:20].std(0) + points[20:].std(0)
        assert (abs(gap) > spread).any(), method
    with pytest.raises(ValueError, match="unknown map method 'umap'"):
        embed_2d(features, "umap")


def test_training_curves_need_a_loss_and_skip_broken_lines(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1, "step": 1, "loss": 2.0}\n{"epoch": 1, "st')
    assert read_metrics_log(tmp_path) == [{"epoch": 1, "step": 1, "loss": 2.0}]
    assert plot_training_curves({"run": [{"epoch": 1, "val_top1": 0.5}]}, tmp_path / "none.png") is None
    path = plot_training_curves({"run": read_metrics_log(tmp_path)}, tmp_path / "curves.png")
    assert path is not None and Image.open(path).size[0] > 200


def test_loss_curve_puts_epoch_means_at_the_epoch_last_step():
    records = [{"epoch": 1, "step": 5, "loss": 3.0}, {"epoch": 1, "step": 10, "loss": 2.0},
               {"epoch": 1, "event": "epoch_end", "loss": 2.5, "knn_top1": 0.3},
               {"epoch": 2, "step": 15, "loss": 1.0}, {"epoch": 2, "event": "epoch_end", "loss": 1.2}]
    assert _loss_points(records) == ([(5, 3.0), (10, 2.0), (15, 1.0)], [(10, 2.5), (15, 1.2)])


def test_write_report_without_encoders_still_writes_both_files(tmp_path):
    from reprlab.evaluate.report import ReportData

    image, label = torch.zeros(1, 1, 4, 4, dtype=torch.uint8), torch.zeros(1).long()
    data = ReportData(title="empty", summary={}, headers=["encoder"], rows=[], class_names=["a"],
                      train_images=image, train_labels=label, test_images=image, test_labels=label,
                      map_index=label, query_index=label)
    written = write_report(tmp_path, data)
    assert [p.name for p in written] == ["report.md", "report.html"]


def test_training_curves_give_each_run_its_own_loss_panel_with_labeled_axes(tmp_path, monkeypatch):
    """SimCLR's and rotation's losses used to share one unlabeled axis."""
    import reprlab.evaluate.plots as plots

    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or path)
    logs = {"SimCLR": [{"epoch": 1, "step": 5, "loss": 6.0}, {"epoch": 1, "event": "epoch_end", "loss": 6.0,
                                                              "knn_top1": 0.4, "effective_rank": 30.0}],
            "rotation": [{"epoch": 1, "step": 5, "loss": 1.3}, {"epoch": 1, "event": "epoch_end", "loss": 1.3,
                                                                "knn_top1": 0.3}]}
    plot_training_curves(logs, tmp_path / "curves.png")
    axes = [ax for ax in figures[0].axes if ax.get_visible() and ax.axison]
    titles = [ax.get_title() for ax in axes]
    assert titles[:2] == ["SimCLR: training loss", "rotation: training loss"]
    assert "kNN top-1 on val (monitor)" in titles and "effective rank (monitor)" in titles
    assert all(ax.get_xlabel() and ax.get_ylabel() for ax in axes)


def test_image_rows_are_titled(tmp_path, monkeypatch):
    import reprlab.evaluate.plots as plots

    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or path)
    rows = [torch.rand(3, 1, 8, 8), torch.rand(3, 1, 8, 8)]
    plots.plot_image_rows(rows, ["input", "reconstruction"], tmp_path / "r.png")
    first_column = figures[0].axes[0::3]
    assert [ax.get_ylabel() for ax in first_column] == ["input", "reconstruction"]
