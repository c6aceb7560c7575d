"""``mmem pipeline run``, ``mmem demo``, ``mmem server start`` and ``mmem serve``."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from cli.common import STATE, DataRootOpt, ProfileOpt, fail

pipeline_app = typer.Typer(no_args_is_help=True, help="The whole DAG.")
server_app = typer.Typer(no_args_is_help=True, help="A local Prefect server.")


def register(app: typer.Typer) -> None:
    app.add_typer(pipeline_app, name="pipeline")
    app.add_typer(server_app, name="server")
    app.command("demo")(demo)
    app.command("serve")(serve)


@pipeline_app.command("run")
def run(data_root: DataRootOpt = None, profile: ProfileOpt = None) -> None:
    """Run the parent flow: ingest -> embed -> reminders -> train -> evaluate, as the profile says
    (`[pipeline] inputs`, `stages`, and each stage's section)."""
    from flows.pipeline import pipeline_flow
    from schemas.pipeline import PipelineConfig

    cfg = PipelineConfig.load(profile or STATE.profile, data_root=data_root or STATE.data_root)
    state = pipeline_flow(cfg, return_state=True)
    typer.echo(json.dumps(state.result(raise_on_failure=False) if state.is_completed() else state.message,
                          indent=2, default=str))
    if not state.is_completed():
        raise typer.Exit(1)


def demo(
    dialogs: Annotated[int, typer.Option(help="Demo train dialogs.")] = 40,
    val_dialogs: Annotated[int, typer.Option(help="Demo val (held-out) dialogs.")] = 10,
    data_root: DataRootOpt = None,
) -> None:
    """The whole DAG on the generated demo dataset, tiny models and the local teacher LLM server."""
    from flows.demo import run_demo

    root = data_root or STATE.data_root or Path(os.environ.get("MMEM_DATA_ROOT", "mmem-data"))
    try:
        summary = run_demo(root, dialogs=dialogs, val_dialogs=val_dialogs, profile=STATE.profile)
    except RuntimeError as exc:
        fail(str(exc))
    typer.echo(summary)


@server_app.command("start")
def server_start(
    port: Annotated[int, typer.Option(help="Port of the API and the UI.")] = 4200,
    host: Annotated[str, typer.Option(help="Bind address; 127.0.0.1 keeps it private to this machine.")] = "127.0.0.1",
) -> None:
    """Start a local Prefect server (SQLite) and print the UI address. Ctrl-C stops it."""
    url = f"http://{host}:{port}"
    env = {**os.environ, "PREFECT_UI_API_URL": f"{url}/api", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "DO_NOT_TRACK": "1"}
    typer.echo(f"Prefect UI: {url}\nIn other shells: export PREFECT_API_URL={url}/api  (then mmem ... runs show up "
               "in the UI; `mmem serve` registers the deployments)")
    prefect = Path(sys.executable).with_name("prefect")
    os.execve(str(prefect), [str(prefect), "server", "start", "--host", host, "--port", str(port)], env)


def serve(data_root: DataRootOpt = None, profile: ProfileOpt = None) -> None:
    """Register a deployment per flow and for the pipeline with the server, and run what it schedules."""
    from deployments.serve import serve_all

    if not os.environ.get("PREFECT_API_URL"):
        fail("PREFECT_API_URL is not set: start a server (`mmem server start`) and export the URL it prints")
    serve_all(profile or STATE.profile, data_root or STATE.data_root)
