"""Shared command-line state and helpers: the data root, the profile, config loading, output, and
the local Prefect server's auth string.

``mmem server start`` keeps the auth string it generates in ``<data-root>/prefect/api-auth-string``
(mode 0600). Every ``mmem`` command that loads its config hands it to Prefect's client
(``PREFECT_API_AUTH_STRING``) when the API it talks to is on loopback, the file is this user's
own and private, and no other user holds the port: the project's own processes authenticate by
themselves, while a web page, another user or a foreign server gets nothing.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import secrets
import stat
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from schemas.config import StageConfig

C = TypeVar("C", bound=StageConfig)


@dataclass
class State:
    data_root: Path | None = None
    profile: Path | None = None


STATE = State()

DataRootOpt = Annotated[
    Path | None,
    typer.Option(
        "--data-root", help="Data root (default ./mmem-data or $MMEM_DATA_ROOT).", show_default=False
    ),
]
ProfileOpt = Annotated[Path | None, typer.Option("--profile", help="TOML profile with per-flow sections.")]


def load(cls: type[C], data_root: Path | None = None, **overrides: Any) -> C:
    """The flow config: defaults < profile < MMEM_* env < command-line options."""
    root = data_root or STATE.data_root
    if root is not None:
        overrides["data_root"] = root
    config = cls.load(STATE.profile, **overrides)
    use_local_server_auth(config.data_root)
    return config


# Without PREFECT_API_URL each flow-running command starts a temporary Prefect server, which
# Prefect waits for only 20 s by default: on a loaded 2-core machine its start takes longer, and the
# first command a user types would fail. A setting of the user's own still wins.
STARTUP_TIMEOUT_ENV = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
STARTUP_TIMEOUT_S = 300


class _TemporaryServerNote(logging.Filter):
    """Adds to Prefect's "Starting temporary server" line why the wait may be long and how to avoid it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and record.msg.startswith("Starting temporary server"):
            record.msg = (
                f"{record.msg.splitlines()[0]} (no PREFECT_API_URL set; waiting up to "
                f"{os.environ.get(STARTUP_TIMEOUT_ENV, STARTUP_TIMEOUT_S)} s for it to start, longer "
                "on a busy machine; `mmem server start` keeps one running for every command)"
            )
            record.args = ()
        return True


def quiet_prefect() -> None:
    """No telemetry and no network calls from a command-line run on an offline machine, and a
    temporary server given the time a busy machine needs to start it."""
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault(STARTUP_TIMEOUT_ENV, str(STARTUP_TIMEOUT_S))
    prefect_logger = logging.getLogger("prefect")
    if not any(isinstance(f, _TemporaryServerNote) for f in prefect_logger.filters):
        prefect_logger.addFilter(_TemporaryServerNote())
    if "prefect.context" in sys.modules:  # Prefect read its settings at import: read them again
        from prefect.context import refresh_global_settings_context

        refresh_global_settings_context()


def fail(message: str, code: int = 1) -> None:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code)


# --- the local server's auth string ---------------------------------------------------------------

AUTH_FILE = "api-auth-string"
AUTH_USER = "mmem"  # Prefect's auth string is basic auth, ``user:password``


class UnsafeAuthFile(RuntimeError):
    """The auth string file is not a private regular file of this user."""


def auth_file(data_root: Path) -> Path:
    return Path(data_root) / "prefect" / AUTH_FILE


def private_dir(folder: Path) -> Path:
    """Create ``folder`` (0700) or make an existing one of ours 0700: it holds the server's SQLite
    database, whose Secret blocks are in clear, and the auth string."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = folder.stat()
    if st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) & 0o077:
        folder.chmod(0o700)
    return folder


def read_auth_file(path: Path) -> str | None:
    """The auth string in ``path``; None when there is no such file; ``UnsafeAuthFile`` when it is a
    symlink, not a regular file, someone else's, or readable by group or others."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:  # ELOOP: a symlink
        raise UnsafeAuthFile(f"{path}: {exc.strerror}; remove it and run `mmem server start` again") from None
    with os.fdopen(fd, encoding="utf-8") as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or stat.S_IMODE(st.st_mode) & 0o077:
            raise UnsafeAuthFile(
                f"{path} must be a regular file of yours with mode 0600 (it is "
                f"{stat.filemode(st.st_mode)}, uid {st.st_uid}): `chmod 600` it or remove it"
            )
        return fh.read().strip() or None


def ensure_auth_file(path: Path) -> str:
    """The auth string kept in ``path``, generated there (0600, created exclusively, never through
    a symlink) when there is none. Two servers starting at once end up with the same string."""
    if (existing := read_auth_file(path)) is not None:
        return existing
    private_dir(path.parent)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(f"{AUTH_USER}:{secrets.token_urlsafe(32)}\n")
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)  # atomic and exclusive: a reader never sees half a file
        except FileExistsError:
            pass  # another `server start` was first: use its string
    finally:
        tmp.unlink(missing_ok=True)
    secret = read_auth_file(path)
    if secret is None:
        raise UnsafeAuthFile(f"{path} is empty: remove it and run `mmem server start` again")
    return secret


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _listening_uids(port: int) -> set[int] | None:
    """The uids owning sockets that listen on TCP ``port`` (Linux ``/proc/net/tcp*``); None where
    that cannot be read."""
    uids, readable = set(), False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        readable = True
        for line in lines:
            fields = line.split()
            if len(fields) > 7 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                uids.add(int(fields[7]))
    return uids if readable else None


def use_local_server_auth(data_root: Path) -> bool:
    """Set ``PREFECT_API_AUTH_STRING`` from ``<data_root>/prefect/api-auth-string`` when this process
    talks to a server on loopback and has no auth string of its own; True when it did.

    Refused (with a warning) when the file is not private, or when the port is held by another
    user's process (a server planted while ours is down would otherwise receive the string)."""
    from urllib.parse import urlsplit

    if os.environ.get("PREFECT_API_AUTH_STRING"):
        return False
    url = os.environ.get("PREFECT_API_URL")
    if url is None and "prefect.settings" in sys.modules:  # a Prefect profile may hold the URL
        from prefect.settings import get_current_settings

        api = get_current_settings().api
        if api.auth_string is not None:
            return False
        url = api.url
    if not url:
        return False
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return False
    path = auth_file(data_root)
    if not is_loopback(host) or not path.exists():
        return False
    try:
        secret = read_auth_file(path)
    except UnsafeAuthFile as exc:
        typer.secho(
            f"warning: not using the local server's auth string: {exc}", err=True, fg=typer.colors.YELLOW
        )
        return False
    owners = _listening_uids(port)
    if secret is None or (owners and owners != {os.getuid()}):
        if owners and owners != {os.getuid()}:
            typer.secho(
                f"warning: port {port} is held by another user (uid {sorted(owners)}): the auth string "
                f"in {path} is not sent there",
                err=True,
                fg=typer.colors.YELLOW,
            )
        return False
    os.environ["PREFECT_API_AUTH_STRING"] = secret
    if "prefect.context" in sys.modules:  # Prefect read its settings at import: read them again
        from prefect.context import refresh_global_settings_context

        refresh_global_settings_context()
    return True


def run_flow(flow: Any, config: StageConfig, errors: tuple[type[BaseException], ...] = ()) -> Any:
    """Run ``flow(config)`` and print its result's JSON (a stage result, or plain data) on stdout;
    one of ``errors`` becomes a one-line error and exit code 1, not a traceback."""
    try:
        result = flow(config)
    except errors as exc:
        fail(str(exc))
    echo(result)
    return result


def echo(result: Any) -> None:
    """The one way a command prints a result: pydantic results by their own JSON, the rest as JSON."""
    import json

    from pydantic import BaseModel

    if isinstance(result, BaseModel):
        typer.echo(result.model_dump_json(indent=2))
    else:
        typer.echo(json.dumps(result, indent=2, default=str, ensure_ascii=False))
