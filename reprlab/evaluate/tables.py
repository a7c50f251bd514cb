"""The comparison table of an evaluation: one row per encoder, accuracies in %, as markdown.

``metrics.json`` stores the table (``format_table``) and the report shows the same rows (``table_rows``).
"""

from __future__ import annotations

import math
from typing import Any

TABLE_HEADERS = ["encoder", "kNN top-1", "kNN top-5", "k / T", "probe top-1", "sklearn top-1", "mAP@R",
                 "P@1", "R-prec", "alignment", "uniformity", "eff. rank", "std x sqrt(D)"]


def _percent(metrics: dict[str, Any], key: str) -> str:
    value = metrics.get(key)
    return "-" if value is None else f"{100 * value:.2f}"


def _number(value: Any, digits: int = 3) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def table_rows(results: dict[str, dict[str, Any]]) -> list[list[str]]:
    """One row per encoder (``results``: label -> its metrics), the columns of ``TABLE_HEADERS``."""
    rows = []
    for label, m in results.items():
        retrieval, quality = m.get("retrieval", {}), m.get("quality", {})
        std = quality.get("embedding_std")
        rows.append([
            label, _percent(m, "knn_top1"), _percent(m, "knn_top5"),
            f"{m['knn_k']} / {m['knn_temperature']:g}",
            _percent(m, "linear_probe_top1"), _percent(m, "sklearn_probe_top1"),
            _percent(retrieval, "map@r"), _percent(retrieval, "precision@1"),
            _percent(retrieval, "r_precision"),
            _number(quality.get("alignment")), _number(quality.get("uniformity")),
            _number(quality.get("effective_rank"), 1),
            # std x sqrt(D): 1 for isotropic embeddings whatever D is, 0 when collapsed
            _number(None if std is None else std * math.sqrt(m["feature_dim"]), 2),
        ])
    return rows


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    """A markdown table, no trailing newline."""
    lines = ["| " + " | ".join(headers) + " |", "|" + " --- |" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def format_table(results: dict[str, dict[str, Any]]) -> str:
    """The comparison table of ``results`` (label -> metrics) as markdown."""
    return markdown_table(TABLE_HEADERS, table_rows(results))
