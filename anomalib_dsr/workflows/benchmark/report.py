"""The markdown report and PNG chart written beside anomalib's ``results.csv``; they name each model's backbone."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from anomalib_dsr.evaluation.paper_table import PAPER_IMAGE_AUROC

# Report columns: (heading, results.csv column, scale).
REPORT_METRICS = (
    ("image AUROC", "image_AUROC", 100.0),
    ("pixel AP", "pixel_AUPR", 100.0),
    ("pixel AUROC", "pixel_AUROC", 100.0),
    ("train s", "fit_duration", 1.0),
    ("img/s", "images_per_second", 1.0),
)


def with_labels(result: pd.DataFrame) -> pd.DataFrame:
    """``label``: the model's name, with its backbone if it has one, e.g. ``Patchcore (tf_efficientnet_lite0)``."""
    backbones = result["backbone"] if "backbone" in result else pd.Series(None, index=result.index, dtype=object)
    pairs = zip(result["model"], backbones, strict=True)
    labels = [model if pd.isna(backbone) else f"{model} ({backbone})" for model, backbone in pairs]
    return result.assign(label=labels)


def with_category(result: pd.DataFrame) -> pd.DataFrame:
    """``category``: the datamodule's category (MVTec-like) or name (``Folder``)."""
    for key in ("data.init_args.category", "data.init_args.name"):
        if key in result:
            return result.assign(category=result[key].fillna("–"))
    return result.assign(category="–")


def markdown_report(result: pd.DataFrame, notes: list[str]) -> str:
    """One table per dataset: rows are categories and their mean, columns the metrics of each model."""
    lines = ["# Benchmark: DSR, PatchCore, DRAEM", ""]
    result = with_labels(with_category(result))
    ok = result[result["status"] == "ok"]
    dataset_key = "data.class_path"
    for dataset, rows in ok.groupby(dataset_key):
        models = list(dict.fromkeys(rows["label"]))
        categories = sorted(rows["category"].unique())
        paper = (
            dataset.rpartition(".")[2] == "MVTecAD"
            and "Dsr" in models
            and bool(set(categories) & set(PAPER_IMAGE_AUROC))
        )
        metrics = measured_metrics(rows)  # e.g. no pixel metrics on a dataset without masks
        header = [f"{model} {heading}" for model in models for heading, _, _ in metrics]
        if paper:
            header += ["Dsr image AUROC, paper", "difference"]
        lines += [f"## {dataset.rpartition('.')[2]}", "", "| category | " + " | ".join(header) + " |"]
        lines.append("|---" * (len(header) + 1) + "|")
        table = {}
        for category in categories:
            cells = []
            for model in models:
                match = rows[(rows["label"] == model) & (rows["category"] == category)]
                cells += [
                    float(match[column].mean()) * scale if len(match) else math.nan for _, column, scale in metrics
                ]
            if paper:
                ours = cells[header.index("Dsr image AUROC")]
                cells += [PAPER_IMAGE_AUROC.get(category, math.nan), ours - PAPER_IMAGE_AUROC.get(category, math.nan)]
            table[category] = cells
        table["mean"] = list(np.nanmean(np.array(list(table.values())), axis=0)) if len(table) > 1 else None
        for category, cells in table.items():
            if cells is not None:
                lines.append(f"| {category} | " + " | ".join(_cell(value) for value in cells) + " |")
        lines.append("")
    for _, row in result[result["status"] != "ok"].iterrows():
        lines.append(f"- **{row['label']}** ({row['category']}): {row['status']} — {row['reason']}")
    lines += [f"- {note}" for note in notes]
    lines += [
        "",
        "Columns: image AUROC and pixel AUROC in %; pixel AP = average precision of the anomaly map's pixels (%);",
        "train s = wall time of training (fit; for PatchCore: collecting features and coreset subsampling),",
        "without the learning curves' evaluations; img/s = test images per second through the model's step",
        "(pre-processing, forward, post-processing). Metrics are anomalib's, computed on the full test images.",
        "A model's backbone, if it has one, is named in brackets after it.",
        "",
    ]
    return "\n".join(lines)


def measured_metrics(rows: pd.DataFrame) -> list[tuple[str, str, float]]:
    """The entries of ``REPORT_METRICS`` that at least one of ``rows`` has a value for."""
    return [metric for metric in REPORT_METRICS if metric[1] in rows and rows[metric[1]].notna().any()]


def _cell(value: float) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.1f}"


def save_chart(result: pd.DataFrame, path: Path) -> None:
    """Grouped bars: image AUROC and pixel AP per category (all datasets) and model."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    ok = with_labels(with_category(result)).query("status == 'ok'")
    measured = measured_metrics(ok)
    figure, axes = plt.subplots(1, 2, figsize=(12, 4))
    for axis, (heading, column, scale) in zip(axes, REPORT_METRICS[:2], strict=False):
        if (heading, column, scale) in measured:
            table = ok.pivot_table(index="category", columns="label", values=column) * scale
            table.plot.bar(ax=axis, rot=0)
        axis.set_title(heading + " (%)")
        axis.set_xlabel("")
        axis.set_ylim(0, 100)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
