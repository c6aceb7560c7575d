"""``mmem server start``: a real Prefect server on SQLite under the data root, on loopback only,
whatever database URL the shell happens to export; it takes flow runs and stops on Ctrl-C."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
from typer.testing import CliRunner

MMEM = str(Path(sys.executable).with_name("mmem"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"server exited with {proc.returncode}:\n{log.read_text()}"
        try:
            if httpx.get(f"{url}/api/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(1)
    raise AssertionError(f"no /api/health within {timeout} s:\n{log.read_text()}")


def test_server_start_runs_prefect_on_sqlite_under_the_data_root_on_loopback(tmp_path):
    port, root, log = _free_port(), tmp_path / "root", tmp_path / "server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), DO_NOT_TRACK="1",
               # A stray shared-server URL in the shell must not be where the local server goes.
               PREFECT_API_DATABASE_CONNECTION_URL="postgresql+asyncpg://nobody:s3cret@127.0.0.1:9/nowhere",
               PREFECT_UI_API_URL="http://127.0.0.1:1/api")  # a stale one, from another port
    with log.open("w") as out:
        proc = subprocess.Popen([MMEM, "--data-root", str(root), "server", "start", "--port", str(port)], env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc, log)
        text = log.read_text()
        assert f"Prefect UI: {url}\n" in text
        assert f"export PREFECT_API_URL={url}/api" in text
        db = root / "prefect" / "prefect.db"
        assert f"Database: sqlite+aiosqlite:///{db.resolve()}" in text
        assert db.is_file() and db.stat().st_size > 0
        assert "s3cret" not in text
        # The UI in the browser calls the API on this port, not the stale one from the shell.
        assert httpx.get(f"{url}/ui-settings", timeout=10).json()["api_url"] == f"{url}/api"
        # Bound to loopback only.
        listening = [c.laddr for c in psutil.Process(proc.pid).net_connections(kind="inet")
                     if c.status == psutil.CONN_LISTEN]
        assert listening and {a.ip for a in listening} == {"127.0.0.1"}, listening
        # It takes flow runs (as `mmem ...` does with PREFECT_API_URL exported), and keeps them in that file.
        code = "from prefect import flow\n@flow(name='hello-server')\ndef f():\n    return 1\nf()"
        ran = subprocess.run([sys.executable, "-c", code], check=False, env={**env, "PREFECT_API_URL": f"{url}/api"},
                             capture_output=True, text=True, timeout=120)
        assert ran.returncode == 0, ran.stderr
        runs = httpx.post(f"{url}/api/flow_runs/filter", json={"limit": 10}, timeout=10).json()
        assert [r["state_type"] for r in runs] == ["COMPLETED"]
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # what Ctrl-C does
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise AssertionError(f"the server did not stop on Ctrl-C:\n{log.read_text()}") from None
    assert proc.returncode == 0, log.read_text()
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0  # the port is free again
    import sqlite3

    with sqlite3.connect(db) as con:  # the run is in the SQLite file, not somewhere else
        assert con.execute("SELECT count(*) FROM flow_run").fetchone()[0] == 1


def test_server_start_rejects_a_bad_database_url(tmp_path):
    from cli.main import app

    base = ["--data-root", str(tmp_path), "server", "start", "--database-url"]
    res = CliRunner().invoke(app, [*base, "not a url"])
    assert res.exit_code == 1 and "--database-url: Could not parse" in res.output
    res = CliRunner().invoke(app, [*base, "mysql://me:s3cret@db/prefect"])
    assert res.exit_code == 1 and "runs on SQLite" in res.output and "PostgreSQL" in res.output
    assert "mysql://me:***@db/prefect" in res.output and "s3cret" not in res.output
