"""The report's pictures, as PNG files: a 2-D map of embeddings coloured by class, kNN confusion matrices,
retrieval grids (queries and their nearest train images) and training curves.

matplotlib with the headless Agg backend; nothing here computes a metric that ``metrics.json`` reports.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

MAP_METHODS = ("tsne", "pca")
_DPI = 110


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on servers and CI
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    fig.savefig(path, dpi=_DPI, bbox_inches="tight", facecolor="white")
    _pyplot().close(fig)
    return path


def class_colors(num_classes: int) -> np.ndarray:
    """(C, 4) RGBA colours: tab10 / tab20 when they suffice, else evenly spaced hues."""
    plt = _pyplot()
    if num_classes <= 10:
        return plt.get_cmap("tab10")(np.arange(num_classes))
    if num_classes <= 20:
        return plt.get_cmap("tab20")(np.arange(num_classes))
    return plt.get_cmap("hsv")(np.linspace(0, 1, num_classes, endpoint=False))


def embed_2d(features: Tensor, method: str = "tsne", seed: int = 0) -> np.ndarray:
    """(N, 2) map of (N, D) features after L2 normalisation: PCA, or t-SNE (van der Maaten & Hinton, 2008)."""
    if method not in MAP_METHODS:
        raise ValueError(f"unknown map method {method!r}; choose from {sorted(MAP_METHODS)}")
    x = F.normalize(features.float(), dim=1).numpy().astype(np.float64)
    if len(x) < 3 or x.shape[1] < 2:
        return np.pad(x[:, :2], ((0, 0), (0, max(0, 2 - x.shape[1]))))
    if method == "pca":
        from sklearn.decomposition import PCA

        return PCA(n_components=2, random_state=seed).fit_transform(x)
    from sklearn.manifold import TSNE

    perplexity = float(min(30.0, (len(x) - 1) / 3))  # t-SNE needs perplexity < N
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)


def _grid_shape(count: int, max_cols: int = 3) -> tuple[int, int]:
    cols = min(count, max_cols)
    return math.ceil(count / cols), cols


def plot_embedding_maps(maps: dict[str, np.ndarray], labels: Tensor, class_names: list[str], path: Path,
                        method: str = "tsne", split: str = "test") -> Path:
    """One scatter panel per encoder (points coloured by class), one shared legend with the class names."""
    plt = _pyplot()
    nrows, ncols = _grid_shape(len(maps))
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 5.0 * nrows), squeeze=False)
    colors = class_colors(len(class_names))
    labels_np = labels.numpy()
    size = 14 if len(labels_np) <= 1000 else 6
    for ax, (label, points) in zip(axes.flat, maps.items()):
        for c, name in enumerate(class_names):
            mask = labels_np == c
            ax.scatter(points[mask, 0], points[mask, 1], s=size, color=colors[c], alpha=0.75, linewidths=0,
                       label=name)
        ax.set_title(label, fontsize=13)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in list(axes.flat)[len(maps):]:
        ax.axis("off")
    handles, names = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=11, markerscale=2.5,
               frameon=False, title="class")
    fig.suptitle(f"{method.upper() if method == 'pca' else 't-SNE'} of {len(labels_np)} {split} embeddings, "
                 "coloured by class", fontsize=14)
    fig.tight_layout()
    return _save(fig, path)


def confusion_matrix(predictions: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """(C, C) counts: row = true class, column = predicted class."""
    index = labels.long() * num_classes + predictions.long()
    return torch.bincount(index, minlength=num_classes * num_classes).view(num_classes, num_classes)


def plot_confusion_matrices(predictions: dict[str, Tensor], labels: Tensor, class_names: list[str],
                            path: Path) -> Path:
    """Row-normalised confusion matrices of the kNN predictions, one panel per encoder (% of the true
    class)."""
    plt = _pyplot()
    num_classes = len(class_names)
    nrows, ncols = _grid_shape(len(predictions))
    side = max(4.5, 0.45 * num_classes + 1.5)
    fig, axes = plt.subplots(nrows, ncols, figsize=(side * ncols, side * nrows), squeeze=False)
    annotate, ticks = num_classes <= 15, num_classes <= 30
    for ax, (label, predicted) in zip(axes.flat, predictions.items()):
        counts = confusion_matrix(predicted, labels, num_classes).double()
        rates = 100 * counts / counts.sum(dim=1, keepdim=True).clamp(min=1)  # (C, C) % of each true class
        accuracy = 100 * float(counts.diag().sum() / counts.sum().clamp(min=1))
        ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=100)
        if annotate:
            for i in range(num_classes):
                for j in range(num_classes):
                    value = float(rates[i, j])
                    if value >= 0.5:
                        ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=8,
                                color="white" if value > 55 else "black")
        if ticks:
            long_names = max(len(name) for name in class_names) > 3
            ax.set_xticks(range(num_classes), class_names, rotation=45 if long_names else 0,
                          ha="right" if long_names else "center", fontsize=9)
            ax.set_yticks(range(num_classes), class_names, fontsize=9)
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
        ax.set_title(f"{label}\nkNN top-1 {accuracy:.1f}%", fontsize=12)
    for ax in list(axes.flat)[len(predictions):]:
        ax.axis("off")
    fig.suptitle("kNN confusion matrices (% of each true class)", fontsize=14)
    fig.tight_layout()
    return _save(fig, path)


_FRAME_COLORS = {"query": (31, 95, 191), "right": (44, 160, 44), "wrong": (214, 39, 40)}


def _tile(image: Tensor, cell: int, frame: tuple[int, int, int], border: int) -> np.ndarray:
    """uint8 (C, H, W) -> (cell + 2 border, same, 3) RGB tile, upscaled (nearest: small images stay crisp) and
    framed in ``frame``."""
    rgb = image.expand(3, -1, -1) if image.shape[0] == 1 else image[:3]
    big = F.interpolate(rgb[None].float(), size=(cell, cell), mode="nearest")[0]  # (3, cell, cell)
    tile = np.empty((cell + 2 * border, cell + 2 * border, 3), dtype=np.uint8)
    tile[:] = frame
    tile[border:-border, border:-border] = big.round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
    return tile


def plot_retrieval_grid(query_images: Tensor, query_labels: Tensor, neighbour_images: Tensor,
                        neighbour_labels: Tensor, neighbour_sims: Tensor, class_names: list[str], path: Path,
                        title: str) -> Path:
    """Rows: a query (blue frame) and its nearest train images, framed green when the class matches, red
    when not.

    query_images (R, C, H, W) uint8, neighbour_images (R, k, C, H, W) uint8, neighbour_* (R, k). Drawn as one
    canvas (one axes), which is much faster to lay out than R x (k + 1) subplots."""
    plt = _pyplot()
    num_queries, k = neighbour_labels.shape
    side = max(query_images.shape[-2:])
    cell = side * max(1, round(72 / side))  # an integer upscale of about 72 px keeps pixels square and crisp
    border, gap, caption, query_gap = 4, 6, 30, 18
    pitch_x, pitch_y = cell + 2 * border + gap, cell + 2 * border + gap + caption
    width = (k + 1) * pitch_x + query_gap
    canvas = np.full((num_queries * pitch_y, width, 3), 255, dtype=np.uint8)
    texts = []
    for row in range(num_queries):
        true = int(query_labels[row])
        y = row * pitch_y + caption
        tile = _tile(query_images[row], cell, _FRAME_COLORS["query"], border)
        canvas[y : y + tile.shape[0], 0 : tile.shape[1]] = tile
        texts.append((cell / 2 + border, y - 3, f"query\n{class_names[true]}", "#1f5fbf", "bold"))
        for col in range(k):
            label = int(neighbour_labels[row, col])
            right = label == true
            x = (col + 1) * pitch_x + query_gap
            frame = _FRAME_COLORS["right" if right else "wrong"]
            tile = _tile(neighbour_images[row, col], cell, frame, border)
            canvas[y : y + tile.shape[0], x : x + tile.shape[1]] = tile
            texts.append((x + cell / 2 + border, y - 3,
                          f"{class_names[label]}\ncos {float(neighbour_sims[row, col]):.2f}",
                          "black" if right else "#d62728", "normal"))
    dpi = 100
    fig = plt.figure(figsize=(width / dpi, canvas.shape[0] / dpi + 0.5), dpi=dpi)
    ax = fig.add_axes((0, 0, 1, canvas.shape[0] / (canvas.shape[0] + 50)))
    ax.imshow(canvas, interpolation="nearest")
    ax.axis("off")
    for x, y, text, color, weight in texts:
        ax.text(x, y, text, ha="center", va="bottom", fontsize=8, color=color, fontweight=weight,
                linespacing=1.1)
    fig.suptitle(title, fontsize=12, y=0.995)
    fig.savefig(path, dpi=dpi, facecolor="white")
    plt.close(fig)
    return path



def _loss_points(records: list[dict[str, Any]]) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(step, loss) of the logged steps, and (last step of the epoch, epoch mean loss) of the epoch ends."""
    steps, ends, last_step = [], [], 0
    for record in records:
        if "loss" not in record:
            continue
        if record.get("event") == "epoch_end":
            ends.append((record.get("step", last_step), record["loss"]))
        elif "step" in record:
            last_step = record["step"]
            steps.append((last_step, record["loss"]))
    return steps, ends


def _plot_loss(ax: Any, records: list[dict[str, Any]]) -> None:
    steps, ends = _loss_points(records)
    line, = ax.plot(*zip(*steps), lw=1.2, alpha=0.8, label="logged steps")
    if ends:  # the epoch means, at the epoch's last step
        ax.plot(*zip(*ends), "o", color=line.get_color(), ms=4, label="epoch mean")


def plot_training_curves(logs: dict[str, list[dict[str, Any]]], path: Path) -> Path | None:
    """One loss panel per run (the losses of different methods have different scales and units), then the
    monitors logged at epoch ends (kNN top-1, effective rank) with a line per run, each with labeled axes.

    Returns None when no run logged a loss."""
    plt = _pyplot()
    panels: list[tuple[str, str, str, str]] = [  # (key, run or "", title, y label)
        ("loss", label, f"{label}: training loss", "loss") for label, records in logs.items()
        if _loss_points(records)[0]]
    if not panels:
        return None
    if any("knn_top1" in r for records in logs.values() for r in records):
        panels.append(("knn_top1", "", "kNN top-1 on val (monitor)", "top-1 (%)"))
    if any("effective_rank" in r for records in logs.values() for r in records):
        panels.append(("effective_rank", "", "effective rank (monitor)", "effective rank"))
    nrows, ncols = _grid_shape(len(panels))
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 4.0 * nrows), squeeze=False)
    for ax, (key, run_label, title, ylabel) in zip(axes.flat, panels):
        if key == "loss":
            _plot_loss(ax, logs[run_label])
            ax.set_xlabel("optimizer step")
        else:
            for label, records in logs.items():
                points = [(r["epoch"], r[key]) for r in records if key in r and "epoch" in r]
                if points:
                    x, y = zip(*points)
                    ax.plot(x, [100 * v for v in y] if key == "knn_top1" else list(y), "o-", lw=1.5, ms=4,
                            label=label)
            ax.set_xlabel("epoch")
        ax.set_title(title, fontsize=11)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=9)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    return _save(fig, path)


def plot_image_rows(rows: list[Tensor], titles: list[str], path: Path) -> Path:
    """Rows of images (each (N, C, H, W) float in [0, 1]), each row titled on its left: e.g. an autoencoder's
    inputs, corrupted inputs and reconstructions."""
    plt = _pyplot()
    count = max(len(row) for row in rows)
    fig, axes = plt.subplots(len(rows), count, figsize=(1.2 * count + 1.4, 1.3 * len(rows)), squeeze=False)
    for r, (row, title) in enumerate(zip(rows, titles)):
        for c, ax in enumerate(axes[r]):
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(row):
                ax.axis("off")
                continue
            image = row[c].detach().float().clamp(0, 1).cpu()
            shown = image[0] if image.shape[0] == 1 else image.permute(1, 2, 0)
            ax.imshow(shown.numpy(), cmap="gray" if image.shape[0] == 1 else None, vmin=0, vmax=1,
                      interpolation="nearest")
        axes[r][0].set_ylabel(title, rotation=0, ha="right", va="center", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)
