"""What people look at: Markdown tables and PNG bar charts of ``evaluations`` rows, and a
side-by-side comparison of runs.

Input is always rows of the ``evaluations`` table (dicts with run_id, variant, metric, value, n,
backbone ...), so the flow's own report and ``mmem evaluate report`` over past runs are the same
code. Metrics are grouped by scale (0..1 overlap scores, BLEU-4 on 0..100, ranking), because one
axis for all of them would flatten the small ones to nothing.

A run label names the report's folder and chart prefixes come from run ids: both go through
``schemas.paths`` (``run_folder``, ``bar_charts``), so a label cannot place files outside the
reports folder.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from evaluation.metrics import GENERATION_METRICS
from evaluation.ranking import RANKING_METRICS
from schemas.paths import check_name, safe_child

Row = Mapping[str, Any]

# (chart title, metrics, y-axis label); a metric absent from the rows is left out of its chart.
CHARTS = (
    ("overlap", ("rouge1_f1", "rouge2_f1", "rougeL_f1", "bleu", "bleu_sentence_mean", "bertscore_f1"),
     "score (0..1)"),
    ("bleu4", ("bleu4",), "corpus BLEU-4 (0..100)"),
    ("ranking", ("r@1", "r@5", "r@10", "mrr", "ndcg"), "VisDial ranking (0..1)"),
    ("mean_rank", ("mean_rank",), "mean rank of the ground truth (1..100, lower is better)"),
)
METRIC_ORDER = (*GENERATION_METRICS, *RANKING_METRICS, "ndcg")

# The report's Table 1 and Table 2 (seed report, section 5.2), for side-by-side reading.
REPORT_REFERENCE = {
    "4b_base": {"rouge1_f1": 0.0807, "rouge2_f1": 0.0133, "rougeL_f1": 0.0775, "bleu": 0.0036,
                "bertscore_f1": 0.8404},
    "4b_prompt": {"rouge1_f1": 0.1964, "rouge2_f1": 0.0235, "rougeL_f1": 0.1939, "bleu": 0.0081,
                  "bertscore_f1": 0.8630},
    "27b_base": {"rouge1_f1": 0.1650, "rouge2_f1": 0.0264, "rougeL_f1": 0.1614, "bleu": 0.0053,
                 "bertscore_f1": 0.8412},
    "27b_prompt": {"rouge1_f1": 0.1795, "rouge2_f1": 0.0298, "rougeL_f1": 0.1730, "bleu": 0.0073,
                   "bertscore_f1": 0.8448},
    "4b_finetuned": {"rouge1_f1": 0.4847, "rouge2_f1": 0.1321, "rougeL_f1": 0.4805, "bleu": 0.0804,
                     "bertscore_f1": 0.8894},
}


def pivot(rows: Iterable[Row]) -> tuple[list[str], list[str], dict[tuple[str, str], Row]]:
    """(variants in first-seen order, metrics in canonical order, (variant, metric) -> row)."""
    cells: dict[tuple[str, str], Row] = {}
    variants: list[str] = []
    for r in rows:
        if r["variant"] not in variants:
            variants.append(r["variant"])
        cells[(r["variant"], r["metric"])] = r
    present = {m for _, m in cells}
    metrics = [m for m in METRIC_ORDER if m in present] + sorted(present - set(METRIC_ORDER))
    return variants, metrics, cells


def _fmt(value: float | None, metric: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if metric in ("bleu4", "mean_rank"):
        return f"{value:.2f}"
    return f"{value:.4f}"


def markdown_table(rows: Sequence[Row], *, title: str | None = None) -> str:
    """Variants as rows, metrics as columns; the sample count and BERTScore backbone below."""
    variants, metrics, cells = pivot(rows)
    if not variants:
        return f"### {title}\n\n(no results)\n" if title else "(no results)\n"
    lines = [f"### {title}\n"] if title else []
    lines += ["| variant | " + " | ".join(metrics) + " |", "| --- |" + " ---: |" * len(metrics)]
    for v in variants:
        values = [_fmt(cells[(v, m)]["value"], m) if (v, m) in cells else "—" for m in metrics]
        lines.append(f"| {v} | " + " | ".join(values) + " |")
    notes = _notes(rows)
    return "\n".join(lines) + ("\n\n" + notes if notes else "") + "\n"


def _notes(rows: Sequence[Row]) -> str:
    """Per variant: the sample counts, the model artifact, the dataset version and the backbone."""
    seen: dict[str, dict[str, set[str]]] = {}
    for r in rows:
        notes = seen.setdefault(r["variant"], {})
        for col in ("n", "model_artifact", "dataset_version", "backbone"):
            if r.get(col) not in (None, ""):
                notes.setdefault(col, set()).add(str(r[col]))
    return "\n".join(
        f"- **{v}**: " + "; ".join(f"{col} {', '.join(sorted(vals))}" for col, vals in notes.items())
        for v, notes in seen.items() if notes
    )


def comparison_table(rows: Sequence[Row], runs: Sequence[str]) -> str:
    """Each (variant, metric) side by side across ``runs``, with the change from the first run."""
    by_run = {run: {(r["variant"], r["metric"]): r["value"] for r in rows if r["run_id"] == run}
              for run in runs}
    keys: list[tuple[str, str]] = []
    for run in runs:
        for k in by_run[run]:
            if k not in keys:
                keys.append(k)
    order = {m: i for i, m in enumerate(METRIC_ORDER)}
    keys.sort(key=lambda k: (k[0], order.get(k[1], len(order)), k[1]))
    head = ["variant", "metric", *[_short(r) for r in runs]]
    head += [f"Δ vs {_short(runs[0])}"] if len(runs) > 1 else []
    lines = ["| " + " | ".join(head) + " |", "| --- | --- |" + " ---: |" * (len(head) - 2)]
    for v, m in keys:
        values = [by_run[run].get((v, m)) for run in runs]
        cells = [_fmt(x, m) for x in values]
        if len(runs) > 1:
            first, last = values[0], values[-1]
            cells.append(_fmt(last - first, m) if first is not None and last is not None else "—")
        lines.append(f"| {v} | {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def reference_table(rows: Sequence[Row]) -> str:
    """This run next to the report's published numbers, for the variants both have."""
    _, _, cells = pivot(rows)
    lines = ["| variant | metric | this run | report |", "| --- | --- | ---: | ---: |"]
    for v, ref in REPORT_REFERENCE.items():
        for m, published in ref.items():
            if (v, m) in cells:
                lines.append(f"| {v} | {m} | {_fmt(cells[(v, m)]['value'], m)} | {_fmt(published, m)} |")
    return "\n".join(lines) + "\n" if len(lines) > 2 else ""


def _short(run_id: str) -> str:
    return run_id if len(run_id) <= 12 else run_id[:8]


def run_folder(reports_dir: Path, run: str) -> Path:
    """``<reports_dir>/<run>``: one run's Markdown report and charts (``run`` must be a plain name)."""
    return safe_child(reports_dir, run, "run_label")


def bar_charts(rows: Sequence[Row], out_dir: Path, *, prefix: str = "evaluation") -> list[Path]:
    """One PNG per metric group (grouped bars: metric on x, one bar per variant); returns the paths."""
    check_name(prefix, "prefix")  # it starts every file name
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants, metrics, cells = pivot(rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, group, ylabel in CHARTS:
        shown = [m for m in group if m in metrics]
        if not shown:
            continue
        fig, ax = plt.subplots(figsize=(min(14.0, 2.5 + len(shown) * (0.4 + 0.3 * len(variants))), 3.6))
        width = 0.8 / max(len(variants), 1)
        for i, v in enumerate(variants):
            ys = [_value(cells.get((v, m))) for m in shown]
            xs = [j + (i - (len(variants) - 1) / 2) * width for j in range(len(shown))]
            bars = ax.bar(xs, ys, width=width, label=v)
            ax.bar_label(bars, fmt="%.3g", fontsize=6, padding=1)
        ax.set_xticks(range(len(shown)), shown)
        ax.set_ylabel(ylabel)
        ax.set_title(f"{prefix}: {name}")
        ax.legend(fontsize="small", ncols=min(len(variants), 3))
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        path = out_dir / f"{prefix}-{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def _value(row: Row | None) -> float:
    if row is None or row["value"] is None or math.isnan(row["value"]):
        return 0.0
    return float(row["value"])
