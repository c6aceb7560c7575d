"""One shard of LLM calls spread over several Ollama hosts (issue 20): a :class:`HostPool` picks the
host of each request, learns how many each host takes at once, and moves a request that failed on
a host (refused, dropped, timed out, busy, 5xx) to another; each finished call is journaled at
once, with the host that answered it, so the response cache stays one cache.

A shard runs on a pool of its own (:func:`spread`), or on the pool of its run's fan-out
(:class:`SharedHosts`): one pool for all the shards this process runs, on an event loop of its own
thread. That one learns each host's window once for the run instead of once per shard, keeps its
connections, and serves an earlier shard's requests first: the next shard's requests fill the
room the earlier one's tail leaves, so the hosts never idle while a shard ends, is merged, and the
next one starts (with a pool per shard, two shards started together also drain together).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterator

from llmcalls.balance import BUSY, CANCELLED, DOWN, classify
from llmcalls.cache import Journal
from llmcalls.client import LLMClient
from llmcalls.hosts import Host, HostPool, HostSpec, RequestFailed
from llmcalls.requests import ERROR, LLMRequest, LLMResult

log = logging.getLogger("mmem." + __name__)

# What this process's pools learned about each host (window, baseline, queue-free load): a run's
# shards, one pool each, start where the last one ended instead of from one request at a time.
LEARNED: dict[str, tuple] = {}

# The fan-outs' shared pools in this process, by the key the flow gives its shards.
SHARED: dict[str, SharedHosts] = {}

Record = Callable[[str, LLMResult], None]


def host_specs(hosts: list[str], caps: dict[str, int] | None = None) -> list[HostSpec]:
    """``hosts`` (``URL`` or ``URL=limit``) with each one's cap: the smaller of its own limit and
    ``caps[URL]`` (the slots this run holds on that host)."""
    out = []
    for text in hosts:
        spec = HostSpec.parse(text)
        cap = (caps or {}).get(spec.url)
        if cap is not None:
            spec = HostSpec(spec.url, min(spec.cap or cap, cap))
        out.append(spec)
    return out


async def spread(requests: list[LLMRequest], hosts: list[HostSpec], connect: Callable[[str], LLMClient],
                 journal: Journal, record: Record, *, max_tries: int, all_down_s: float = 120.0,
                 log_every_s: float = 30.0, backoff: Callable[[int], float] | None = None) -> dict[str, dict]:
    """Answer ``requests`` over ``hosts`` on a pool of their own (each call's row to ``journal``,
    then ``record(host, result)``); returns each host's figures for these requests. A request that
    failed on ``max_tries`` hosts is journaled as an error (a re-run asks it again);
    ``AllHostsDown`` (no host back within ``all_down_s``) and a host's ``LLMUnavailable`` (no such
    model, refused token) end the shard. ``backoff``: see :class:`HostPool`."""
    async with HostPool(hosts, connect=connect, max_tries=max_tries, log_every_s=log_every_s,
                        all_down_s=all_down_s, memory=LEARNED, backoff=backoff) as pool:
        return await answer(pool, requests, journal, record, Counter())


async def answer(pool: HostPool, requests: list[LLMRequest], journal: Journal, record: Record,
                 claimed: Counter[str], priority: int = 0) -> dict[str, dict]:
    """``requests`` over ``pool`` (see :func:`spread`). The figures count this call's own tries;
    a host's ``downs`` are those not ``claimed`` by an earlier call on the same pool."""
    tries: Counter[str] = Counter()
    counts: dict[str, Counter[str]] = {h.url: Counter() for h in pool.hosts}
    latencies: dict[str, list[float]] = {h.url: [] for h in pool.hosts}

    async def ask(host: Host, req: LLMRequest) -> tuple[str, LLMResult]:
        tries[req.request_hash] += 1
        try:
            res = await host.client.ask(req)
        except BaseException as exc:
            outcome = classify(exc)
            if outcome != CANCELLED:
                counts[host.url].update(("requests", "errors", *(("busy",) if outcome == BUSY else ()),
                                         *(("failures",) if outcome == DOWN else ())))
            raise
        counts[host.url].update(("requests", "ok"))
        latencies[host.url].append(res.latency_s)
        return host.url, res

    async for req, got in pool.map(requests, ask, priority=priority):
        if isinstance(got, RequestFailed):
            host, res = got.tried[-1], LLMResult(req.request_hash, ERROR, error=str(got),
                                                 attempts=tries[req.request_hash])
        else:
            host, res = got
            res.attempts = tries[req.request_hash]
        journal.append(res.row(req, host))
        record(host, res)
    log.info("LLM hosts: %s", pool.describe())
    out = {}
    for s in pool.stats():
        c, lat = counts[s.url], sorted(latencies[s.url])
        downs, claimed[s.url] = s.downs - claimed[s.url], s.downs
        out[s.url] = {**s.to_dict(), **{k: c[k] for k in ("requests", "ok", "errors", "busy", "failures")},
                      "downs": downs, "p50_ms": 1000 * lat[len(lat) // 2] if lat else None,
                      "p95_ms": 1000 * lat[min(len(lat) - 1, int(0.95 * len(lat)))] if lat else None}
    return out


class SharedHosts:
    """One :class:`HostPool` for every shard of a fan-out that runs in this process, on an event
    loop of its own thread (Prefect runs each shard task on an event loop of its own). A shard hands
    its requests over once (:meth:`spread`) and waits for the figures; the journal rows are written
    from the pool's thread as the answers come."""

    def __init__(self, hosts: list[HostSpec], connect: Callable[[str], LLMClient], *, max_tries: int,
                 all_down_s: float = 120.0, log_every_s: float = 30.0,
                 backoff: Callable[[int], float] | None = None) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="llm-hosts", daemon=True)
        self._thread.start()
        self._claimed: Counter[str] = Counter()

        async def start() -> HostPool:
            return await HostPool(hosts, connect=connect, max_tries=max_tries, log_every_s=log_every_s,
                                  all_down_s=all_down_s, memory=LEARNED, backoff=backoff).__aenter__()

        try:
            self.pool = asyncio.run_coroutine_threadsafe(start(), self.loop).result()
        except BaseException:
            self._stop()
            raise

    async def spread(self, requests: list[LLMRequest], journal: Journal, record: Record,
                     priority: int = 0) -> dict[str, dict]:
        """:func:`spread` on the shared pool, from any event loop; lower ``priority`` goes first."""
        fut = asyncio.run_coroutine_threadsafe(
            answer(self.pool, requests, journal, record, self._claimed, priority), self.loop)
        return await asyncio.wrap_future(fut)

    def close(self) -> None:
        """Close the pool (its clients and probes; what it learned goes to ``LEARNED``)."""
        try:
            asyncio.run_coroutine_threadsafe(self.pool.aclose(), self.loop).result()
        finally:
            self._stop()

    def _stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


@contextlib.contextmanager
def shared_hosts(key: str, hosts: list[HostSpec], connect: Callable[[str], LLMClient], *, max_tries: int,
                 all_down_s: float = 120.0, backoff: Callable[[int], float] | None = None,
                 ) -> Iterator[SharedHosts]:
    """A :class:`SharedHosts` known as ``key`` to this process's shards while the block runs."""
    shared = SharedHosts(hosts, connect, max_tries=max_tries, all_down_s=all_down_s, backoff=backoff)
    SHARED[key] = shared
    try:
        yield shared
    finally:
        SHARED.pop(key, None)
        shared.close()


def merge_hosts(per_shard: list[dict[str, dict]], latencies: dict[str, list[float]]) -> dict[str, dict]:
    """Each host's figures over a run's shards (``per_shard``: each shard's figures from
    :func:`answer`; ``latencies``: each host's answered calls' seconds, for the run's p50/p95)."""
    out: dict[str, dict] = {}
    for shard in per_shard:
        for url, s in shard.items():
            h = out.setdefault(url, {"requests": 0, "ok": 0, "errors": 0, "busy": 0, "failures": 0,
                                     "downs": 0, "peak_concurrency": 0, "concurrency": 0,
                                     "cap": s.get("cap"), "last_error": None})
            for k in ("requests", "ok", "errors", "busy", "failures", "downs"):
                h[k] += s.get(k) or 0
            h["peak_concurrency"] = max(h["peak_concurrency"], s.get("peak_concurrency") or 0)
            h["concurrency"] = s.get("concurrency") or h["concurrency"]  # the latest shard's learned window
            h["last_error"] = s.get("last_error") or h["last_error"]
    for url, h in out.items():
        lat = sorted(latencies.get(url, []))
        h["p50_s"] = round(lat[len(lat) // 2], 4) if lat else None
        h["p95_s"] = round(lat[min(len(lat) - 1, int(0.95 * len(lat)))], 4) if lat else None
    return out
