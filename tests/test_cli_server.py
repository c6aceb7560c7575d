"""``mmem server start``: a real Prefect server on SQLite under the data root, on loopback only,
whatever database URL the shell happens to export; safe by default against a web page in the
user's browser and another user of the machine (an auth string in a 0600 file, CSRF on, CORS
limited to its own UI); its port and host from Prefect's settings; it takes flow runs, the
project's own commands authenticate by themselves, and it stops on Ctrl-C.

One server for the whole module (its start is slow on a loaded machine); the last test stops it.
"""

from __future__ import annotations

import base64
import os
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest
from typer.testing import CliRunner

MMEM = str(Path(sys.executable).with_name("mmem"))
FOREIGN = "http://evil.example:8000"  # a web page's origin (or a DNS-rebinding name for 127.0.0.1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _clean_env(tmp: Path) -> dict[str, str]:
    """This machine's environment without any Prefect setting (the session's test server's)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MMEM_"))}
    env.update(
        PREFECT_HOME=str(tmp / "prefect-home"), DO_NOT_TRACK="1", PREFECT_SERVER_ANALYTICS_ENABLED="false"
    )
    return env


@dataclass
class Server:
    proc: subprocess.Popen
    url: str
    port: int
    root: Path
    log: Path
    env: dict[str, str]

    @property
    def api(self) -> str:
        return f"{self.url}/api"

    def auth(self) -> dict[str, str]:
        secret = (self.root / "prefect" / "api-auth-string").read_text().strip()
        return {"Authorization": "Basic " + base64.b64encode(secret.encode()).decode()}

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # what Ctrl-C does
        try:
            return self.proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            raise AssertionError(f"the server did not stop on Ctrl-C:\n{self.log.read_text()}") from None


def _wait_healthy(server: Server, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert server.proc.poll() is None, (
            f"server exited with {server.proc.returncode}:\n{server.log.read_text()}"
        )
        try:
            if httpx.get(f"{server.api}/health", timeout=5).status_code == 200:  # health needs no auth
                return
        except httpx.TransportError:
            pass
        time.sleep(1)
    raise AssertionError(f"no /api/health within {timeout} s:\n{server.log.read_text()}")


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Server:
    """`mmem server start` without --port/--host: the port from PREFECT_SERVER_API_PORT, the host
    Prefect's default (127.0.0.1)."""
    tmp = tmp_path_factory.mktemp("server")
    port, root, log = _free_port(), tmp / "root", tmp / "server.log"
    env = _clean_env(tmp)
    env.update(PREFECT_SERVER_API_PORT=str(port),
               # A stray shared-server URL in the shell must not be where the local server goes.
               PREFECT_API_DATABASE_CONNECTION_URL="postgresql+asyncpg://nobody:s3cret@127.0.0.1:9/nowhere",
               PREFECT_UI_API_URL="http://127.0.0.1:1/api")  # a stale one, from another port
    with log.open("w") as out:
        proc = subprocess.Popen([MMEM, "--data-root", str(root), "server", "start"], env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    srv = Server(proc, f"http://127.0.0.1:{port}", port, root, log, env)
    try:
        _wait_healthy(srv)
        yield srv
    finally:
        if proc.poll() is None:
            srv.stop()


def test_port_host_and_database_from_the_settings_and_the_data_root(server):
    text = server.log.read_text()
    assert f"Prefect UI: {server.url}\n" in text
    assert f"export PREFECT_API_URL={server.api}" in text
    db = server.root / "prefect" / "prefect.db"
    assert f"Database: sqlite+aiosqlite:///{db.resolve()}" in text
    assert db.is_file() and db.stat().st_size > 0
    assert "s3cret" not in text
    # The UI in the browser calls the API on this port, not the stale one from the shell, and logs in.
    ui = httpx.get(f"{server.url}/ui-settings", timeout=30).json()
    assert ui["api_url"] == server.api and ui["auth"] == "BASIC" and ui["csrf_enabled"] is True
    # Bound to loopback only, on PREFECT_SERVER_API_PORT.
    listening = [c.laddr for c in psutil.Process(server.proc.pid).net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN]
    assert {(a.ip, a.port) for a in listening} == {("127.0.0.1", server.port)}, listening
    # The folder with the database (Secret blocks in clear) and the auth string is private.
    assert stat.S_IMODE((server.root / "prefect").stat().st_mode) == 0o700


def test_the_auth_string_is_generated_into_a_private_file_and_never_printed(server):
    path = server.root / "prefect" / "api-auth-string"
    st = path.lstat()
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.getuid()
    user, _, password = path.read_text().strip().partition(":")
    assert user and len(password) >= 32
    text = server.log.read_text()
    assert password not in text
    assert (
        f"the auth string kept in {path} (mode 0600)" in text and "UI login: the content of that file" in text
    )
    assert f'export PREFECT_API_AUTH_STRING="$(cat {path})"' in text


def test_no_credentials_no_api(server):
    """An outsider (another user, a page in the browser) without the auth string: 401 on reads,
    and writes refused, including the ones the issue used (list deployments, start a run, read
    Secret blocks)."""
    assert httpx.get(f"{server.api}/admin/version", timeout=30).status_code == 401
    assert httpx.get(f"{server.api}/csrf-token?client=x", timeout=30).status_code == 401  # no token either
    wrong = {"Authorization": "Basic " + base64.b64encode(b"mmem:guess").decode()}
    assert httpx.get(f"{server.api}/admin/version", headers=wrong, timeout=30).status_code == 401
    for path, body in (("/deployments/filter", {}), ("/block_documents/filter", {"include_secrets": True}),
                       ("/flow_runs/filter", {})):
        res = httpx.post(f"{server.api}{path}", json=body, headers={"Origin": FOREIGN}, timeout=30)
        assert res.status_code in (401, 403), (path, res.status_code, res.text)
        assert "access-control-allow-origin" not in res.headers and "[" not in res.text
    # DNS rebinding: a page at evil.example whose name now resolves to 127.0.0.1 sends its own Host
    # and Origin, and has no credentials: refused.
    res = httpx.get(f"{server.api}/admin/version", headers={"Host": f"evil.example:{server.port}",
                                                           "Origin": FOREIGN}, timeout=30)
    assert res.status_code == 401


def test_a_foreign_origin_gets_no_cors_grant(server):
    """CORS admits the server's own UI only: a page elsewhere may not read answers or pre-flight."""
    pre = httpx.options(f"{server.api}/flow_runs/filter", timeout=30, headers={
        "Origin": FOREIGN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert pre.status_code >= 400 and "access-control-allow-origin" not in pre.headers
    res = httpx.get(f"{server.api}/admin/version", headers={**server.auth(), "Origin": FOREIGN}, timeout=30)
    assert res.status_code == 200 and "access-control-allow-origin" not in res.headers
    own = httpx.get(
        f"{server.api}/admin/version", headers={**server.auth(), "Origin": server.url}, timeout=30
    )
    assert own.headers.get("access-control-allow-origin") == server.url


def test_the_auth_string_from_the_file_opens_the_api_and_csrf_guards_writes(server):
    auth = server.auth()
    assert httpx.get(f"{server.api}/admin/version", headers=auth, timeout=30).status_code == 200
    # CSRF on: a write with the credentials but without a token is refused; with one it passes.
    res = httpx.post(f"{server.api}/flow_runs/filter", json={"limit": 1}, headers=auth, timeout=30)
    assert res.status_code == 403 and "CSRF" in res.text
    token = httpx.get(f"{server.api}/csrf-token?client=test", headers=auth, timeout=30).json()["token"]
    res = httpx.post(f"{server.api}/flow_runs/filter", json={"limit": 1}, timeout=30,
                     headers={**auth, "Prefect-Csrf-Token": token, "Prefect-Csrf-Client": "test"})
    assert res.status_code == 200, res.text


def test_a_mmem_command_authenticates_by_itself(server, demo_dir, tmp_path):
    """`mmem ingest` with only PREFECT_API_URL exported (as the server's banner says) finds the auth
    string under its data root; its flow run is on the server."""
    env = {**server.env, "PREFECT_API_URL": server.api}
    for k in ("PREFECT_SERVER_API_PORT", "PREFECT_API_DATABASE_CONNECTION_URL", "PREFECT_UI_API_URL"):
        env.pop(k)
    res = subprocess.run(
        [
            MMEM,
            "--data-root",
            str(server.root),
            "ingest",
            "--visdial",
            str(demo_dir / "visdial_1.0_val.json"),
            "--images",
            str(demo_dir / "images" / "val2014"),
            "--coco",
            str(demo_dir / "captions_val2014.json"),
            "--workers",
            "1",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert [r["state_type"] for r in _flow_runs(server, "ingest")] == ["COMPLETED"]
    # A plain Prefect client is told how: it passes the string itself (PREFECT_API_AUTH_STRING).
    code = "from prefect import flow\n@flow(name='hello-server')\ndef f():\n    return 1\nf()"
    secret = (server.root / "prefect" / "api-auth-string").read_text().strip()
    ran = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        env={**env, "PREFECT_API_AUTH_STRING": secret},
    )
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert [r["state_type"] for r in _flow_runs(server, "hello-server")] == ["COMPLETED"]
    # ... and without it, it is refused.
    refused = subprocess.run([sys.executable, "-c", code.replace("hello-server", "no-auth")], check=False,
                             capture_output=True, text=True, timeout=300, env=env)
    assert refused.returncode != 0 and "401" in refused.stderr, refused.stderr[-3000:]
    assert _flow_runs(server, "no-auth") == []


def _flow_runs(server: Server, flow: str) -> list[dict]:
    auth = server.auth()
    token = httpx.get(f"{server.api}/csrf-token?client=t", headers=auth, timeout=30).json()["token"]
    res = httpx.post(f"{server.api}/flow_runs/filter", timeout=30,
                     json={"limit": 50, "flows": {"name": {"any_": [flow]}}},
                     headers={**auth, "Prefect-Csrf-Token": token, "Prefect-Csrf-Client": "t"})
    res.raise_for_status()
    return res.json()


@pytest.mark.parametrize("how", ["option", "setting"])
def test_a_non_loopback_host_without_an_auth_string_is_refused(tmp_path, how):
    """Refused before anything binds (a subprocess: the command execs the server when it starts),
    whether the host comes from --host or from PREFECT_SERVER_API_HOST."""
    env, args = _clean_env(tmp_path), ["--port", str(_free_port())]
    if how == "option":
        args += ["--host", "0.0.0.0"]
    else:
        env["PREFECT_SERVER_API_HOST"] = "0.0.0.0"
    res = subprocess.run([MMEM, "--data-root", str(tmp_path / "root"), "server", "start", *args], env=env,
                         capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "--host 0.0.0.0 opens the API to other machines" in res.stderr
    assert "PREFECT_SERVER_API_AUTH_STRING" in res.stderr
    assert not (tmp_path / "root" / "prefect" / "api-auth-string").exists()


def test_server_start_rejects_a_bad_database_url(tmp_path):
    from cli.main import app

    base = ["--data-root", str(tmp_path), "server", "start", "--database-url"]
    res = CliRunner().invoke(app, [*base, "not a url"])
    assert res.exit_code == 1 and "--database-url: Could not parse" in res.output
    res = CliRunner().invoke(app, [*base, "mysql://me:s3cret@db/prefect"])
    assert res.exit_code == 1 and "runs on SQLite" in res.output and "PostgreSQL" in res.output
    assert "mysql://me:***@db/prefect" in res.output and "s3cret" not in res.output


def test_server_stops_on_ctrl_c_and_kept_the_runs_in_its_sqlite_file(server):
    assert server.stop() == 0, server.log.read_text()
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", server.port)) != 0  # the port is free again
    with sqlite3.connect(server.root / "prefect" / "prefect.db") as con:
        assert con.execute("SELECT count(*) FROM flow_run").fetchone()[0] >= 1


def test_an_auth_file_that_is_not_private_is_neither_used_nor_reused(tmp_path, monkeypatch):
    """A client hands the string over only from a 0600 regular file of its user, to a loopback API."""
    from cli.common import UnsafeAuthFile, auth_file, ensure_auth_file, read_auth_file, use_local_server_auth

    path = auth_file(tmp_path)
    secret = ensure_auth_file(path)
    assert (
        stat.S_IMODE(path.stat().st_mode) == 0o600 and ensure_auth_file(path) == secret
    )  # kept, not rotated
    monkeypatch.delenv("PREFECT_API_AUTH_STRING", raising=False)
    monkeypatch.setenv("PREFECT_API_URL", "http://10.1.2.3:4200/api")  # not this machine's loopback
    assert use_local_server_auth(tmp_path) is False and "PREFECT_API_AUTH_STRING" not in os.environ
    path.chmod(0o644)
    with pytest.raises(UnsafeAuthFile, match="mode 0600"):
        read_auth_file(path)
    monkeypatch.setenv("PREFECT_API_URL", f"http://127.0.0.1:{_free_port()}/api")
    assert use_local_server_auth(tmp_path) is False and "PREFECT_API_AUTH_STRING" not in os.environ
    path.unlink()
    (tmp_path / "elsewhere").write_text("mmem:planted\n")
    path.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(UnsafeAuthFile):
        read_auth_file(path)
    with pytest.raises(UnsafeAuthFile):
        ensure_auth_file(path)
