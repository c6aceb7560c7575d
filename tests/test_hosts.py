"""Many LLM hosts as one (issue 20): the host pool against real loopback Ollama-protocol servers.

Each server (``benchmarks/slot_server.py``) answers ``slots`` requests at once with a fixed latency
and queues the rest, as Ollama does, so the pool must find each host's capacity by itself; stopping
one cuts every connection, as a crash does. Requests go through the official ``ollama`` client.
"""

from __future__ import annotations

import asyncio
import importlib.util
import random
import time
from collections import Counter
from pathlib import Path

import httpx
import ollama
import pytest

from llmcalls.balance import BUSY, DOWN, ERROR, FATAL, Aimd, HostBusy, HostSpec, base_url, classify
from llmcalls.hosts import AllHostsDown, HostPool

_spec = importlib.util.spec_from_file_location(
    "slot_server", Path(__file__).resolve().parents[1] / "benchmarks" / "slot_server.py")
slot_server = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(slot_server)
SlotServer = slot_server.SlotServer

MODEL = "gemma3:27b"


@pytest.fixture(scope="module")
def prefect_server():
    """The pool is pure asyncio: these tests need no Prefect server (overrides conftest's)."""
    yield


def connect(url: str) -> ollama.AsyncClient:
    return ollama.AsyncClient(host=url, timeout=10)


async def ask(host, i: int) -> str:
    resp = await host.client.chat(model=MODEL, messages=[{"role": "user", "content": f"q{i}"}], stream=False)
    return resp.message.content


async def servers(*specs: tuple[int, float]) -> list:
    out = [SlotServer(slots, latency) for slots, latency in specs]
    for s in out:
        await s.start()
    return out


def test_the_faster_host_gets_more_and_the_pool_fills_both():
    """4 + 2 slots at 200 ms (30 requests/s together), no capacity given: the 4-slot host gets
    clearly more, and the pool's steady throughput is >= 90% of the summed capacity."""

    async def main():
        fast, slow = await servers((4, 0.2), (2, 0.2))
        memory = {}
        try:
            async with HostPool([fast.url, slow.url], connect=connect, log_every_s=0, memory=memory) as pool:
                t0, times, answers = time.perf_counter(), [], Counter()
                async for i, text in pool.map(range(240), ask):
                    assert text == f"answer to: q{i}"
                    answers[i] += 1
                    times.append(time.perf_counter() - t0)
                stats = {s.url: s for s in pool.stats()}
                summary = pool.summary()
        finally:
            await fast.stop()
            await slow.stop()
        return fast, slow, times, answers, stats, summary, memory

    fast, slow, times, answers, stats, summary, memory = asyncio.run(main())
    assert sorted(answers) == list(range(240)) and set(answers.values()) == {1}
    # steady state: from 1.5 s in (slow start done) to the last 5% (the tail drains)
    first = next(k for k, t in enumerate(times) if t >= 1.5)
    last = int(0.95 * len(times))
    rate = (last - first) / (times[last] - times[first])
    assert rate >= 0.9 * 30, f"{rate:.1f} requests/s of 30; {summary}"
    f, s = stats[fast.url], stats[slow.url]
    assert f.ok >= 1.5 * s.ok, f"fast {f.ok} vs slow {s.ok}"
    assert fast.peak == 4 and slow.peak == 2  # every slot was used
    assert f.concurrency >= 4 and s.concurrency >= 2  # learned: at least the capacity
    assert f.requests == f.ok == sum(fast.answered.values()) and f.errors == 0
    assert 195 <= f.p50_ms <= f.p95_ms  # 200 ms generations, plus queueing
    assert memory[fast.url]["learned"][0] >= 4 and memory[slow.url]["learned"][0] >= 2  # the next pool
    row = summary[fast.url]
    assert {"requests", "errors", "p50_ms", "p95_ms", "concurrency", "up"} <= set(row) and row["up"]


def test_a_host_that_dies_midway_loses_nothing_and_answers_nothing_twice():
    async def main():
        a, b = await servers((4, 0.05), (4, 0.05))
        answers, died = Counter(), False
        try:
            async with HostPool([a.url, b.url], connect=connect, log_every_s=0, probe_s=30) as pool:
                async for i, text in pool.map(range(300), ask):
                    assert text == f"answer to: q{i}"
                    answers[i] += 1
                    if sum(answers.values()) == 100 and not died:
                        died = True
                        await b.stop()  # every request in its slots is cut off
                stats = {s.url: s for s in pool.stats()}
        finally:
            await a.stop()
            await b.stop()
        return a, b, answers, stats

    a, b, answers, stats = asyncio.run(main())
    assert sorted(answers) == list(range(300)), "lost requests"
    assert set(answers.values()) == {1}, "requests answered twice"
    sb = stats[b.url]
    assert not sb.up and sb.downs == 1 and sb.failures >= 1
    assert (
        "ConnectionError" in sb.last_error
        or "RemoteProtocolError" in sb.last_error
        or "Read" in sb.last_error
    )
    assert stats[a.url].ok + sb.ok == 300 and stats[a.url].up


def test_a_dead_host_comes_back_after_its_probe_succeeds():
    async def main():
        a, b = await servers((2, 0.05), (2, 0.05))
        try:
            async with HostPool([a.url, b.url], connect=connect, log_every_s=0, probe_s=0.1,
                                probe_max_s=0.2) as pool:
                await b.stop()
                first = [r async for r in pool.map(range(40), ask)]
                out = {s.url: s for s in pool.stats()}[b.url]
                assert not out.up and out.downs == 1
                await b.start()  # the same port
                deadline = time.monotonic() + 10
                while not pool.hosts[1].up and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                second = [r async for r in pool.map(range(40, 100), ask)]
                back = {s.url: s for s in pool.stats()}[b.url]
        finally:
            await a.stop()
            await b.stop()
        return b, first, second, back

    b, first, second, back = asyncio.run(main())
    assert len(first) == 40 and len(second) == 60
    assert back.up and back.downs == 1 and back.probes >= 1
    assert sum(b.answered.values()) > 0  # it answered again once back


def test_the_next_pool_remembers_a_host_that_is_out():
    """A run's shards each have a pool: one that starts after a host went out does not strike it
    again with requests, it probes it, and takes it in when it answers."""

    async def main():
        a, b = await servers((2, 0.02), (2, 0.02))
        await b.stop()
        memory = {}
        async with HostPool([a.url, b.url], connect=connect, log_every_s=0, memory=memory) as pool:
            assert len([r async for r in pool.map(range(20), ask)]) == 20
        assert memory[b.url]["up"] is False and memory[a.url]["up"] is True
        async with HostPool([a.url, b.url], connect=connect, log_every_s=0, memory=memory, probe_s=0.05,
                            probe_max_s=0.1) as pool:
            assert not pool.hosts[1].up
            assert len([r async for r in pool.map(range(20), ask)]) == 20
            untouched = pool.stats()[1].requests
            await b.start()
            deadline = time.monotonic() + 10
            while not pool.hosts[1].up and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            back = pool.hosts[1].up
        await a.stop()
        await b.stop()
        return untouched, back, memory

    untouched, back, memory = asyncio.run(main())
    assert untouched == 0 and back and memory  # not one request sent to it while it was out


def test_every_host_down_is_a_clear_error_after_a_bounded_wait():
    async def main():
        dead = await servers((1, 0.01), (1, 0.01))
        for s in dead:
            await s.stop()
        async with HostPool([s.url for s in dead], connect=connect, log_every_s=0, all_down_s=1.0,
                            probe_s=0.2) as pool:
            t0 = time.monotonic()
            with pytest.raises(AllHostsDown) as err:
                await pool.call(lambda host: ask(host, 0))
            return dead, time.monotonic() - t0, str(err.value)

    dead, waited, message = asyncio.run(main())
    assert 1.0 <= waited < 6.0
    assert all(s.url in message for s in dead) and "\n" not in message


def test_busy_answers_shrink_the_window_and_go_elsewhere():
    """Hosts that answer 503 when their 3 slots are taken (OLLAMA_MAX_QUEUE=0): every request is
    still answered once, and the windows stay near the slots."""

    async def main():
        a, b = SlotServer(3, 0.05, max_queue=0), SlotServer(3, 0.05, max_queue=0)
        await a.start(), await b.start()
        try:
            async with HostPool([a.url, b.url], connect=connect, log_every_s=0, max_tries=50) as pool:
                got = [i async for i, _ in pool.map(range(200), ask)]
                stats = pool.stats()
        finally:
            await a.stop()
            await b.stop()
        return a, b, got, stats

    a, b, got, stats = asyncio.run(main())
    assert sorted(got) == list(range(200))
    assert a.busy + b.busy > 0 and sum(s.busy for s in stats) == a.busy + b.busy
    assert all(s.concurrency <= 6 for s in stats) and all(s.up for s in stats)


def test_a_request_that_failed_on_every_host_up_waits_its_backoff_and_another_host_does_not():
    """One host: a busy answer is tried again there after ``backoff(tries)`` seconds (not hammered at
    once); two hosts: it goes to the other one at once."""

    async def main(n_hosts: int) -> list[float]:
        hosts = await servers(*[(2, 0.01)] * n_hosts)
        first: dict[int, float] = {}
        gaps: list[float] = []

        async def busy_once(host, i: int) -> str:
            if i not in first:
                first[i] = time.perf_counter()
                raise HostBusy("busy")  # as a 503 says
            gaps.append(time.perf_counter() - first[i])
            return await ask(host, i)

        try:
            async with HostPool([h.url for h in hosts], connect=connect, log_every_s=0, max_tries=3,
                                backoff=lambda tries: 0.3 * tries) as pool:
                assert sorted([i async for i, _ in pool.map(range(4), busy_once)]) == [0, 1, 2, 3]
        finally:
            for h in hosts:
                await h.stop()
        return gaps

    assert min(asyncio.run(main(1))) >= 0.3
    assert max(asyncio.run(main(2))) < 0.3


def test_a_per_host_cap_is_never_exceeded():
    async def main():
        (big,) = await servers((8, 0.05))
        try:
            async with HostPool([f"{big.url}=2"], connect=connect, log_every_s=0) as pool:
                got = [r async for r in pool.map(range(60), ask)]
                (stats,) = pool.stats()
        finally:
            await big.stop()
        return big, got, stats

    big, got, stats = asyncio.run(main())
    assert len(got) == 60 and big.peak == 2 and stats.cap == 2 and stats.peak_concurrency == 2


def test_a_request_error_is_the_callers_and_does_not_strike_the_host():
    """A 404 (model missing) is not mended by another host: it propagates at once, and the host
    stays in."""

    async def main():
        (s,) = await servers((2, 0.01))
        try:
            async with HostPool([s.url], connect=connect, log_every_s=0) as pool:
                with pytest.raises(ollama.ResponseError):
                    await pool.call(lambda host: host.client.chat(model="nope", messages=[], stream=False))
                assert await pool.call(lambda host: ask(host, 1)) == "answer to: q1"
                (stats,) = pool.stats()
        finally:
            await s.stop()
        return stats

    stats = asyncio.run(main())
    assert stats.up and stats.errors == 1 and stats.failures == 0 and stats.ok == 1


def test_outcomes_and_host_names():
    request = httpx.Request("POST", "http://h/api/chat")
    assert classify(ollama.ResponseError("busy", 503)) == BUSY
    assert classify(ollama.ResponseError("slow down", 429)) == BUSY
    assert classify(ollama.ResponseError("boom", 500)) == ERROR
    assert classify(ollama.ResponseError("model not found", 404)) == FATAL
    assert classify(ConnectionError("refused")) == DOWN
    assert classify(httpx.ReadTimeout("slow", request=request)) == DOWN
    assert classify(TimeoutError()) == DOWN
    assert classify(ValueError("a bug")) == FATAL
    assert HostSpec.parse("http://gpu1:11434=4") == HostSpec("http://gpu1:11434", 4)
    assert HostSpec.parse(" http://gpu2:11434 ") == HostSpec("http://gpu2:11434", None)
    with pytest.raises(ValueError):
        HostSpec.parse("http://gpu1:11434=0")
    with pytest.raises(ValueError, match="named twice"):
        HostPool(["http://a:1", "http://a:1=3"])
    assert base_url("localhost") == "http://localhost:11434"
    assert base_url("https://llm.example.org/") == "https://llm.example.org:443"
    assert base_url("http://[::1]:8080") == "http://[::1]:8080"


def drive(aimd: Aimd, slots: int, latency: float, rounds: int, stall: range = range(0),
          spread: float = 0.0) -> list[int]:
    """A host of ``slots`` slots in virtual time: each round, the window's requests all come back
    after ``latency`` x the queue they met (x 5 in ``stall`` rounds: the client's process stalled;
    ``spread``: each answer's time varies lognormally, as generations of different lengths do)."""
    rng, windows = random.Random(0), []
    for r in range(rounds):
        w, epoch = aimd.allowed, aimd.epoch
        took = latency * max(1.0, w / slots) * (5 if r in stall else 1)
        for _ in range(w):
            aimd.ok(took * rng.lognormvariate(0, spread) if spread else took, epoch, w)
        windows.append(w)
    return windows


def test_the_window_finds_the_capacity_and_a_client_stall_does_not_empty_it():
    for slots in (2, 8, 32):
        aimd = Aimd()
        windows = drive(aimd, slots, 1.0, 300)
        settled = windows[100:]
        assert min(settled) >= slots, (slots, settled)  # every slot stays busy
        assert max(settled) <= 2.5 * slots + 4, (slots, settled)  # a bounded queue
        assert aimd.cuts >= 2 and aimd.baseline == 1.0
    for slots in (2, 8):  # answers of varying length: never below the capacity, never far above
        settled = drive(Aimd(), slots, 1.0, 1000, spread=0.5)[200:]
        assert min(settled) >= slots and max(settled) <= 2.5 * slots + 4, (slots, settled)
    aimd = Aimd()
    windows = drive(aimd, 8, 1.0, 200, stall=range(120, 124))
    assert min(windows[100:]) >= 8, windows[100:]
    warm = Aimd()
    warm.resume(*aimd.learned())  # the next shard's pool starts where this one ended
    assert not warm.slow_start and warm.allowed == aimd.allowed and warm.baseline == aimd.baseline
    assert min(drive(warm, 8, 1.0, 50)) >= 8
    capped = Aimd(cap=3)
    assert max(drive(capped, 8, 1.0, 50)) == 3 and capped.peak == 3
