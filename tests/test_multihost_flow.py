"""The reminders flow over several Ollama hosts (issue 20): real Prefect, real Lance, the local
teacher servers over loopback; one run spreads its prompts over the hosts, a host that stops
midway hands its prompts to the other, and every prompt ends answered once or quarantined."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from flows.reminders import reminders_flow
from llmcalls.server import make_state, running_server
from schemas.reminders import RemindersConfig
from storage.lance import connect, read


def _config(root, hosts, **kw) -> RemindersConfig:
    base = {"data_root": root, "ollama_host": hosts, "model": "mmem-teacher", "shard_size": 6,
            "shard_retries": 0, "backoff_s": 0.01, "backoff_max_s": 0.05, "timeout_s": 5, "concurrency": 4}
    return RemindersConfig(**{**base, **kw})


@contextmanager
def stoppable(state) -> Iterator[tuple[str, threading.Event]]:
    """A server that stops (its context exits, cutting what it serves) when the event is set."""
    stop, url = threading.Event(), []
    started = threading.Event()

    def run() -> None:
        with running_server(state) as u:
            url.append(u)
            started.set()
            stop.wait()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    started.wait(30)
    try:
        yield url[0], stop
    finally:
        stop.set()
        thread.join(timeout=15)


def test_one_run_spreads_over_two_hosts_and_a_rerun_makes_no_calls(data_root):
    a = make_state(teacher=True, latency_s=0.02, parallel=2)
    b = make_state(teacher=True, latency_s=0.02, parallel=1)
    with running_server(a) as ua, running_server(b) as ub:
        config = _config(data_root, [ua, ub], limit=18)
        first = reminders_flow(config)
        asked = sum(a.requests.values()) + sum(b.requests.values())
        second = reminders_flow(config)
        assert sum(a.requests.values()) + sum(b.requests.values()) == asked  # the cache is one cache
    assert first.prompts == 18 == first.calls == asked and first.failures == 0
    assert first.valid + first.quarantined == 18
    assert set(first.hosts) == {ua, ub} and sum(h["ok"] for h in first.hosts.values()) == 18
    assert all(h["requests"] > 0 and h["p50_s"] is not None for h in first.hosts.values())
    assert second.calls == 0 and second.cache_hits == 18 and second.valid == first.valid
    rows = read(connect(config.lance_uri), "llm_responses")
    assert rows.num_rows == 18 and set(rows.column("host").to_pylist()) == {ua, ub}


def test_a_host_that_stops_midway_hands_its_prompts_to_the_other(data_root):
    a = make_state(teacher=True, latency_s=0.05, parallel=2)
    b = make_state(teacher=True, latency_s=0.05, parallel=2)
    with running_server(a) as ua, stoppable(b) as (ub, stop_b):
        def watch() -> None:  # b stops once it has answered a few
            while sum(b.requests.values()) < 4 and not stop_b.is_set():
                stop_b.wait(0.01)
            stop_b.set()

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        result = reminders_flow(_config(data_root, [ua, ub], limit=24))
        watcher.join(timeout=5)
    assert result.prompts == 24 and result.failures == 0  # every prompt answered once or quarantined
    assert result.valid + result.quarantined == 24
    assert result.hosts[ua]["ok"] >= 24 - sum(b.requests.values())
    rows = read(connect(_config(data_root, [ua]).lance_uri), "llm_responses")
    assert rows.num_rows == 24 and len(set(rows.column("request_hash").to_pylist())) == 24


def test_evaluation_spreads_a_served_variant_over_the_default_hosts(data_root):
    from flows.evaluate import evaluate_flow
    from schemas.evaluate import EvaluateConfig

    variants = data_root / "variants.toml"
    variants.write_text('[[variant]]\nname = "teacher_base"\nbackend = "ollama"\nmodel = "mmem-teacher"\n'
                        'prompt = "base"\n')
    a = make_state(teacher=True, latency_s=0.02, parallel=2)
    b = make_state(teacher=True, latency_s=0.02, parallel=2)
    with running_server(a) as ua, running_server(b) as ub:
        config = EvaluateConfig(data_root=data_root, variants=variants, limit=4, run_label="hosts",
                                ollama_host=[ua, ub], bertscore=False, shard_size=8)
        result = evaluate_flow(config)
        asked = (sum(a.requests.values()), sum(b.requests.values()))
    rows = read(connect(config.lance_uri), "llm_responses").to_pylist()
    assert len(rows) == sum(asked) and all(asked)  # both hosts answered, each request once
    assert {r["host"] for r in rows} == {ua, ub}
    # the run's result gives each host's share, as the logs do
    figures = result.hosts["teacher_base"]
    assert set(figures) == {ua, ub}
    assert (figures[ua]["ok"], figures[ub]["ok"]) == asked and figures[ua]["errors"] == 0


def test_every_host_gone_is_one_clear_error_and_the_rerun_asks_only_the_rest(data_root):
    from llmcalls.hosts import AllHostsDown

    a = make_state(teacher=True, latency_s=0.05, parallel=2)
    b = make_state(teacher=True, latency_s=0.05, parallel=2)
    with stoppable(a) as (ua, stop_a), stoppable(b) as (ub, stop_b):
        def watch() -> None:  # both stop once they have answered a few
            while sum(a.requests.values()) + sum(b.requests.values()) < 6:
                stop_a.wait(0.01)
            stop_a.set()
            stop_b.set()

        threading.Thread(target=watch, daemon=True).start()
        config = _config(data_root, [ua, ub], limit=24, timeout_s=2)
        with pytest.raises(AllHostsDown, match="no LLM host answered") as err:
            reminders_flow(config)
    assert ua in str(err.value) and ub in str(err.value) and "\n" not in str(err.value)
    answered = read(connect(config.lance_uri), "llm_responses").num_rows
    assert 0 < answered < 24  # what was answered before is kept
    c = make_state(teacher=True)
    with running_server(c) as uc:
        result = reminders_flow(config.model_copy(update={"ollama_host": uc}))
    assert result.cache_hits == answered and result.calls == sum(c.requests.values()) == 24 - answered
    assert result.failures == 0 and result.valid + result.quarantined == 24
