"""``mmem reminders`` (generate) and ``mmem reminders export``."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from cli.common import DataRootOpt, echo, fail, load, run_flow


class ExportFormat(StrEnum):
    report_json = "report-json"
    hf = "hf"


def register(app: typer.Typer) -> None:
    group = typer.Typer(no_args_is_help=False, help="<reminder> self-reflection samples through Ollama.")
    group.callback(invoke_without_command=True)(reminders)
    group.command("export")(export)
    app.add_typer(group, name="reminders")


def _config():
    from schemas.reminders import RemindersConfig

    return RemindersConfig


def reminders(
    ctx: typer.Context,
    ollama_host: Annotated[list[str] | None, typer.Option(
        help="Ollama server (default $OLLAMA_HOST or 127.0.0.1:11434). Give it several times to spread the "
        "run over several servers; URL=N: at most N requests at once there.")] = None,
    model: Annotated[str | None, typer.Option(help="Model name on that server (default gemma3:27b).")] = None,
    limit: Annotated[int | None, typer.Option(help="Only the first N dialogs.")] = None,
    data_root: DataRootOpt = None,
) -> None:
    """Generate <reminder> samples for every dialog: cached, retried, validated, resumable."""
    if ctx.invoked_subcommand is not None:
        return
    from flows.reminders import reminders_flow
    from llmcalls.requests import LLMUnavailable
    from llmcalls.shard import ShardFailed
    from schemas.config import split_hosts
    from schemas.validate import ValidationFailed

    config = load(_config(), data_root, ollama_host=split_hosts(ollama_host), model=model, limit=limit)
    run_flow(reminders_flow, config,
             errors=(LLMUnavailable, FileNotFoundError, ValidationFailed, ShardFailed))


def export(
    format: Annotated[ExportFormat, typer.Option(
        "--format", help="report-json (the report's sample list) or hf.")],
    out: Annotated[Path, typer.Option(help="A .json file (report-json) or a folder (hf).")],
    version: Annotated[str | None, typer.Option(help="Table version number or tag (default latest).")] = None,
    data_root: DataRootOpt = None,
) -> None:
    """Export the reminders table at a version: the report's JSON, or a datasets.load_from_disk folder."""
    from reminders.export import export_hf, export_report_json, read_reminders

    config = load(_config(), data_root)
    try:
        table = read_reminders(config.lance_uri, version)
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    if format == ExportFormat.report_json:
        echo({"out": str(out), "samples": export_report_json(table, out)})
    else:
        echo({"out": str(out), "splits": export_hf(table, out)})
