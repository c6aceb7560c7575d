"""``mmem pipeline run``, ``mmem demo``, ``mmem server start`` and ``mmem serve``."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from cli.common import (
    STATE,
    DataRootOpt,
    ProfileOpt,
    UnsafeAuthFile,
    auth_file,
    echo,
    ensure_auth_file,
    fail,
    is_loopback,
    private_dir,
    use_local_server_auth,
)

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
    from cli.demo import where_to_look
    from flows.pipeline import pipeline_flow
    from schemas.pipeline import PipelineConfig

    cfg = PipelineConfig.load(profile or STATE.profile, data_root=data_root or STATE.data_root)
    use_local_server_auth(cfg.data_root)
    state = pipeline_flow(cfg, return_state=True)
    if state.is_completed():  # each stage's result in full; the summary below says where to look
        echo(state.result(raise_on_failure=False))
    typer.echo(where_to_look(cfg, state))
    if not state.is_completed():
        raise typer.Exit(1)


def demo(
    dialogs: Annotated[int, typer.Option(help="Demo train dialogs.")] = 40,
    val_dialogs: Annotated[int, typer.Option(help="Demo val (held-out) dialogs.")] = 10,
    data_root: DataRootOpt = None,
) -> None:
    """The whole DAG on the generated demo dataset, tiny models and the local teacher LLM server."""
    from cli.demo import run_demo

    root = data_root or STATE.data_root or Path(os.environ.get("MMEM_DATA_ROOT", "mmem-data"))
    use_local_server_auth(root)
    try:
        summary = run_demo(root, dialogs=dialogs, val_dialogs=val_dialogs, profile=STATE.profile)
    except RuntimeError as exc:
        fail(str(exc))
    typer.echo(summary)


@server_app.command("start")
def server_start(
    port: Annotated[
        int | None,
        typer.Option(
            help="Port of the API and the UI (default: PREFECT_SERVER_API_PORT, else 4200).",
            show_default=False,
        ),
    ] = None,
    host: Annotated[
        str | None,
        typer.Option(
            help="Bind address (default: PREFECT_SERVER_API_HOST, else 127.0.0.1, private to this "
            "machine). Any other address needs PREFECT_SERVER_API_AUTH_STRING set.",
            show_default=False,
        ),
    ] = None,
    database_url: Annotated[
        str | None,
        typer.Option(
            help="SQLAlchemy URL of the server's database, e.g. "
            "postgresql+asyncpg://user:pass@db:5432/prefect for a shared server (default: SQLite at "
            "<data-root>/prefect/prefect.db)."
        ),
    ] = None,
    data_root: DataRootOpt = None,
) -> None:
    """Start a local Prefect server (SQLite under the data root) and print the UI address. Ctrl-C stops it.

    Safe by default: the API wants an auth string (generated into <data-root>/prefect/api-auth-string,
    mode 0600, unless PREFECT_SERVER_API_AUTH_STRING is set), CSRF protection is on and CORS admits
    only the server's own UI origin."""
    from prefect.settings import get_current_settings

    from schemas.config import StageConfig

    settings = get_current_settings().server.api
    port = settings.port if port is None else port
    host = settings.host if host is None else host
    root = StageConfig.load(STATE.profile, data_root=data_root or STATE.data_root).data_root.resolve()
    env, url = server_env(port, host, database_url, root)
    shown = _checked(env["PREFECT_SERVER_DATABASE_CONNECTION_URL"])
    configured = env.get("PREFECT_SERVER_API_AUTH_STRING") or (
        settings.auth_string.get_secret_value() if settings.auth_string else None)
    if not configured and not is_loopback(host):
        fail(
            f"--host {host} opens the API to other machines, and anyone who reaches it can start runs "
            "and read Secret blocks: set PREFECT_SERVER_API_AUTH_STRING=user:password (and give it to "
            "your team), or keep the default 127.0.0.1"
        )
    if configured:
        env["PREFECT_SERVER_API_AUTH_STRING"] = configured
        auth = (
            "Auth: the API refuses requests without PREFECT_SERVER_API_AUTH_STRING\n"
            "  UI login: that value; Prefect clients and mmem commands: export PREFECT_API_AUTH_STRING=<it>"
        )
    else:
        path = auth_file(root)
        try:
            env["PREFECT_SERVER_API_AUTH_STRING"] = ensure_auth_file(path)
        except UnsafeAuthFile as exc:
            fail(str(exc))
        auth = (f"Auth: the API refuses requests without the auth string kept in {path} (mode 0600)\n"
                f"  UI login: the content of that file (cat {path})\n"
                "  mmem commands with this data root send it themselves; other Prefect clients: "
                f"export PREFECT_API_AUTH_STRING=\"$(cat {path})\"")
    env.update(_browser_guards(env, host, port, url))
    typer.echo(f"Prefect UI: {url}\nDatabase: {shown}\n{auth}\n"
               f"In other shells: export PREFECT_API_URL={url}/api  (then mmem ... runs show up "
               "in the UI; `mmem serve` registers the deployments)")
    prefect = Path(sys.executable).with_name("prefect")
    sys.stdout.flush()
    os.execve(str(prefect), [str(prefect), "server", "start", "--host", host, "--port", str(port)], env)


# Set in the shell, these win over the safe defaults below (e.g. a team's own list of UI origins).
_CORS_VARS = ("PREFECT_SERVER_CORS_ALLOWED_ORIGINS", "PREFECT_SERVER_API_CORS_ALLOWED_ORIGINS")
_CSRF_VARS = ("PREFECT_SERVER_CSRF_PROTECTION_ENABLED", "PREFECT_SERVER_API_CSRF_PROTECTION_ENABLED")


def _browser_guards(env: dict[str, str], host: str, port: int, url: str) -> dict[str, str]:
    """CORS limited to the server's own UI origins and CSRF protection on, unless the shell sets them:
    a web page on another origin can then neither read the API's answers nor post to it."""
    guards = {}
    if not any(v in env for v in _CORS_VARS):
        origins = [url]
        if is_loopback(host) or host in ("0.0.0.0", "::", ""):
            origins += [f"http://localhost:{port}", f"http://127.0.0.1:{port}"]
        guards["PREFECT_SERVER_CORS_ALLOWED_ORIGINS"] = ",".join(dict.fromkeys(origins))
    if not any(v in env for v in _CSRF_VARS):
        guards["PREFECT_SERVER_CSRF_PROTECTION_ENABLED"] = "true"
    return guards


# Both names Prefect reads the server database from (the first wins when both are set).
_DB_VARS = ("PREFECT_SERVER_DATABASE_CONNECTION_URL", "PREFECT_API_DATABASE_CONNECTION_URL")


def server_env(port: int, host: str, database_url: str | None, root: Path) -> tuple[dict[str, str], str]:
    """The server's environment and its UI address. The database is the one asked for, never one
    that happens to be exported in the shell (a stray PostgreSQL URL would otherwise win)."""
    if database_url is None:
        db = (private_dir(root / "prefect") / "prefect.db").resolve()
        database_url = f"sqlite+aiosqlite:///{db}"
    # A wildcard bind is reached on loopback from this machine.
    local = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    url = f"http://[{local}]:{port}" if ":" in local else f"http://{local}:{port}"
    env = {k: v for k, v in os.environ.items() if k not in _DB_VARS}
    env.update(
        {
            "PREFECT_SERVER_DATABASE_CONNECTION_URL": database_url,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "DO_NOT_TRACK": "1",
        }
    )
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
    from schemas.config import StageConfig

    use_local_server_auth(
        StageConfig.load(profile or STATE.profile, data_root=data_root or STATE.data_root).data_root
    )
    serve_all(profile or STATE.profile, data_root or STATE.data_root)
