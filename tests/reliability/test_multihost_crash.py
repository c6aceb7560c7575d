"""A reminders run over two Ollama hosts (issue 20), SIGKILLed mid fan-out: it held each host's
slots of its own Prefect concurrency limit, and the run that resumes it gives every one of them
back, asks only what was not answered, and asks each of those once."""

from __future__ import annotations

import time
from collections import Counter

import pytest
from crash_support import CONCURRENCY, copy_root

from storage.lance import connect, read


@pytest.fixture(scope="module")
def hosts():
    """Two teacher servers, each recording the conversation of every request it receives."""
    from llmcalls.server import TeacherBackend, make_state, running_server

    class Recording(TeacherBackend):
        def __init__(self) -> None:
            self.asked: list[str] = []

        async def generate(self, messages, options):
            self.asked.append(messages[-1]["content"])
            return await super().generate(messages, options)

    states = [make_state(teacher=True, latency_s=0.05, parallel=2) for _ in range(2)]
    for state in states:
        state.backend = Recording()
    with running_server(states[0]) as a, running_server(states[1]) as b:
        yield [a, b], [s.backend for s in states]


def _config(root, urls) -> dict:
    return {"data_root": str(root), "ollama_host": urls, "model": "mmem-teacher", "shard_size": 4,
            "shard_retries": 0, "backoff_s": 0.01, "backoff_max_s": 0.05, "timeout_s": 10,
            "concurrency": CONCURRENCY}


def _asked(backends) -> int:
    return sum(len(b.asked) for b in backends)


def _settled(backends, settle: float = 0.3) -> list[str]:
    n = -1
    while n != _asked(backends):
        n = _asked(backends)
        time.sleep(settle)
    return [c for b in backends for c in b.asked]


def _active(url: str) -> int:
    from prefect.client.orchestration import get_client

    from tasks.runtime.slots import limit_name

    with get_client(sync_client=True) as client:
        return client.read_global_concurrency_limit_by_name(limit_name(url)).active_slots


def test_a_killed_multihost_run_gives_back_every_hosts_slots_on_resume(runner, hosts, ingested_root,
                                                                       tmp_path):
    from flows.reminders import reminders_flow
    from schemas.reminders import RemindersConfig
    from tasks.runtime.slots import slots_dir

    urls, backends = hosts
    root = copy_root(ingested_root, tmp_path / "root")
    cfg = RemindersConfig(**_config(root, urls))
    log = tmp_path / "killed.log"
    pid = runner.start("reminders", _config(root, urls), log)
    runner.kill_after(pid, log, lambda: all(b.asked for b in backends) and _asked(backends) >= 6, 0.0)
    killed = _settled(backends)
    assert [_active(u) for u in urls] == [CONCURRENCY, CONCURRENCY]  # the killed run's, on each host
    assert len(list(slots_dir(cfg).glob("*.slots"))) == 2

    start = [len(b.asked) for b in backends]
    out = reminders_flow(cfg)
    _settled(backends)
    again = [c for b, s in zip(backends, start, strict=True) for c in b.asked[s:]]
    assert out.failures == 0 and out.valid + out.quarantined == out.prompts
    assert max(Counter(again).values()) == 1  # each prompt asked once by the resume
    assert len(set(again) & set(killed)) <= 2 * CONCURRENCY  # re-asked: only what was in flight
    assert out.calls == len(again) and out.cache_hits == out.prompts - len(again)
    assert [_active(u) for u in urls] == [0, 0] and not list(slots_dir(cfg).glob("*.slots"))
    hosts_used = set(read(connect(cfg.lance_uri), "llm_responses").column("host").to_pylist())
    assert hosts_used == set(urls)
