"""What an evaluation leaves behind: ``evaluations`` rows (one per variant and metric, with the
model and data versions they came from), quarantined samples, the run's Markdown report and PNG
charts; and past runs read back for ``mmem evaluate report``.
"""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa

from evaluation.models import ResolvedModel
from evaluation.report import bar_charts, markdown_table, reference_table
from reminders.parse import parse_response
from schemas.evaluate import EVALUATIONS, Variant, format_dataset_version, parse_dataset_version
from schemas.quarantine import Reason, Rejection
from schemas.reminders import ANY_TAG_RE, REMINDER_RE
from storage.lance import connect, merge, open_table, read, require, table_exists, tag_run
from storage.quarantine import quarantine

STAGE = "evaluate"


def hypothesis(response: str) -> tuple[str, bool]:
    """The answer to score, and whether the response followed the <reminder> format: the final
    answer after a valid reminder, else the text with any reminder block removed."""
    parsed = parse_response(response.strip())
    if not isinstance(parsed[0], Reason):
        return parsed[1], True
    return ANY_TAG_RE.sub(" ", REMINDER_RE.sub(" ", response)).strip(), False


def metric_rows(run: str, variant: Variant, model: ResolvedModel, dataset_version: str, split: str,
                values: dict[str, float], n: dict[str, int], backbone: str | None) -> list[dict]:
    now = datetime.now(UTC)
    return [
        {"run_id": run, "variant": variant.name, "metric": metric, "value": float(value),
         "n": n.get(metric, 0),
         "model_artifact": model.version or model.artifact, "dataset_version": dataset_version,
         "backbone": backbone if metric == "bertscore_f1" else None, "created_at": now, "split": split,
         "model": model.label, "prompt": variant.prompt}
        for metric, value in values.items()
    ]


def write(lance_uri: str, rows: list[dict], rejections: list[Rejection], run: str) -> dict[str, int]:
    db = connect(lance_uri)
    typed = [{**r, "dataset_version": parse_dataset_version(r["dataset_version"])} for r in rows]
    res = merge(db, "evaluations", pa.Table.from_pylist(typed, schema=EVALUATIONS.schema))
    if res.inserted or res.updated:  # the run's rows, as lineage (quarantine tags its own writes)
        tag_run(db, "evaluations", f"{STAGE}-{run}", res.version)
    # nothing to quarantine: no merge (storage.lance.merge of 0 rows into a non-empty table fails on
    # an untyped empty mask, and there is nothing to write anyway)
    if rejections:
        q_version = quarantine(db, STAGE, rejections, run).version
    else:
        q_version = open_table(db, "quarantine").version if table_exists(db, "quarantine") else 0
    return {"evaluations_version": res.version, "inserted": res.inserted, "updated": res.updated,
            "quarantine_version": q_version}


def render_report(rows: list[dict], out_dir: Path, run: str) -> tuple[str, list[Path]]:
    """The run's Markdown (table, notes, the report's numbers beside ours) and its PNG charts."""
    charts = bar_charts(rows, out_dir, prefix=f"evaluate-{run[:8]}")
    md = markdown_table(rows, title=f"Evaluation run {run}")
    ref = reference_table(rows)
    if ref:
        md += "\n### Next to the report's published numbers\n\n" + ref
    links = "\n".join(f"![{p.stem}]({p.name})" for p in charts)
    (out_dir / "evaluation.md").write_text(md + "\n" + links + "\n", encoding="utf-8")
    # The Prefect artifact carries the charts inline (a UI cannot read this machine's files).
    inline = "\n".join(f"![{p.stem}](data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()})\n\n"
                       f"`{p}`" for p in charts)
    return md + "\n" + inline + "\n", charts


def read_runs(lance_uri: str, runs: list[str] | None = None, latest: int = 1) -> tuple[list[str], list[dict]]:
    """(run ids, their rows): the given runs (a unique prefix is enough), else the ``latest`` runs."""
    db = connect(lance_uri)
    require(db, ["evaluations"], hint="run `mmem evaluate run` first")
    rows = [{**r, "dataset_version": format_dataset_version(r["dataset_version"])}  # as the report names it
            for r in read(db, "evaluations").to_pylist()]
    started: dict[str, datetime] = {}
    for r in rows:
        started[r["run_id"]] = min(started.get(r["run_id"], r["created_at"]), r["created_at"])
    if runs:
        chosen = []
        for want in runs:
            hits = [run for run in started if run == want] or [run for run in started if run.startswith(want)]
            if len(hits) != 1:
                raise KeyError(f"run {want!r} matches {len(hits)} runs; known: {sorted(started)}")
            chosen.append(hits[0])
    else:
        chosen = sorted(started, key=started.get)[-latest:]
    order = {run: i for i, run in enumerate(chosen)}
    picked = sorted((r for r in rows if r["run_id"] in order), key=lambda r: order[r["run_id"]])
    return chosen, picked
