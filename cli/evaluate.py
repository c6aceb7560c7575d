"""``mmem evaluate run`` and ``mmem evaluate report``: score model variants, compare runs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.common import DataRootOpt, fail, load, run_flow

evaluate_app = typer.Typer(no_args_is_help=True,
                           help="Evaluate model variants on the held-out split (the evaluations table).")


def register(app: typer.Typer) -> None:
    app.add_typer(evaluate_app, name="evaluate")


@evaluate_app.command("run")
def run(
    variants: Annotated[Path | None, typer.Option(
        help="TOML file of [[variant]] tables; `report` (default: the report's five) or `demo` name the "
        "packaged ones.")
    ] = None,
    only: Annotated[list[str] | None, typer.Option(help="Only this variant (repeatable).")] = None,
    split: Annotated[str | None, typer.Option(help="The held-out split (default val).")] = None,
    limit: Annotated[int | None, typer.Option(help="Only the first N held-out dialogs.")] = None,
    run_label: Annotated[str | None,
                         typer.Option(help="Run id to record (re-using one replaces its rows).")] = None,
    ollama_host: Annotated[list[str] | None, typer.Option(
        help="Default Ollama server for served variants; several times: spread over several "
        "(URL=N: at most N at once there).")] = None,
    bertscore_model: Annotated[Path | None,
                               typer.Option(help="Local BERTScore backbone (e.g. roberta-large).")] = None,
    dense_annotations: Annotated[Path | None,
                                 typer.Option(help="VisDial dense annotations JSON (adds NDCG).")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cuda or cpu.")] = None,
    batch_size: Annotated[int | None, typer.Option(
        min=1,
        help="Samples per generate() call of in-process and memory variants, for every variant (default: "
        "the variant's batch_size, else 512 for memory variants on CUDA and 64 otherwise).")] = None,
    data_root: DataRootOpt = None,
) -> None:
    """Generate with every variant over the held-out dialogs, score, and write the evaluations table."""
    from evaluation.models import VariantUnavailable
    from flows.evaluate import evaluate_flow
    from llmcalls.fill import FillIncomplete
    from llmcalls.requests import LLMUnavailable
    from schemas.config import split_hosts
    from schemas.evaluate import EvaluateConfig, load_variants

    errors = (FileNotFoundError, ValueError, KeyError, VariantUnavailable, LLMUnavailable, FillIncomplete)
    try:
        config = load(EvaluateConfig, data_root, variants=variants, only=only or None, split=split,
                      limit=limit, run_label=run_label, ollama_host=split_hosts(ollama_host),
                      bertscore_model=bertscore_model,
                      dense_annotations=dense_annotations, device=device, batch_size=batch_size)
        load_variants(config.variants)  # a bad file fails here, before a flow run starts
    except errors as exc:
        fail(str(exc))
    run_flow(evaluate_flow, config, errors=errors)


@evaluate_app.command("report")
def report(
    runs: Annotated[list[str] | None, typer.Option(
        "--runs",
        help="Run ids (or unique prefixes) to compare side by side, first = baseline (repeatable).")] = None,
    latest: Annotated[int, typer.Option(help="Without --runs: the latest N runs.")] = 1,
    out: Annotated[Path | None, typer.Option(help="Folder for the Markdown and PNG charts.")] = None,
    data_root: DataRootOpt = None,
) -> None:
    """Print the Markdown table of a run, or of several runs side by side, and write PNG charts."""
    from evaluation.report import bar_charts, comparison_table, markdown_table, reference_table
    from evaluation.rows import read_runs
    from schemas.evaluate import EvaluateConfig

    config = load(EvaluateConfig, data_root)
    try:
        chosen, rows = read_runs(config.lance_uri, runs, latest=max(latest, 1))
    except (FileNotFoundError, KeyError) as exc:
        fail(str(exc))
    if len(chosen) == 1:
        md = markdown_table(rows, title=f"Evaluation run {chosen[0]}") + "\n" + reference_table(rows)
        chart_rows = rows
    else:
        md = f"### Runs side by side ({', '.join(chosen)})\n\n" + comparison_table(rows, chosen)
        chart_rows = [{**r, "variant": f"{r['variant']}@{r['run_id'][:8]}"} for r in rows]
    folder = out or config.reports_dir / ("compare-" + "-".join(run[:8] for run in chosen))
    charts = bar_charts(chart_rows, folder, prefix="report")
    (folder / "report.md").write_text(md, encoding="utf-8")
    typer.echo(md)
    typer.echo("\n".join(f"chart: {p}" for p in charts) + f"\nmarkdown: {folder / 'report.md'}")
