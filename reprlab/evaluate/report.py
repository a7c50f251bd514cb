"""The evaluation report: ``report.md`` and ``report.html`` (same content) with PNG pictures next to them.

Pictures (drawn by ``reprlab.evaluate.plots``): a 2-D map of the test embeddings (t-SNE or PCA) coloured by
class, a retrieval grid per encoder (test queries and their nearest train images, wrong ones outlined red), kNN
confusion matrices, training curves read from each run's ``metrics.jsonl``, and autoencoder reconstructions
when a run saved ``reconstructions.png``. Nothing here computes a metric that ``metrics.json`` reports.
"""

from __future__ import annotations

import html
import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from reprlab.data.progress import bar as progress_bar
from reprlab.evaluate.plots import (
    embed_2d,
    plot_confusion_matrices,
    plot_embedding_maps,
    plot_retrieval_grid,
    plot_training_curves,
)
from reprlab.evaluate.tables import markdown_table


@dataclass
class EncoderView:
    """What the pictures of one encoder need; everything is small (at most a few thousand rows).

    map_features: (P, D) features of the map points; knn_predictions: (Q,) kNN labels on the reported split;
    neighbours / neighbour_sims: (R, k) train indices and cosine similarities of the retrieval queries."""

    label: str
    knn_predictions: Tensor
    map_features: Tensor
    neighbours: Tensor
    neighbour_sims: Tensor
    run_dir: Path | None = None


@dataclass
class ReportData:
    """The whole report: the metrics summary (as in ``metrics.json``), the table and the images it shows.

    test_* is the reported split (test, or val when there is none); map_index / query_index pick its rows."""

    title: str
    summary: dict[str, Any]
    headers: list[str]
    rows: list[list[str]]
    class_names: list[str]
    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    map_index: Tensor
    query_index: Tensor
    encoders: list[EncoderView] = field(default_factory=list)


# ------------------------------------------------------------------------------------------- document


class Document:
    """A list of blocks (heading, paragraph, table, image) rendered to both markdown and HTML."""

    def __init__(self) -> None:
        self.blocks: list[tuple[str, Any]] = []

    def heading(self, text: str, level: int = 2) -> None:
        self.blocks.append(("heading", (level, text)))

    def paragraph(self, text: str) -> None:
        self.blocks.append(("paragraph", text))

    def table(self, headers: list[str], rows: list[list[str]]) -> None:
        self.blocks.append(("table", (headers, rows)))

    def image(self, filename: str, caption: str) -> None:
        self.blocks.append(("image", (filename, caption)))

    def markdown(self) -> str:
        out = []
        for kind, value in self.blocks:
            if kind == "heading":
                out.append(f"{'#' * value[0]} {value[1]}")
            elif kind == "paragraph":
                out.append(value)
            elif kind == "table":
                out.append(markdown_table(*value))
            else:
                out.append(f"![{value[1]}]({value[0]})\n\n*{value[1]}*")
        return "\n\n".join(out) + "\n"

    def html(self, title: str) -> str:
        body = []
        for kind, value in self.blocks:
            if kind == "heading":
                body.append(f"<h{value[0]}>{html.escape(value[1])}</h{value[0]}>")
            elif kind == "paragraph":
                body.append(f"<p>{_inline_html(value)}</p>")
            elif kind == "table":
                headers, rows = value
                head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
                cells = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
                                for row in rows)
                body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{cells}</tbody></table>")
            else:
                filename, caption = (html.escape(v) for v in value)
                body.append(f'<figure><img src="{filename}" alt="{caption}">'
                            f"<figcaption>{caption}</figcaption></figure>")
        style = ("body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;"
                 "color:#222}"
                 "table{border-collapse:collapse;font-size:14px}th,td{border:1px solid #ccc;padding:4px 8px;"
                 "text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}"
                 "img{max-width:100%}figure{margin:1.5em 0}figcaption{color:#555;font-style:italic}"
                 "code{background:#f3f3f3;padding:0 3px}")
        return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
                f"<style>{style}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n")


def _inline_html(text: str) -> str:
    """Escape, then render the two markdown inline forms the report uses: `code` and **bold**."""
    text = html.escape(text)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", text)


# ------------------------------------------------------------------------------------------- the report


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", label).strip("_").lower() or "encoder"


def read_metrics_log(run_dir: Path) -> list[dict[str, Any]]:
    """The records of ``run_dir/metrics.jsonl`` (unreadable lines, e.g. a crash mid-write, are skipped)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _selection_text(summary: dict[str, Any], knn: dict[str, Any], probes: list[str]) -> tuple[str, str, str]:
    """(what the numbers were read after, the kNN setting, the probes) as they were, not as configured: with no
    val split, or no test split (then val is reported), nothing is chosen and the probes are skipped."""
    reported = summary.get("reported_on")
    first = next(iter(summary.get("encoders", {}).values()), {})  # every encoder had the same splits
    has_val = summary.get("num_images", {}).get("val", 0) > 0
    chose = reported == "test" and has_val
    if chose:
        read = "read once per encoder after every choice was made on val"
    elif reported == "val":
        read = ("read once per encoder; nothing was chosen, as the dataset has no test split and "
                "data.test_fraction is 0 (val is reported, so it cannot choose too: set data.test_fraction > 0)")
    else:
        read = ("read once per encoder; nothing was chosen, as there is no val split (the dataset has none and "
                "data.val_fraction is 0)")
    if chose and knn.get("select_on_val") and first.get("knn_selected_on", "val") == "val":
        selection = (f"k and temperature chosen on val from k in {knn.get('ks')} x temperature in "
                     f"{knn.get('temperatures')}")
    else:
        why = "knn.select_on_val is false" if not knn.get("select_on_val") else "as configured: nothing to choose on"
        selection = f"k = {knn.get('k')}, temperature = {knn.get('temperature')} ({why})"
    if probes and not chose:
        probe_text = ("skipped (val is the reported split: none is left to choose their regularisation on)"
                      if reported == "val" else "skipped (no val split to choose their regularisation on)")
    else:
        probe_text = " and ".join(probes) or "none"
    return read, selection, probe_text


def _scale_text(summary: dict[str, Any]) -> str:
    """The approximate index's measured recall, and probes skipped for features kept on disk, per encoder."""
    encoders = summary.get("encoders", {})
    recalls = {label: m["knn_recall"] for label, m in encoders.items() if "knn_recall" in m}
    text = ""
    if recalls:
        first = next(iter(recalls.values()))
        shown = ", ".join(f"{label} {r['recall']:.3f}" for label, r in recalls.items())
        text += (f" kNN index {first['index']} is approximate: its recall@{first['k']} against exact search on "
                 f"{first['queries']} seeded {summary.get('reported_on')} queries: {shown}.")
    skipped = [label for label, m in encoders.items() if "sklearn_probe_skipped" in m]
    if skipped:
        text += (f" scikit-learn probe skipped for {', '.join(skipped)}: "
                 f"{encoders[skipped[0]]['sklearn_probe_skipped']}.")
    return text


def _settings_paragraph(summary: dict[str, Any]) -> str:
    settings = summary.get("settings", {})
    knn = settings.get("knn", {})
    origin = summary.get("split_origin", {})
    sizes = ", ".join(f"{split} {n}" + (f" ({origin[split]})" if split in origin and split != "train" else "")
                      for split, n in summary.get("num_images", {}).items())
    views = summary.get("alignment_views", {})
    augmentation = ", ".join(f"{key} {value}" for key, value in views.items() if key not in ("images", "split"))
    probes = [name for name, key in (("torch (lr x weight decay chosen on val)", "linear_probe"),
                                     ("scikit-learn LogisticRegression (C chosen on val)", "sklearn_probe"))
              if settings.get(key, True)]
    read, selection, probe_text = _selection_text(summary, knn, probes)
    few = settings.get("labels_per_class")
    labeled = (f" Few-label: the kNN and retrieval banks and the probes use {few} labeled train images per class "
               f"({summary.get('labeled_train_images')} in all); label-free quality uses every train image."
               if few else "")
    return (f"Dataset `{summary.get('dataset')}` ({sizes} images); numbers on "
            f"**{summary.get('reported_on')}**, {read}. "
            f"kNN: cosine, votes weighted exp(cos / T), {selection}, backend {knn.get('backend')} "
            f"({knn.get('index')}). Probes: {probe_text}. "
            f"Retrieval: {summary.get('reported_on')} queries against "
            f"the train bank. Alignment: two SimCLR views of {views.get('images')} {views.get('split')} "
            f"images (alignment_views: {augmentation}); uniformity, effective rank and std on train "
            f"features; std x sqrt(D) is 1 for isotropic embeddings, 0 when collapsed.{labeled}"
            f"{_scale_text(summary)}")


def _map_caption(method: str, split: str, points: int, total: int) -> str:
    """What the 2-D map shows, sample size included (``report_points`` of the reported split)."""
    name = "t-SNE" if method == "tsne" else "PCA"
    if points < total:
        return (f"{name} of a seeded sample of {points} of the {total} {split} embeddings (report_points), by "
                f"class")
    return f"{name} of the {total} {split} embeddings, by class"


def write_report(out_dir: str | Path, data: ReportData, map_method: str = "tsne", seed: int = 0,
                 progress: bool = False) -> list[Path]:
    """Write ``report.md``, ``report.html`` and their PNGs into ``out_dir``; returns the paths written.
    ``progress``: a bar over the encoders' 2-D maps (t-SNE takes a while; on a terminal)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    doc, written = Document(), []
    doc.heading(data.title, 1)
    doc.paragraph(_settings_paragraph(data.summary))
    doc.table(data.headers, data.rows)
    kept_labels = data.test_labels[data.map_index]
    split = data.summary.get("reported_on", "test")

    maps = {}
    with progress_bar(len(data.encoders), f"{map_method} maps of {len(kept_labels)} points", progress,
                      unit="map") as bar:
        for view in data.encoders:
            maps[view.label] = embed_2d(view.map_features, map_method, seed)
            bar.update(1)
    if maps:
        doc.heading("Embeddings")
        path = plot_embedding_maps(maps, kept_labels, data.class_names, out_dir / "embedding_map.png",
                                   map_method, split)
        doc.image(path.name, _map_caption(map_method, split, len(kept_labels), len(data.test_labels)))
        written.append(path)

        doc.heading("kNN confusion matrices")
        predictions = {view.label: view.knn_predictions for view in data.encoders}
        path = plot_confusion_matrices(predictions, data.test_labels, data.class_names,
                                       out_dir / "confusion.png")
        doc.image(path.name, f"kNN predictions on all {len(data.test_labels)} {split} images, % of each true "
                             f"class")
        written.append(path)

        doc.heading("Retrieval")
        for view in data.encoders:
            neighbours = view.neighbours.clamp(min=0)  # (R, k) train indices
            path = plot_retrieval_grid(
                data.test_images[data.query_index], data.test_labels[data.query_index],
                data.train_images[neighbours], data.train_labels[neighbours], view.neighbour_sims,
                data.class_names, out_dir / f"retrieval_{_slug(view.label)}.png",
                f"{view.label}: nearest train images of {split} queries (red = wrong class)")
            doc.image(path.name, f"{view.label}: retrieval")
            written.append(path)

    runs = {view.label: view.run_dir for view in data.encoders if view.run_dir is not None}
    logs = {label: read_metrics_log(run_dir) for label, run_dir in runs.items()}
    curves = plot_training_curves(logs, out_dir / "training_curves.png") if any(logs.values()) else None
    if curves is not None:
        doc.heading("Training curves")
        doc.image(curves.name, "read from each run's metrics.jsonl")
        written.append(curves)
    for label, run_dir in runs.items():
        source = Path(run_dir) / "reconstructions.png"
        if source.is_file():
            target = out_dir / f"reconstructions_{_slug(label)}.png"
            shutil.copyfile(source, target)
            doc.heading(f"Reconstructions: {label}")
            doc.image(target.name, f"{label}: inputs and autoencoder reconstructions")
            written.append(target)

    (out_dir / "report.md").write_text(doc.markdown())
    (out_dir / "report.html").write_text(doc.html(data.title))
    return [out_dir / "report.md", out_dir / "report.html", *written]
