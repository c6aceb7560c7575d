"""One shard of LLM calls, each finished call journaled at once.

The caller says where to send them (an :class:`Endpoint`, or any object with its attributes, such
as a ``RemindersConfig``) and which host gets which token (a :class:`~llmcalls.auth.HostAuth`).
One host or several (``options.hosts``), the calls go through one path: a host pool
(``llmcalls.spread``) that learns how many each host takes at once, retries a failed call
elsewhere (or, on the one host, after a back-off) and journals each answer once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from pydantic import BaseModel, ConfigDict

from llmcalls.auth import HostAuth
from llmcalls.cache import Journal
from llmcalls.client import LLMClient
from llmcalls.hosts import HostSpec
from llmcalls.requests import ERROR, OK, REJECTED, HostUnreachable, LLMRequest, LLMResult, LLMUnavailable
from llmcalls.spread import LEARNED, SHARED, SharedHosts, host_specs, merge_hosts, shared_hosts, spread
from storage.progress import Progress

log = logging.getLogger("mmem." + __name__)


class ClientOptions(Protocol):
    """Where requests go and how they are retried (``RemindersConfig`` has these attributes)."""

    @property
    def host(self) -> str: ...
    @property
    def timeout_s(self) -> float: ...
    @property
    def max_attempts(self) -> int: ...
    @property
    def backoff_s(self) -> float: ...
    @property
    def backoff_max_s(self) -> float: ...


@dataclass(frozen=True)
class Endpoint:
    """A plain :class:`ClientOptions`."""

    host: str
    timeout_s: float = 300.0
    max_attempts: int = 4
    backoff_s: float = 1.0
    backoff_max_s: float = 60.0
    hosts: tuple[str, ...] = ()  # several: spread over them (``URL`` or ``URL=limit`` each)


class ShardStats(BaseModel):
    """What a shard did (a task's result, persisted as JSON by the caller's orchestration)."""

    model_config = ConfigDict(extra="forbid")

    shard: int
    requests: int = 0
    skipped: int = 0  # already answered in this shard's journal (a retried shard)
    ok: int = 0
    failed: int = 0  # retryable, still failing after the retries
    rejected: int = 0  # 4xx / unreadable image: not retried
    retries: int = 0
    latencies: list[float] = []
    completion_tokens: int = 0
    wall_s: float = 0.0
    hosts: dict[str, dict] = {}  # each host's figures (llmcalls.spread.answer)
    host_latencies: dict[str, list[float]] = {}  # each host's answered calls' seconds

    def __init__(self, shard: int | None = None, /, **data) -> None:
        if shard is not None:
            data["shard"] = shard
        super().__init__(**data)


class ShardFailed(RuntimeError):
    """A shard still had failed requests after their retries: re-run the flow to retry only those."""

    def __init__(self, message: str, stats: ShardStats) -> None:
        super().__init__(message, stats)
        self.stats = stats

    def __str__(self) -> str:
        return str(self.args[0])


def hosts_of(options: ClientOptions) -> list[str]:
    """Where the requests go: ``options.hosts`` (``URL`` or ``URL=limit`` each) where it names any,
    else its one ``host``."""
    return list(getattr(options, "hosts", None) or [options.host])


def connector(options: ClientOptions, auth: HostAuth, backend: str | None) -> Callable[[str], LLMClient]:
    """How a host pool makes its client for one host: one try per request (the pool retries)."""

    def connect(url: str) -> LLMClient:
        return LLMClient(url, timeout_s=options.timeout_s, max_attempts=1, backend=backend, auth=auth)

    return connect


def retry_wait(options: ClientOptions) -> Callable[[int], float]:
    """Seconds before a request that failed on every host up is tried again after its n-th try:
    exponential from ``backoff_s`` with jitter, at most ``backoff_max_s``."""
    return lambda n: min(options.backoff_max_s, options.backoff_s * 2 ** (n - 1)
                         + random.uniform(0, options.backoff_s))


def open_hosts(key: str, options: ClientOptions, caps: dict[str, int], backend: str | None, *,
               auth: HostAuth) -> contextlib.AbstractContextManager[SharedHosts]:
    """The host pool that this process's shards given ``shared=key`` use while the block runs
    (``caps``: the slots held on each host)."""
    return shared_hosts(key, host_specs(hosts_of(options), caps), connector(options, auth, backend),
                        max_tries=options.max_attempts, all_down_s=options.timeout_s,
                        backoff=retry_wait(options))


async def run_shard(shard: int, requests: list[LLMRequest], options: ClientOptions, journal_path: Path,
                    workers: int, backend: str | None = None, *, auth: HostAuth,
                    caps: dict[str, int] | None = None, shared: str | None = None) -> ShardStats:
    """Make the shard's calls, appending each finished one to the journal (requests the journal
    already answered are skipped). ``auth``: which host gets which token. Each host takes as many
    at once as it shows it can, at most its ``caps`` entry (the slots this run holds there; one
    host without ``caps``: ``workers``). ``shared``: the key of the fan-out's pool
    (:func:`open_hosts`), used where this process has it (an earlier shard's requests go first),
    else the shard gets a pool of its own."""
    stats = ShardStats(shard, requests=len(requests))
    t0 = time.perf_counter()
    hosts = hosts_of(options)
    if caps is None and len(hosts) == 1:
        caps = {HostSpec.parse(hosts[0]).url: max(1, workers)}
    with Journal(journal_path) as journal, Progress(len(requests), f"shard {shard}", log_every=0.5,
                                                    enabled=False) as progress:
        done = journal.done()
        todo = [r for r in requests if r.request_hash not in done]
        stats.skipped = len(requests) - len(todo)

        def record(host: str, res: LLMResult) -> None:
            stats.retries += max(0, res.attempts - 1)
            if res.status == OK:
                stats.host_latencies.setdefault(host, []).append(res.latency_s)
            stats.latencies.append(res.latency_s)
            stats.ok += res.status == OK
            stats.failed += res.status == ERROR
            stats.rejected += res.status == REJECTED
            stats.completion_tokens += res.completion_tokens or 0
            progress()

        pool = SHARED.get(shared) if shared else None
        if pool is not None:
            stats.hosts = await pool.spread(todo, journal, record, priority=shard)
        elif todo:
            stats.hosts = await spread(todo, host_specs(hosts, caps), connector(options, auth, backend),
                                       journal, record, max_tries=options.max_attempts,
                                       all_down_s=options.timeout_s, backoff=retry_wait(options))
    stats.wall_s = time.perf_counter() - t0
    return stats


def hosts_summary(stats: list[ShardStats]) -> dict[str, dict]:
    """Each host's figures over a run's shards: requests, errors, p50/p95 latency, learned
    concurrency."""
    latencies: dict[str, list[float]] = {}
    for s in stats:
        for url, seconds in s.host_latencies.items():
            latencies.setdefault(url, []).extend(seconds)
    return merge_hosts([s.hosts for s in stats if s.hosts], latencies)


def check_server(options: ClientOptions, model: str, *, auth: HostAuth) -> str:
    """Fail fast (``LLMUnavailable``, saying what to run) unless the host answers and has ``model``;
    returns the backend that will answer. Over several hosts: each one that answers must have the
    model and speak Ollama (else one line naming it); one that does not answer is only warned
    about (the run's probes take it in when it does), unless none answers."""
    urls = [HostSpec.parse(h).url for h in hosts_of(options)]

    async def one(url: str) -> str:
        async with LLMClient(url, timeout_s=options.timeout_s, auth=auth) as client:
            return await client.check(model)

    async def _check() -> list[str | BaseException]:
        return await asyncio.gather(*(one(u) for u in urls), return_exceptions=True)

    got = asyncio.run(_check())
    for res in got:
        if isinstance(res, BaseException) and not isinstance(res, HostUnreachable):
            raise res
    backends = sorted({b for b in got if isinstance(b, str)})
    if not backends:
        raise got[0] if len(got) == 1 else LLMUnavailable(
            "no LLM host answers: " + "; ".join(str(e) for e in got))
    for url, res in zip(urls, got, strict=True):
        if isinstance(res, BaseException):
            log.warning("LLM host %s does not answer now; the run goes on without it until it does (%s)",
                        url, res)
            LEARNED[url] = {"up": False, "last_error": str(res)[:200]}  # the shards' pools probe it
    return "+".join(backends)
