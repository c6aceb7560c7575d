"""A shard of LLM calls over several hosts (issue 20): ``run_shard`` with ``options.hosts`` spreads
the calls over real loopback Ollama-protocol servers, journals each once with the host that
answered, and finishes on the hosts left when one dies midway."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from llmcalls.auth import HostAuth
from llmcalls.cache import read_journal
from llmcalls.requests import OK, LLMRequest, LLMUnavailable
from llmcalls.shard import check_server, open_hosts, run_shard

_spec = importlib.util.spec_from_file_location(
    "slot_server", Path(__file__).resolve().parents[1] / "benchmarks" / "slot_server.py")
slot_server = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(slot_server)

MODEL = "gemma3:27b"


@pytest.fixture(scope="module")
def prefect_server():
    """Pure asyncio and HTTP: no Prefect server needed (overrides conftest's)."""
    yield


@dataclass(frozen=True)
class Hosts:
    """``ClientOptions`` with several hosts."""

    hosts: list[str] = field(default_factory=list)
    timeout_s: float = 10.0
    max_attempts: int = 4
    backoff_s: float = 0.1
    backoff_max_s: float = 1.0

    @property
    def host(self) -> str:
        return self.hosts[0]


def requests(n: int, prefix: str = "q") -> list[LLMRequest]:
    return [LLMRequest(MODEL, ({"role": "user", "content": f"{prefix}{i}"},), {"seed": 0}) for i in range(n)]


def test_a_shard_spreads_over_hosts_and_finishes_when_one_dies(tmp_path):
    async def main():
        a, b = slot_server.SlotServer(4, 0.05, MODEL), slot_server.SlotServer(2, 0.05, MODEL)
        await a.start(), await b.start()

        async def kill_b():
            while sum(b.answered.values()) < 20:
                await asyncio.sleep(0.01)
            await b.stop()

        killer = asyncio.create_task(kill_b())
        try:
            opts = Hosts([a.url, f"{b.url}=2"])
            stats = await run_shard(0, requests(300), opts, tmp_path / "shard.jsonl", 8, None,
                                    auth=HostAuth(), caps={a.url: 6})
        finally:
            killer.cancel()
            await a.stop()
            await b.stop()
        return a, b, stats

    a, b, stats = asyncio.run(main())
    rows = read_journal(tmp_path / "shard.jsonl")
    per_request = Counter(r["request_hash"] for r in rows)
    assert len(per_request) == 300 and set(per_request.values()) == {1}  # nothing lost, nothing twice
    assert all(r["status"] == OK and r["response"].startswith("answer to: q") for r in rows)
    by_host = Counter(r["host"] for r in rows)
    assert by_host[b.url] >= 20 and by_host[a.url] + by_host[b.url] == 300
    assert stats.ok == 300 and stats.failed == 0 and set(stats.hosts) == {a.url, b.url}
    assert stats.hosts[b.url]["downs"] == 1 and not stats.hosts[b.url]["up"]
    assert stats.hosts[a.url]["peak_concurrency"] <= 6 and stats.hosts[b.url]["peak_concurrency"] <= 2
    assert a.peak <= 6 and b.peak <= 2  # the caps held
    assert len(stats.host_latencies[a.url]) == by_host[a.url]


def test_shards_on_the_fan_outs_pool_go_in_order_and_count_each_answer_once(tmp_path):
    """Two shards at once on one shared pool (as the reminders flow runs them): the earlier shard's
    requests go first (the later one only fills the room its tail leaves, so the two do not drain
    together), every request is journaled once, and the shards' figures add up to what each
    server answered."""

    async def main():
        a, b = slot_server.SlotServer(3, 0.03, MODEL), slot_server.SlotServer(1, 0.03, MODEL)
        await a.start(), await b.start()
        opts, auth = Hosts([a.url, b.url]), HostAuth()
        try:
            with open_hosts("fan-out", opts, {a.url: 4, b.url: 2}, None, auth=auth):
                stats = await asyncio.gather(*(
                    run_shard(i, requests(60, f"s{i}-"), opts, tmp_path / f"{i}.jsonl", 1, None, auth=auth,
                              shared="fan-out") for i in (1, 0)))  # the later shard asks first
        finally:
            await a.stop()
            await b.stop()
        return a, b, stats

    a, b, (late, first) = asyncio.run(main())
    rows = {i: read_journal(tmp_path / f"{i}.jsonl") for i in (0, 1)}
    assert [len({r["request_hash"] for r in rows[i]}) for i in (0, 1)] == [60, 60]
    assert len(rows[0]) == len(rows[1]) == 60 and all(r["status"] == OK for i in (0, 1) for r in rows[i])
    early = sorted(r["created_at"] for r in rows[0])
    overlap = sum(early[0] < r["created_at"] < early[-1] for r in rows[1])
    # 6 at most at once (4 + 2 held): those the later shard sent before the earlier one came, and
    # those in the room of the earlier shard's last round trip; none in between
    assert overlap <= 12
    for server in (a, b):
        answered = sum(server.answered.values())
        assert first.hosts[server.url]["ok"] + late.hosts[server.url]["ok"] == answered
        assert first.hosts[server.url]["requests"] + late.hosts[server.url]["requests"] == answered
    assert a.peak <= 4 and b.peak <= 1 and sum(a.answered.values()) > sum(b.answered.values())


@contextlib.contextmanager
def serving(*models: str):
    """Slot servers for ``models`` in a thread's event loop (``check_server`` runs its own loop)."""
    loop, servers, ready = asyncio.new_event_loop(), [], threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        for model in models:
            server = slot_server.SlotServer(1, 0.01, model)
            loop.run_until_complete(server.start())
            servers.append(server)
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    ready.wait(10)
    try:
        yield servers
    finally:
        for server in servers:
            asyncio.run_coroutine_threadsafe(server.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)


def test_the_server_check_names_a_host_that_is_not_what_it_seems():
    with serving(MODEL) as (dead,):
        pass  # its port now refuses connections
    with serving(MODEL, "llama3:8b") as (good, wrong):
        # a host that does not answer is only warned about: the run's probes take it in later
        assert check_server(Hosts([good.url, dead.url]), MODEL, auth=HostAuth()) == "slots"
        with pytest.raises(LLMUnavailable, match=wrong.url) as err:
            check_server(Hosts([good.url, wrong.url]), MODEL, auth=HostAuth())
        assert "\n" not in str(err.value) and "does not have model 'gemma3:27b'" in str(err.value)
    with pytest.raises(LLMUnavailable, match="no LLM host answers"):
        check_server(Hosts([dead.url, good.url]), MODEL, auth=HostAuth())


def test_ollama_host_given_several_times_is_a_list_and_ollama_host_stays_one(monkeypatch):
    from typer.testing import CliRunner

    import cli.reminders
    from cli.main import app
    from schemas.reminders import RemindersConfig

    seen = {}
    monkeypatch.setattr(cli.reminders, "run_flow", lambda flow, config, errors=(): seen.update(c=config))
    out = CliRunner().invoke(app, ["reminders", "--ollama-host", "http://a:1", "--ollama-host", "http://b:2=4"])
    assert out.exit_code == 0, out.output
    config = seen["c"]
    assert config.hosts == ["http://a:1", "http://b:2=4"] and config.host == "http://a:1"
    assert config.trusted_values().ollama_hosts == ["http://a:1", "http://b:2"]
    monkeypatch.setenv("MMEM_REMINDERS_OLLAMA_HOST", '["http://c:3", "http://d:4"]')
    assert RemindersConfig().hosts == ["http://c:3", "http://d:4"]
    monkeypatch.delenv("MMEM_REMINDERS_OLLAMA_HOST")
    monkeypatch.setenv("OLLAMA_HOST", "http://e:5")  # Ollama's variable: one host
    assert RemindersConfig().hosts == ["http://e:5"] and RemindersConfig(ollama_host="http://f:6").host == \
        "http://f:6"
    with pytest.raises(ValueError, match="twice"):
        RemindersConfig(ollama_host=["http://g:7", "g:7=2"])
