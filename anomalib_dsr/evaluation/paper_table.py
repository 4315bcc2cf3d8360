"""Per-category test results → one markdown table, the paper's values beside ours (docs/method.md#reported-results).

Each result file holds the metrics of one ``anomalib test`` run: JSON (a dict of metric → value, or the
list ``Engine.test`` returns) or CSV (e.g. Lightning's ``CSVLogger`` ``metrics.csv``; the last non-empty
value of each column counts). Its category is given as ``CATEGORY=PATH`` or read off the path (the first
folder or file name that is an MVTec AD category, as in anomalib's ``results/Dsr/MVTecAD/<category>/...``).
Columns follow the paper's order; "mean" averages the categories given (the paper's 98.2 is over all 15).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

# The paper's Table 3 (docs/method.md#reported-results): MVTec AD image AUROC (%), in the paper's column order.
PAPER_IMAGE_AUROC = {
    "bottle": 100.0,
    "capsule": 98.1,
    "grid": 100.0,
    "leather": 100.0,
    "pill": 97.5,
    "tile": 100.0,
    "transistor": 97.8,
    "zipper": 100.0,
    "cable": 93.8,
    "carpet": 100.0,
    "hazelnut": 95.6,
    "metal_nut": 98.5,
    "screw": 96.2,
    "toothbrush": 99.7,
    "wood": 96.3,
}
# Rows after the image-AUROC comparison: (label, metric name logged by anomalib / PaperEvaluator).
OUR_ROWS = (
    ("image AP", "image_AUPR"),
    ("pixel AUROC, 224 crop", "pixel_CentreCropAUROC"),
    ("pixel AP, 224 crop", "pixel_CentreCropAUPR"),
    ("pixel AUROC, full image", "pixel_AUROC"),
    ("pixel AP, full image", "pixel_AUPR"),
)
MISSING = "–"


def read_metrics(path: str | Path) -> dict[str, float]:
    """Metric name → value from a JSON or CSV result file."""
    path = Path(path)
    if path.suffix.lower() == ".json":
        data = json.loads(path.read_text())
        if isinstance(data, list) and len(data) == 1:
            data = data[0]
        if not isinstance(data, dict):
            msg = f"{path}: expected a JSON object of metric → value (or a list holding one)."
            raise ValueError(msg)
        return {key: float(value) for key, value in data.items() if isinstance(value, int | float)}
    if path.suffix.lower() == ".csv":
        metrics: dict[str, float] = {}
        with path.open(newline="") as file:
            for row in csv.DictReader(file):
                metrics.update({key: float(value) for key, value in row.items() if key and value not in (None, "")})
        return metrics
    msg = f"{path}: result files must be .json or .csv."
    raise ValueError(msg)


def parse_result(spec: str) -> tuple[str, Path]:
    """``CATEGORY=PATH`` or ``PATH`` (category read off the path) → (category, path)."""
    category, sep, path = spec.partition("=")
    if sep:
        return category, Path(path)
    path = Path(spec)
    for part in reversed((*path.parent.parts, path.stem)):
        if part in PAPER_IMAGE_AUROC:
            return part, path
    msg = f"Cannot tell the category of {spec}; write it as CATEGORY={spec}."
    raise ValueError(msg)


def _mean(values: list[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return sum(present) / len(present) if present else None


def _cell(value: float | None, signed: bool = False) -> str:
    if value is None:
        return MISSING
    return f"{value:+.1f}" if signed else f"{value:.1f}"


def paper_table(results: dict[str, dict[str, float]]) -> str:
    """Markdown table: columns are the categories of ``results`` (paper order first) and their mean; rows are
    the paper's image AUROC, ours and the difference, then our other metrics, all in %."""
    categories = [c for c in PAPER_IMAGE_AUROC if c in results] + sorted(set(results) - set(PAPER_IMAGE_AUROC))

    def ours(name: str) -> list[float | None]:
        return [100 * results[c][name] if name in results[c] else None for c in categories]

    paper = [PAPER_IMAGE_AUROC.get(c) for c in categories]
    image_auroc = ours("image_AUROC")
    difference = [o - p if o is not None and p is not None else None for o, p in zip(image_auroc, paper, strict=True)]
    rows = [
        ("image AUROC, paper", paper, False),
        ("image AUROC, ours", image_auroc, False),
        ("difference", difference, True),
    ]
    for label, name in OUR_ROWS:
        values = ours(name)
        if any(value is not None for value in values):
            rows.append((label, values, False))

    header = ["", *(c.replace("_", " ") for c in categories), "mean"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, values, signed in rows:
        cells = [_cell(v, signed) for v in (*values, _mean(values))]
        lines.append("| " + " | ".join([label, *cells]) + " |")
    return "\n".join(lines)


def table_from_files(specs: list[str]) -> str:
    """:func:`paper_table` of result files given as ``CATEGORY=PATH`` or ``PATH``."""
    results: dict[str, dict[str, float]] = {}
    for spec in specs:
        category, path = parse_result(spec)
        if category in results:
            msg = f"Two result files for category {category} (the second: {path})."
            raise ValueError(msg)
        results[category] = read_metrics(path)
    return paper_table(results)
