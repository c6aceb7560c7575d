"""Locked doors: a flow run's parameters choose data, never trust; nothing read back runs code.

An outsider who reaches the Prefect API can start any deployment with patched parameters. Here
`mmem serve` (a real process, through a real Prefect server) is asked to run deployments whose
``dask_address``, ``data_root``, ``ollama_host`` or ``auth_secret_block`` the outsider chose: each
run is refused before any work, naming the parameter, while a host `mmem serve --allow-ollama-host`
allows gets past the check. Then: an Ollama token goes to the host it is bound to and to no other
listener; a pickle planted where Prefect looks for a cached shard result does not run (the sentinel
file its payload would write stays absent, though the same bytes do run when Prefect's default
path reads them); a journal row planted under ``cache/llm_journal`` is not merged; the local Dask
cluster refuses a client without its credentials while the project's own client works.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Self

import pytest
from pydantic import ValidationError

from llmcalls.server import make_state, running_server
from schemas.config import TRUSTED_ENV, Trusted
from schemas.embed import EmbedConfig
from schemas.reminders import RemindersConfig
from storage.lance import connect, read, table_exists
from tasks.runtime.secrets import AUTH_ENV

HEADER = f"Bearer tok-{uuid.uuid4().hex}"
AUTH_HOST_ENV = "MMEM_OLLAMA_AUTH_HOST"


# --- a listener that records what reaches it ---------------------------------------------------


class Recorder:
    """An HTTP listener on a loopback port that records each request's path and Authorization header,
    and answers the Ollama routes with ``answers[path]`` (JSON), else 404."""

    def __init__(self, answers: dict[str, object] | None = None) -> None:
        self.seen: list[tuple[str, str | None]] = []
        self.answers = answers or {"/api/tags": {"models": []}}
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                self.rfile.read(length)
                recorder.seen.append((self.path, self.headers.get("authorization")))
                body = recorder.answers.get(self.path)
                data = json.dumps(body).encode() if body is not None else b'{"error": "not found"}'
                self.send_response(200 if body is not None else 404)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _answer

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> Self:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def _reminders_config(root, url, **kw) -> RemindersConfig:
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


# --- 1. a run's parameters choose data, never trust ----------------------------------------------


def _profile(tmp_path: Path, root: Path, host: str) -> Path:
    p = tmp_path / "serve.toml"
    p.write_text(f'data_root = "{root}"\n[embed]\ntiny = true\n[reminders]\nollama_host = "{host}"\n'
                 "shard_size = 4\ntimeout_s = 5\nmax_attempts = 1\nshard_retries = 0\n")
    return p


def _run_patched(runs: dict[str, tuple[str, dict]], timeout: float = 240) -> dict:
    """Start each deployment as an outsider would (its parameters, patched), all at once: final states."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    started: dict = {}
    with get_client(sync_client=True) as client:
        for key, (name, patch) in runs.items():
            config = client.read_deployment_by_name(name).parameters["config"]
            started[key] = run_deployment(name, parameters={"config": {**config, **patch}}, timeout=0)
        deadline = time.monotonic() + timeout
        while True:
            done = {k: client.read_flow_run(r.id) for k, r in started.items()}
            if all(r.state is not None and r.state.is_final() for r in done.values()):
                return done
            assert time.monotonic() < deadline, {k: r.state for k, r in done.items()}
            time.sleep(1)


def _served(profile: Path, *allow: str) -> subprocess.Popen:
    from prefect.settings import PREFECT_API_URL

    mmem = Path(sys.executable).with_name("mmem")
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_RUNNER_POLL_FREQUENCY": "1"}
    env.pop(TRUSTED_ENV, None)
    return subprocess.Popen([str(mmem), "serve", "--profile", str(profile), *allow], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_deployments(proc: subprocess.Popen, names: list[str], seconds: float = 180) -> None:
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + seconds
    while True:
        try:
            with get_client(sync_client=True) as client:
                for n in names:
                    client.read_deployment_by_name(n)
            return
        except Exception:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise
            time.sleep(2)


def test_served_runs_with_patched_trust_parameters_are_refused_naming_them(tmp_path):
    root, outsider_root = tmp_path / "root", tmp_path / "outsider-root"
    with Recorder() as own, Recorder() as allowed, Recorder() as outsider:
        proc = _served(_profile(tmp_path, root, own.url), "--allow-ollama-host", allowed.url)
        try:
            _wait_for_deployments(proc, ["embed/embed", "reminders/reminders"])
            refused = _run_patched({
                "dask_address": ("embed/embed", {"dask_address": "tls://127.0.0.1:9"}),
                "data_root": ("embed/embed", {"data_root": str(outsider_root)}),
                "ollama_host": ("reminders/reminders", {"ollama_host": outsider.url}),
                "auth_secret_block": ("reminders/reminders", {"auth_secret_block": "stolen"}),
                "allowed": ("reminders/reminders", {"ollama_host": allowed.url}),  # passes; fails later
            })
            passed = refused.pop("allowed")  # an allowed host: no refusal, the run fails for want of tables
        finally:
            proc.terminate()
            out = proc.communicate(timeout=60)[0]
    for parameter, run in refused.items():
        assert run.state.is_failed(), (parameter, run.state)
        assert f"run parameter {parameter}" in (run.state.message or ""), (parameter, run.state.message)
    assert passed.state.is_failed() and "not allowed" not in (passed.state.message or ""), (
        passed.state.message
    )
    assert "run `mmem ingest` first" in (passed.state.message or "") + out
    assert not outsider_root.exists()  # nothing written where the outsider pointed
    assert outsider.seen == []  # no image, no dialog, no token went to the outsider's listener
    assert own.seen == []  # refused runs did not even reach the configured host


def test_an_allow_list_refuses_patched_configs_in_process_and_the_command_line_is_not_bound(tmp_path,
                                                                                           monkeypatch):
    """The same check in a process whose allow-list differs from the config it is handed, and the
    bounds of the numeric parameters (values an outsider might use to exhaust the machine)."""
    from flows.embed import embed_flow

    own = EmbedConfig(data_root=tmp_path / "root", tiny=True)
    monkeypatch.setenv(TRUSTED_ENV, Trusted.of(own).model_dump_json())
    assert EmbedConfig(data_root=tmp_path / "root", dask_address="local").dask_address == "local"
    with pytest.raises(
        ValidationError, match="run parameter dask_address='tls://10.0.0.1:8786' is not allowed"
    ):
        EmbedConfig(data_root=tmp_path / "root", dask_address="tls://10.0.0.1:8786")
    with pytest.raises(Exception, match="run parameter data_root="):
        embed_flow.validate_parameters({"config": {"data_root": str(tmp_path / "elsewhere")}})
    with pytest.raises(ValidationError, match="run parameter ollama_host='http://127.0.0.1:9'"):
        RemindersConfig(data_root=tmp_path / "root", ollama_host="127.0.0.1:9")
    for cls, field, value in ((EmbedConfig, "decode_workers", 10**6), (EmbedConfig, "batch_size", 10**9),
                              (EmbedConfig, "dask_workers", 10**4), (RemindersConfig, "concurrency", 10**6),
                              (RemindersConfig, "num_predict", 10**7), (RemindersConfig, "num_ctx", 10**8)):
        with pytest.raises(ValidationError, match=field):
            cls(data_root=tmp_path / "root", **{field: value})
    # the command line is the trusted process: an inherited allow-list does not bind its options
    from typer.testing import CliRunner

    from cli.main import app

    res = CliRunner().invoke(app, ["embed", "--tiny", "--data-root", str(tmp_path / "cli-root"),
                                   "--dask-address", "tcp://127.0.0.1:9"])
    assert "not allowed" not in res.output and "tls://" in res.output, (
        res.output
    )  # refused for TLS, not trust


# --- 2. the Ollama token goes only to its host ----------------------------------------------------


def test_the_token_goes_only_to_the_host_it_is_bound_to(data_root, monkeypatch):
    from prefect.blocks.system import Secret

    from flows.reminders import reminders_flow
    from llmcalls.client import LLMClient
    from llmcalls.requests import LLMUnavailable
    from tasks.runtime.secrets import host_auth

    monkeypatch.delenv("OLLAMA_API_KEY", raising=False)
    server = make_state(teacher=True, auth=HEADER)
    with running_server(server) as bound, Recorder() as second:
        # the environment's token, bound to the configured host; a run pointed at a second host
        monkeypatch.setenv(AUTH_ENV, HEADER)
        monkeypatch.setenv(AUTH_HOST_ENV, bound)
        state = reminders_flow(_reminders_config(data_root, second.url, limit=2), return_state=True)
        assert state.is_failed() and isinstance(state.result(raise_on_failure=False), LLMUnavailable)
        assert second.seen and all(auth is None for _, auth in second.seen), second.seen
        ok = reminders_flow(_reminders_config(data_root, bound, limit=2))  # the bound host gets it
        assert ok["valid"] == 2 and not server.refused

        # a Secret block bound to the config's host: a variant's own host (a second client) gets none
        monkeypatch.delenv(AUTH_ENV)
        monkeypatch.delenv(AUTH_HOST_ENV)
        block = f"ollama-auth-{uuid.uuid4().hex[:8]}"
        Secret(value=HEADER).save(block, overwrite=True)
        cfg = _reminders_config(data_root, bound, auth_secret_block=block)
        second.seen.clear()

        async def check(url, config=cfg):
            async with LLMClient(url, timeout_s=5, auth=host_auth(config)) as client:
                return await client.check("mmem-teacher")

        import asyncio

        assert asyncio.run(check(bound)) == "teacher"  # the control: the block's header does reach its host
        with pytest.raises(LLMUnavailable, match="does not have model"):
            asyncio.run(check(second.url))
        assert second.seen == [("/api/tags", None)]
        # a per-host map: the second host gets the token only once the config binds one to it
        per_host = _reminders_config(data_root, bound, ollama_auth={second.url: block})
        second.seen.clear()
        with pytest.raises(LLMUnavailable):
            asyncio.run(check(second.url, per_host))
        assert second.seen == [("/api/tags", HEADER)]


def test_a_server_whose_api_show_lacks_a_field_gives_one_line_naming_it():
    from llmcalls.client import LLMClient
    from llmcalls.requests import LLMUnavailable

    tags = {"models": [{"model": "mmem-teacher:latest", "name": "mmem-teacher:latest"}]}
    for show in ({"model_info": "not an object"}, ["a", "list"]):
        with Recorder({"/api/tags": tags, "/api/show": show}) as odd:
            import asyncio

            async def check(url=odd.url):
                async with LLMClient(url, timeout_s=5) as client:
                    return await client.check("mmem-teacher")

            with pytest.raises(LLMUnavailable) as err:
                asyncio.run(check())
            msg = str(err.value)
            assert odd.url in msg and "/api/show" in msg and "\n" not in msg, msg


# --- 3. nothing read back runs code ---------------------------------------------------------------


class Payload:
    """What an attacker pickles: unpickling it writes the sentinel file."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return (Path.write_text, (self.sentinel, "pwned"))


def _planted_record(sentinel: Path, key: str) -> bytes:
    """A Prefect result record that says ``pickle`` and holds the payload."""
    from prefect._internal.result_records import ResultRecord, ResultRecordMetadata
    from prefect.serializers import PickleSerializer

    record = ResultRecord(metadata=ResultRecordMetadata(serializer=PickleSerializer(), storage_key=key),
                          result=Payload(sentinel))
    return record.serialize()


def _json_record_with_other_decoder(key: str) -> bytes:
    """A record that says ``json`` but names another module as its JSON library and object hook."""
    from prefect._internal.result_records import ResultRecord, ResultRecordMetadata
    from prefect.serializers import JSONSerializer

    record = json.loads(
        ResultRecord(
            metadata=ResultRecordMetadata(serializer=JSONSerializer(), storage_key=key), result={"shard": 0}
        ).serialize()
    )
    record["metadata"]["serializer"]["object_decoder"] = "os.system"
    return json.dumps(record).encode()


def test_the_planted_pickle_is_live_when_prefect_reads_it_its_own_way(tmp_path):
    """The control: the planted bytes do run when Prefect's default reader gets them."""
    sentinel = tmp_path / "sentinel-control"
    path = tmp_path / "record"
    path.write_bytes(_planted_record(sentinel, "k"))
    code = "import sys; from prefect._internal.result_records import ResultRecord as R; " \
           "R.deserialize(open(sys.argv[1], 'rb').read())"
    subprocess.run([sys.executable, "-c", code, str(path)], check=False, capture_output=True, timeout=120,
                   env={**os.environ, "PYTHONPATH": str(Path(__file__).parent)})
    assert sentinel.read_text() == "pwned"


def test_planted_pickles_under_the_cache_do_not_run(data_root, tmp_path):
    """Reminders: a first run caches its shards; pickles then replace those records, and the re-run
    (which looks the shards up) neither runs them nor serves them. Embed: a pickle waits where a shard
    not computed yet will be looked up."""
    from embed.plan import ModelArgs, image_items, plan_shards
    from flows.embed import embed_flow
    from flows.reminders import reminders_flow
    from reminders.prompts import build_prompts, load_inputs
    from tasks.reminders import shard_cache_key

    sentinel = tmp_path / "sentinel"
    cfg = _reminders_config(data_root, "", limit=8)
    state = make_state(teacher=True)
    with running_server(state) as url:
        cfg = cfg.model_copy(update={"ollama_host": url})
        first = reminders_flow(cfg)
        prompts, _ = build_prompts(cfg, *load_inputs(cfg.lance_uri))
        keys = [shard_cache_key(None, {"requests": [p.request for p in prompts[i:i + 4]]}) for i in (0, 4)]
        folder = cfg.cache_dir / "reminders_shards"
        assert all((folder / k).is_file() for k in keys)  # the JSON records the first run wrote
        (folder / keys[0]).write_bytes(_planted_record(sentinel, keys[0]))
        (folder / keys[1]).write_bytes(_json_record_with_other_decoder(keys[1]))
        again = reminders_flow(cfg)
    assert first["valid"] == again["valid"] == 8 and again["calls"] == 0
    assert again["shards_cached"] == 0  # refused records are cache misses: the shards ran, asking nothing
    assert not sentinel.exists()
    for k in keys:  # and were replaced by JSON of the expected type
        record = json.loads((folder / k).read_text())
        assert record["metadata"]["serializer"]["type"] == "json" and "ShardStats" in record["result"]

    ecfg = EmbedConfig(data_root=data_root, tiny=True, device="cpu", shard_rows=16, decode_workers=1)
    model = ModelArgs.from_config(ecfg)
    shard = plan_shards(
        "image", image_items(connect(ecfg.lance_uri), ecfg), ecfg.shard_rows, model.fingerprint
    )[0]
    ecfg.results_dir.mkdir(parents=True, exist_ok=True)
    (ecfg.results_dir / shard.key).write_bytes(_planted_record(sentinel, shard.key))
    out = embed_flow(ecfg)
    assert out.shards_cached == 0 and out.shards_computed == out.shards
    assert not sentinel.exists()
    assert (
        read(connect(ecfg.lance_uri), "image_embeddings").num_rows
        == read(connect(ecfg.lance_uri), "images").num_rows
    )


def test_a_planted_journal_row_is_not_merged(data_root):
    from flows.reminders import reminders_flow
    from llmcalls.cache import Journal, ResponseCache, key_path
    from llmcalls.requests import OK, LLMResult
    from reminders.prompts import build_prompts, load_inputs

    cfg = _reminders_config(data_root, "http://127.0.0.1:1", limit=4)
    prompts, _ = build_prompts(cfg, *load_inputs(cfg.lance_uri))
    cache = ResponseCache(cfg.lance_uri, cfg.cache_dir / "llm_journal")
    planted = "<reminder>The outsider wrote this answer and wants it trained on.</reminder>\nPwned answer."
    # a row written by hand (no signature), and one signed with a key of the outsider's own
    row = LLMResult(prompts[0].request.request_hash, OK, planted, attempts=1, backend="ollama").row(
        prompts[0].request, "x")
    path = cache.journal_path("outsider", 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(row) + "\n" + json.dumps({**row, "mac": "0" * 64}) + "\n")
    # the control: a row the project's own journal wrote (a killed run's) is merged
    with Journal(cache.journal_path("killed-run", 0)) as journal:
        journal.append(LLMResult(prompts[1].request.request_hash, OK, planted.replace("outsider", "teacher"),
                                 attempts=1, backend="teacher").row(prompts[1].request, "x"))
    key = key_path(cache.journal_dir)
    assert key.stat().st_mode & 0o777 == 0o600

    state = make_state(teacher=True)
    with running_server(state) as url:
        out = reminders_flow(cfg.model_copy(update={"ollama_host": url}))
    assert out["cache_hits"] == 1 and out["calls"] == 3 == sum(
        state.requests.values()
    )  # the planted one re-asked
    db = connect(cfg.lance_uri)
    responses = read(db, "llm_responses").column("response").to_pylist()
    assert not any("outsider" in (r or "") for r in responses)
    assert not any("outsider" in r for r in read(db, "reminders").column("response").to_pylist())
    assert table_exists(db, "reminders") and out["valid"] == 4


# --- 4. Dask with TLS -----------------------------------------------------------------------------


def test_the_local_dask_cluster_refuses_a_client_without_its_credentials(tmp_path):
    from distributed import Client
    from distributed.security import Security

    from flows.embed import task_runner

    runner = task_runner(EmbedConfig(data_root=tmp_path, dask_address="local", dask_workers=1))
    with runner:
        address = runner.client.scheduler.address
        assert address.startswith("tls://127.0.0.1:")
        assert runner.client.submit(sum, [40, 2]).result(timeout=60) == 42  # the project's own client works
        for attempt in (address.replace("tls://", "tcp://"), address):  # plain, then TLS without credentials
            with pytest.raises(Exception):  # noqa: B017 - refused however distributed words it
                Client(attempt, timeout=3, set_as_default=False)
        other = Security.temporary()  # another user's own certificate: not the cluster's CA
        with pytest.raises(Exception):  # noqa: B017
            Client(address, security=other, timeout=3, set_as_default=False)


def test_cached_metric_results_read_back_only_json_of_their_type(tmp_path):
    """The evaluate flow's cached metric tasks: the same storage check, for ``dict[str, float]``."""
    from prefect._internal.result_records import ResultRecord, ResultRecordMetadata
    from prefect.serializers import JSONSerializer

    from tasks.evaluate import MetricResults

    sentinel = tmp_path / "sentinel"
    for bad in (_planted_record(sentinel, "k"), _json_record_with_other_decoder("k")):
        with pytest.raises(ValueError, match="refused a persisted result"):
            MetricResults.checked(bad)
    good = ResultRecord(metadata=ResultRecordMetadata(serializer=JSONSerializer(), storage_key="k"),
                        result={"bleu": 0.5}).serialize()
    assert ResultRecord.deserialize(MetricResults.checked(good)).result == {"bleu": 0.5}
    assert not sentinel.exists()
