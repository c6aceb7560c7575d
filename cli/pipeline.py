"""``mmem pipeline run``, ``mmem demo``, ``mmem server start`` and ``mmem serve``."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from cli.common import STATE, DataRootOpt, ProfileOpt, fail, load

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
    from flows.demo import where_to_look
    from flows.pipeline import pipeline_flow
    from schemas.pipeline import PipelineConfig

    cfg = PipelineConfig.load(profile or STATE.profile, data_root=data_root or STATE.data_root)
    state = pipeline_flow(cfg, return_state=True)
    if state.is_completed():  # each stage's result in full; the summary below says where to look
        typer.echo(json.dumps(state.result(raise_on_failure=False), indent=2, default=str) + "\n")
    typer.echo(where_to_look(cfg, state))
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
    database_url: Annotated[str | None, typer.Option(
        help="SQLAlchemy URL of the server's database, e.g. postgresql+asyncpg://user:pass@db:5432/prefect "
             "for a shared server (default: SQLite at <data-root>/prefect/prefect.db).")] = None,
    data_root: DataRootOpt = None,
) -> None:
    """Start a local Prefect server (SQLite under the data root) and print the UI address. Ctrl-C stops it."""
    env, url = server_env(port, host, database_url, data_root)
    shown = _checked(env["PREFECT_SERVER_DATABASE_CONNECTION_URL"])
    typer.echo(f"Prefect UI: {url}\nDatabase: {shown}\n"
               f"In other shells: export PREFECT_API_URL={url}/api  (then mmem ... runs show up "
               "in the UI; `mmem serve` registers the deployments)")
    prefect = Path(sys.executable).with_name("prefect")
    sys.stdout.flush()
    os.execve(str(prefect), [str(prefect), "server", "start", "--host", host, "--port", str(port)], env)


# Both names Prefect reads the server database from (the first wins when both are set).
_DB_VARS = ("PREFECT_SERVER_DATABASE_CONNECTION_URL", "PREFECT_API_DATABASE_CONNECTION_URL")


def server_env(port: int, host: str, database_url: str | None,
               data_root: Path | None) -> tuple[dict[str, str], str]:
    """The server's environment and its UI address. The database is the one asked for, never one
    that happens to be exported in the shell (a stray PostgreSQL URL would otherwise win)."""
    from schemas.config import StageConfig

    if database_url is None:
        db = (load(StageConfig, data_root).data_root / "prefect" / "prefect.db").resolve()
        db.parent.mkdir(parents=True, exist_ok=True)
        database_url = f"sqlite+aiosqlite:///{db}"
    # A wildcard bind is reached on loopback from this machine.
    local = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    url = f"http://[{local}]:{port}" if ":" in local else f"http://{local}:{port}"
    env = {k: v for k, v in os.environ.items() if k not in _DB_VARS}
    env.update({"PREFECT_SERVER_DATABASE_CONNECTION_URL": database_url, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "DO_NOT_TRACK": "1"})
    if local == host or not env.get("PREFECT_UI_API_URL"):
        env["PREFECT_UI_API_URL"] = f"{url}/api"  # the UI's browser calls this: the port we serve on
    return env, url


def _checked(database_url: str) -> str:
    """The URL as it may be printed (password masked); a clear error where Prefect could not use it."""
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(database_url)
    except Exception as exc:  # noqa: BLE001 - SQLAlchemy says what is wrong (the URL is not echoed: secrets)
        fail(f"--database-url: {exc}")
    shown = parsed.render_as_string(hide_password=True)
    if parsed.get_backend_name() not in ("sqlite", "postgresql"):
        fail(f"--database-url {shown}: a Prefect server runs on SQLite (sqlite+aiosqlite:///FILE) or "
             "PostgreSQL (postgresql+asyncpg://USER:PASS@HOST:5432/DB)")
    return shown


def serve(data_root: DataRootOpt = None, profile: ProfileOpt = None) -> None:
    """Register a deployment per flow and for the pipeline with the server, and run what it schedules."""
    from deployments.serve import serve_all

    if not os.environ.get("PREFECT_API_URL"):
        fail("PREFECT_API_URL is not set: start a server (`mmem server start`) and export the URL it prints")
    serve_all(profile or STATE.profile, data_root or STATE.data_root)
