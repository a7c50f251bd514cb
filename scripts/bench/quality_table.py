"""The quality benchmark's rows -> one summary per encoder label (mean and std over seeds) -> a markdown table."""

from __future__ import annotations

import statistics
from typing import Any

# (metric key, column header, scale, decimals)
COLUMNS = (
    ("knn_top1", "kNN top-1 (k=200, T=0.1)", 100, 2),
    ("knn20_top1", "kNN top-1 (k=20, T=0.07)", 100, 2),
    ("linear_probe_top1", "linear probe top-1", 100, 2),
    ("test_effective_rank", "effective rank (test)", 1, 1),
    ("test_embedding_std", "embedding std (test)", 1, 4),
)


def summarize_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per label, in first-seen order: ``seeds``, ``batch``, and per metric (and ``wall_s``) the
    ``mean``, the sample ``std`` (None for one seed) and the ``values`` in seed order."""
    labels = list(dict.fromkeys(row["label"] for row in rows))
    summaries = []
    for label in labels:
        group = [row for row in rows if row["label"] == label]
        entry: dict[str, Any] = {"label": label, "seeds": [row.get("seed") for row in group],
                                 "batch_size": group[0].get("details", {}).get("batch_size"),
                                 "non_finite": sum(bool(row["metrics"].get("non_finite_features")) for row in group)}
        for key in [column[0] for column in COLUMNS] + ["wall_s"]:
            values = [row["metrics"].get(key) if key != "wall_s" else row.get("wall_s") for row in group]
            values = [v for v in values if v is not None]
            if values:
                entry[key] = {"mean": statistics.fmean(values), "values": values,
                              "std": statistics.stdev(values) if len(values) > 1 else None}
        summaries.append(entry)
    return summaries


def _cell(stat: dict[str, Any] | None, scale: float, decimals: int) -> str:
    if stat is None:
        return "-"
    mean = f"{scale * stat['mean']:.{decimals}f}"
    return mean if stat["std"] is None else f"{mean} ± {scale * stat['std']:.{decimals}f}"


def format_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: one line per label; mean ± std over seeds where a label ran more than one seed."""
    summaries = summarize_rows(rows)
    header = ["encoder", "batch", "seeds", *(column[1] for column in COLUMNS), "pretraining wall time"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for entry in summaries:
        wall = entry.get("wall_s")
        wall_text = "-" if wall is None else _cell({"mean": wall["mean"] / 60,
                                                    "std": None if wall["std"] is None else wall["std"] / 60},
                                                   1, 1) + " min"
        label = entry["label"] + (f" (diverged: non-finite features in {entry['non_finite']} of "
                                  f"{len(entry['seeds'])} seeds)" if entry.get("non_finite") else "")
        cells = [label, str(entry["batch_size"] or "-"), str(len(entry["seeds"])),
                 *(_cell(entry.get(key), scale, decimals) for key, _, scale, decimals in COLUMNS), wall_text]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
