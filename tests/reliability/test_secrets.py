"""Secrets and binding: an Ollama auth header reaches the server and nothing else; servers stay local.

The reminders flow runs against the loopback server requiring a token: once with the header from
a Prefect Secret block, once from ``$MMEM_OLLAMA_AUTH``, once with neither (it must fail before any
shard, saying what to set). Then every place a secret could leak is searched for the token: the
Prefect logs, artifacts and run records (parameters, state messages) of those runs and their
task runs and subflows, every file and every version of every Lance table under the data root,
Prefect's result storage, and the process's own stdout/stderr and log records. A canary flow
writes a second distinctive string into each of those places on purpose, and the same search must
find it there: a search that cannot find anything proves nothing.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import psutil
import pytest

from llmcalls.server import make_state, running_server
from schemas.reminders import RemindersConfig
from tasks.runtime.secrets import AUTH_ENV, SecretUnavailable

TOKEN = f"tok-{uuid.uuid4().hex}-mmem-secret"
HEADER = f"Bearer {TOKEN}"


def _config(root, url, **kw) -> RemindersConfig:
    base = {
        "data_root": root,
        "ollama_host": url,
        "model": "mmem-teacher",
        "shard_size": 4,
        "shard_retries": 0,
        "backoff_s": 0.01,
        "backoff_max_s": 0.05,
        "timeout_s": 5,
        "concurrency": 4,
    }
    return RemindersConfig(**{**base, **kw})


# --- where a secret could end up --------------------------------------------------------------


def _runs(client, flow_run_ids: set) -> tuple[list, list]:
    """The flow runs, their subflows (transitively) and all their task runs."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterParentTaskRunId
    from prefect.client.schemas.sorting import FlowRunSort, TaskRunSort

    flows, tasks, ids = {}, {}, set(flow_run_ids)
    while ids - set(flows):
        for fr in _paged(client.read_flow_runs, sort=FlowRunSort.ID_DESC,
                         flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=list(ids)))):
            flows[fr.id] = fr
        for tr in _paged(client.read_task_runs, sort=TaskRunSort.ID_DESC,
                         flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=list(flows)))):
            tasks[tr.id] = tr
        children = _paged(client.read_flow_runs, sort=FlowRunSort.ID_DESC, flow_run_filter=FlowRunFilter(
            parent_task_run_id=FlowRunFilterParentTaskRunId(any_=list(tasks))))
        ids = set(flows) | {c.id for c in children}
    return list(flows.values()), list(tasks.values())


def _paged(read, **kw) -> list:
    out, offset = [], 0
    while page := read(limit=200, offset=offset, **kw):
        out += page
        offset += len(page)
        if len(page) < 200:
            break
    return out


def _lance_rows(root: Path) -> str:
    """Every row of every version of every Lance dataset under ``root``, decoded (the files may
    compress strings, so a byte search alone could miss them)."""
    import lance

    texts = []
    for path in sorted(root.rglob("*.lance")):
        if path.is_dir() and (path / "_versions").is_dir():
            for v in lance.dataset(str(path)).versions():
                texts.append(str(lance.dataset(str(path), version=v["version"]).to_table().to_pylist()))
    return "\n".join(texts)


def _files(root: Path, since: float | None = None) -> bytes:
    return b"\n".join(p.read_bytes() for p in sorted(root.rglob("*"))
                      if p.is_file() and (since is None or p.stat().st_mtime >= since))


def _results(folder: Path, since: float) -> bytes:
    """Prefect's persisted results written since ``since``: each a JSON record whose ``result`` is
    the base64 of the serialized value, so both the record and the decoded value are searched."""
    out = []
    for p in sorted(folder.rglob("*")) if folder.is_dir() else []:
        if p.is_file() and p.stat().st_mtime >= since:
            raw = p.read_bytes()
            out.append(raw)
            try:
                out.append(base64.b64decode(json.loads(raw)["result"]))
            except (ValueError, KeyError, TypeError):
                pass
    return b"\n".join(out)


def haystack(flow_run_ids: set, data_root: Path, since: float) -> dict[str, str | bytes]:
    """Everything a flow run left behind, by where it is, as searchable text (or bytes)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import LogSort
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH

    APILogWorker.drain_all()  # logs are shipped in batches: send what is queued before reading them back
    with get_client(sync_client=True) as client:
        flows, tasks = _runs(client, flow_run_ids)
        ids = [str(f.id) for f in flows]
        logs = _paged(client.read_logs, sort=LogSort.TIMESTAMP_ASC,
                      log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=ids)))
        # the REST endpoint: the sync client's read_artifacts sends filters the server rejects or ignores
        artifacts = _paged(lambda **kw: client._client.post("/artifacts/filter", json={
            "artifacts": {"flow_run_id": {"any_": ids}}, "sort": "ID_DESC", **kw}).json())
    results = Path(PREFECT_LOCAL_STORAGE_PATH.value()).expanduser()
    return {
        "logs": "\n".join(f"{g.name} {g.message}" for g in logs),
        "artifacts": json.dumps(artifacts),
        "parameters": "\n".join(str(f.parameters) for f in flows),
        "run records": "\n".join(r.model_dump_json() for r in flows + tasks),
        "data files": _files(data_root),
        "lance rows": _lance_rows(data_root),
        "result storage": _results(results, since),
    }


def found(needle: str, hay: dict) -> set[str]:
    return {k for k, v in hay.items() if (needle.encode() if isinstance(v, bytes) else needle) in v}


def _canary_flow_run(canary: str, data_root: Path) -> str:
    """A flow that leaks ``canary`` on purpose into each place ``haystack`` searches."""
    import lance
    import pyarrow as pa
    from prefect import flow, task

    from tasks.runtime import logger, publish_markdown

    @task(persist_result=True)
    def leak_task(value: str) -> str:
        logger().info("task sees %s", value)
        return f"result {value}"

    @flow(name="secret-canary", log_prints=True)
    def canary_flow(value: str) -> str:
        logger().info("flow sees %s", value)
        leak_task(value)
        print(f"printed {value}")
        print(f"to stderr {value}", file=sys.stderr)
        publish_markdown("secret-canary", f"artifact holds {value}", "canary")
        lance.write_dataset(pa.table({"v": [f"row {value}"]}), str(data_root / "canary" / "t.lance"))
        raise RuntimeError(f"failed with {value}")  # exception text goes into the state message

    state = canary_flow(canary, return_state=True)
    assert state.is_failed()
    return state.state_details.flow_run_id


# --- the tests --------------------------------------------------------------------------------


def _captured(request, capfd) -> str:
    """All this test's stdout and stderr: the fd-level capture plus pytest's global capture, which
    is where handlers made before the test (Prefect's console handler) still write."""
    out = capfd.readouterr()
    capman = request.config.pluginmanager.getplugin("capturemanager")
    more = capman.read_global_capture() if capman is not None and capman.is_globally_capturing() else None
    return out.out + out.err + (more.out + more.err if more else "")


def test_token_reaches_the_server_and_nothing_else(data_root, monkeypatch, capfd, caplog, request):
    from prefect.blocks.system import Secret

    from flows.reminders import reminders_flow
    from llmcalls.requests import LLMUnavailable
    from storage.lance import connect, read

    caplog.set_level(logging.DEBUG)  # httpx/httpcore/ollama debug records too: a header there would show
    monkeypatch.delenv(AUTH_ENV, raising=False)
    monkeypatch.delenv("OLLAMA_API_KEY", raising=False)  # the ollama library's own fallback header
    since = time.time()
    block = f"ollama-auth-{uuid.uuid4().hex[:8]}"
    Secret(value=HEADER).save(block, overwrite=True)
    server = make_state(teacher=True, auth=HEADER)
    runs = []
    with running_server(server) as url:
        # 1. the header from the Prefect Secret block; the config carries only the block's name
        state = reminders_flow(_config(data_root, url, limit=4, auth_secret_block=block), return_state=True)
        runs.append(state.state_details.flow_run_id)
        assert state.is_completed(), state.message
        assert state.result()["valid"] == 4 and sum(server.requests.values()) == 4 and not server.refused
        # 2. the header from the environment
        monkeypatch.setenv(AUTH_ENV, HEADER)
        state = reminders_flow(_config(data_root, url, limit=8), return_state=True)
        runs.append(state.state_details.flow_run_id)
        assert state.is_completed(), state.message
        assert state.result()["calls"] == 4 and sum(server.requests.values()) == 8 and not server.refused
        # 3. no header: fails at the health check, before any shard, saying what to set
        monkeypatch.delenv(AUTH_ENV)
        t0 = time.perf_counter()
        state = reminders_flow(_config(data_root, url, limit=12), return_state=True)
        runs.append(state.state_details.flow_run_id)
        assert state.is_failed() and time.perf_counter() - t0 < 15
        exc = state.result(raise_on_failure=False)
        assert isinstance(exc, LLMUnavailable), exc
        assert "Authorization header" in str(exc) and AUTH_ENV in str(exc) and "auth_secret_block" in str(exc)
        assert sum(server.requests.values()) == 8 and server.refused == {"missing": 1}
    assert read(connect(_config(data_root, url).lance_uri), "llm_responses").num_rows == 8

    canary = f"canary-{uuid.uuid4().hex}"
    canary_run = _canary_flow_run(canary, data_root)
    logging.getLogger("mmem").warning("log record %s", canary)

    process = {"stdout+stderr": _captured(request, capfd), "log records": caplog.text}
    leaks = haystack(set(runs), data_root, since)
    planted = haystack({canary_run}, data_root, since)
    # the search works: the canary is found in every kind of place it was planted
    assert found(canary, planted | process) == set(planted) | set(process)
    assert found(TOKEN, leaks | process) == set(), "the auth token leaked"
    assert block in leaks["parameters"]  # the name travels, the value does not


def test_wrong_header_and_missing_block_say_so_without_the_value(monkeypatch):
    """A refused header names where it came from; a missing block names the block; neither the value."""
    from llmcalls.client import LLMClient
    from llmcalls.requests import LLMUnavailable

    wrong = f"Bearer wrong-{uuid.uuid4().hex}"
    monkeypatch.setenv(AUTH_ENV, wrong)
    server = make_state(teacher=True, auth=HEADER)

    async def check(url):
        async with LLMClient(url, timeout_s=5) as c:
            return await c.check("mmem-teacher")

    with running_server(server) as url:
        with pytest.raises(LLMUnavailable, match=rf"from \${AUTH_ENV} was refused") as refused:
            asyncio.run(check(url))
        resp = httpx.get(f"{url}/api/tags", headers={"Authorization": wrong})
        assert resp.status_code == 401 and resp.headers["www-authenticate"] == "Bearer"
        assert wrong.split()[1] not in resp.text and TOKEN not in resp.text  # never echoed
        assert httpx.get(f"{url}/api/tags", headers={"Authorization": HEADER}).status_code == 200
    assert server.refused == {"wrong": 2} and wrong.split()[1] not in str(refused.value)
    assert TOKEN not in repr(server) and TOKEN not in repr(server.auth)  # reprs mask it
    with pytest.raises(SecretUnavailable, match="no Prefect Secret block named 'no-such-block'"):
        LLMClient("http://127.0.0.1:9", auth_block="no-such-block")


def _listening(pid: int, port: int) -> set[str]:
    procs = [psutil.Process(pid)]
    procs += procs[0].children(recursive=True)
    return {c.laddr.ip for p in procs for c in p.net_connections("inet")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port}


def test_servers_bind_loopback_by_default(tmp_path):
    """The in-process server, ``mmem llm serve`` (a real subprocess, token from the environment)
    and ``mmem server start``'s default all stay on 127.0.0.1; the embed flow starts no cluster."""
    import typer

    from cli.main import app
    from flows.embed import task_runner
    from schemas.embed import EmbedConfig

    with running_server(make_state(teacher=True)) as url:
        port = httpx.URL(url).port
        assert httpx.URL(url).host == "127.0.0.1" and _listening(os.getpid(), port) == {"127.0.0.1"}

    mmem = Path(sys.executable).with_name("mmem")
    env = {**os.environ, AUTH_ENV: HEADER}
    proc = subprocess.Popen(
        [str(mmem), "llm", "serve", "--teacher", "--port", "0", "--require-auth"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        banner = proc.stdout.readline()
        assert "requires an Authorization header" in banner, banner
        url = banner.split(" at ", 1)[1].split(" ", 1)[0]
        assert httpx.URL(url).host == "127.0.0.1" and _listening(proc.pid, httpx.URL(url).port) == {
            "127.0.0.1"
        }
        assert httpx.get(f"{url}/api/version").status_code == 401
        assert httpx.get(f"{url}/api/version", headers={"Authorization": HEADER}).status_code == 200
    finally:
        proc.terminate()
        rest = proc.communicate(timeout=20)[0]
    assert TOKEN not in banner + rest

    cli = typer.main.get_command(app)
    defaults = {(group, cmd): {p.name: p.default for p in cli.commands[group].commands[cmd].params}
                for group, cmd in (("server", "start"), ("llm", "serve"))}
    # `server start` takes its host from Prefect's settings (PREFECT_SERVER_API_HOST), 127.0.0.1 by default
    from prefect.settings.models.server.api import ServerAPISettings

    assert (
        defaults["server", "start"]["host"] is None
        and ServerAPISettings.model_fields["host"].default == "127.0.0.1"
    )
    assert defaults["llm", "serve"]["host"] == "127.0.0.1"

    # embed: a thread pool, or the Dask cluster at the address given (tls:// only); were it to start a
    # LocalCluster of its own, that cluster must be pinned to loopback (distributed's dashboard binds
    # 0.0.0.0) and speak TLS with credentials of its own (tests/reliability/test_locked_doors.py)
    from flows.embed import DaskSecurityError

    local = task_runner(EmbedConfig(data_root=tmp_path))
    assert type(local).__name__ == "ThreadPoolTaskRunner"
    with pytest.raises(DaskSecurityError, match="must be reached over tls://"):
        task_runner(EmbedConfig(data_root=tmp_path, dask_address="tcp://127.0.0.1:8786"))
    cluster = task_runner(EmbedConfig(data_root=tmp_path, dask_address="local", dask_workers=2))
    kw = cluster.cluster_kwargs
    assert kw["n_workers"] == 2 and kw["security"] is True and not cluster.address
    assert kw.get("host") == "127.0.0.1" and str(kw.get("dashboard_address")).startswith(
        ("127.0.0.1", "None")
    )
