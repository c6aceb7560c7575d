"""Many Ollama hosts as one: each request goes to a host with room, failed ones go to another.

Why: one run of tens of thousands of prompts outgrows one GPU host, and the hosts a user has are
rarely alike. A :class:`HostPool` takes several hosts (``URL``, or ``URL=limit`` for a host shared
with others), learns how many requests each one takes at once while the run goes (see
:mod:`llmcalls.balance`: nothing to configure, a faster host ends up with more), and moves work
off hosts that fail:

- a host that refuses connections or times out ``down_after`` times in a row is taken out; a
  probe (``GET /api/version``) with exponential back-off brings it back;
- a request that failed on a host (refused, dropped, timed out, busy, 5xx) is leased again to
  another host, up to ``max_tries`` hosts (after ``backoff(tries)`` seconds when it failed on every
  host up: one host is retried with back-off); anything else (a 4xx, a bug) is the caller's;
- while every host is out, waiting requests wait ``all_down_s`` for one to come back, then get
  :class:`AllHostsDown` (one line per host: what went wrong there).

Use ``async with pool.lease() as host`` for one try, :meth:`HostPool.call` for one request with
failover, or :meth:`HostPool.map` for many. Each :class:`Host` carries what the caller's
``connect(url)`` built for it in ``host.client``. Per-host figures: :meth:`HostPool.stats`.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from typing import Any, Self, TypeVar

import httpx

from llmcalls.balance import (
    BUSY,
    CANCELLED,
    DOWN,
    ERROR,
    FATAL,
    OK,
    Aimd,
    AllHostsDown,
    Host,
    HostSpec,
    HostStats,
    RequestFailed,
    classify,
    describe_error,
)

log = logging.getLogger("mmem." + __name__)

T = TypeVar("T")
X = TypeVar("X")

__all__ = ["AllHostsDown", "Host", "HostPool", "HostSpec", "HostStats", "Lease", "RequestFailed", "classify"]


class Lease:
    """One try on one host: when it went out, in which window epoch, with how many in flight there."""

    __slots__ = ("epoch", "host", "load", "t0")

    def __init__(self, host: Host) -> None:
        self.host, self.t0, self.epoch = host, time.perf_counter(), host.aimd.epoch
        self.load = host.in_flight + 1


class HostPool:
    """Several Ollama hosts as one. Use as ``async with HostPool([...]) as pool``."""

    def __init__(self, hosts: Iterable[str | HostSpec], *, connect: Callable[[str], Any] | None = None,
                 down_after: int = 3, probe_s: float = 0.5, probe_max_s: float = 30.0,
                 probe_timeout_s: float = 5.0, all_down_s: float = 120.0, max_tries: int | None = None,
                 probe: Callable[[Host], Awaitable[bool]] | None = None, initial: float = 1.0,
                 log_every_s: float = 30.0, memory: dict[str, dict] | None = None,
                 backoff: Callable[[int], float] | None = None) -> None:
        """``memory``: what pools learned about hosts, by URL, read at the start and written back
        at the end (one dict for a process's pools, so the next shard starts where the last ended:
        each host's window, and a host that was out stays out until its probe answers)."""
        specs = [h if isinstance(h, HostSpec) else HostSpec.parse(h) for h in hosts]
        if not specs:
            raise ValueError("a host pool needs at least one host")
        urls = [s.url for s in specs]
        if len(set(urls)) != len(urls):
            raise ValueError(f"a host is named twice: {urls}")
        self.hosts = [Host(s, Aimd(initial=initial, cap=s.cap), connect(s.url) if connect else None)
                      for s in specs]
        self.memory = memory
        for host in self.hosts:
            known = (memory or {}).get(host.url)
            if known is None:
                continue
            if known.get("learned"):
                host.aimd.resume(*known["learned"])
            if not known.get("up", True):  # probed from the start (``async with``), not struck again
                host.up, host.last_error = False, known.get("last_error")
                host.probe_delay = known.get("probe_delay", 0.0)
        self.down_after, self.all_down_s = down_after, all_down_s
        self.probe_s, self.probe_max_s, self.probe_timeout_s = probe_s, probe_max_s, probe_timeout_s
        self.max_tries = max_tries if max_tries is not None else 2 * len(self.hosts) + 1
        self.log_every_s, self.backoff = log_every_s, backoff
        self._probe_fn = probe
        # waiting acquirers, by (priority, arrival): (key, future, hosts to avoid)
        self._waiters: list[tuple[tuple[int, int], asyncio.Future[Lease], frozenset[str]]] = []
        self._arrivals = itertools.count()
        self._queues: list[tuple[int, deque]] = []  # each map's priority and requests not sent yet
        self._probes: dict[str, asyncio.Task] = {}
        self._give_up: asyncio.TimerHandle | None = None
        self._failed: AllHostsDown | None = None
        self._http: httpx.AsyncClient | None = None
        self._last_log = time.monotonic()

    async def __aenter__(self) -> Self:
        for host in self.hosts:
            if not host.up:
                self._probe_out(host)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop the probes, close the hosts' clients (what ``connect`` built), remember what was
        learned about the hosts that are up."""
        if self.memory is not None:
            for h in self.hosts:
                if not h.up:
                    self.memory[h.url] = {**self.memory.get(h.url, {}), "up": False,
                                          "last_error": h.last_error, "probe_delay": h.probe_delay}
                elif h.stats.ok:
                    self.memory[h.url] = {"up": True, "learned": h.aimd.learned()}
        for task in self._probes.values():
            task.cancel()
        await asyncio.gather(*self._probes.values(), return_exceptions=True)
        self._probes.clear()
        if self._give_up is not None:
            self._give_up.cancel()
        if self._http is not None:
            await self._http.aclose()
        for host in self.hosts:
            close = getattr(host.client, "aclose", None) or getattr(host.client, "close", None)
            if close is not None:
                result = close()
                if isinstance(result, Awaitable):
                    await result
            elif hasattr(host.client, "__aexit__"):
                await host.client.__aexit__(None, None, None)

    # --- leases ----------------------------------------------------------------------------------

    @property
    def up(self) -> list[Host]:
        return [h for h in self.hosts if h.up]

    def _pick(self, exclude: frozenset[str]) -> Host | None:
        """The host with the most room (relative to its window), preferring hosts not in ``exclude``
        (those a request already failed on); ties go to the lower latency."""
        best, best_key = None, None
        for h in self.hosts:
            if not h.up or h.in_flight >= h.aimd.allowed:
                continue
            key = (h.url in exclude, (h.in_flight + 1) / h.aimd.allowed, h.aimd.baseline or 0.0)
            if best_key is None or key < best_key:
                best, best_key = h, key
        return best

    def _grant(self, host: Host) -> Lease:
        lease = Lease(host)
        host.in_flight += 1
        return lease

    async def acquire(self, exclude: Iterable[str] = (), priority: int = 0) -> Lease:
        """A lease on the host with the most room; give it back with :meth:`release`. Waiting
        acquirers are served lowest ``priority`` first, then first come, first served. Raises
        :class:`AllHostsDown` when every host has been out ``all_down_s``."""
        if self._failed is not None:
            raise self._failed
        excluded = frozenset(exclude)
        if not self._waiters and not self._ahead(priority):
            host = self._pick(excluded)
            if host is not None:
                return self._grant(host)
        fut: asyncio.Future[Lease] = asyncio.get_running_loop().create_future()
        entry = ((priority, next(self._arrivals)), fut, excluded)
        bisect.insort(self._waiters, entry, key=lambda e: e[0])
        self._dispatch()  # a waiter ahead of the others now may fit where the first did not
        try:
            return await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self.release(fut.result(), asyncio.CancelledError())
            raise
        finally:
            if entry in self._waiters:
                self._waiters.remove(entry)

    def _ahead(self, priority: int) -> bool:
        """Whether a map served before ``priority`` has requests to send: the room is theirs (their
        next request is on its way to :meth:`acquire`)."""
        return any(p < priority and queue for p, queue in self._queues)

    def _dispatch(self) -> None:
        """Hand free room to the waiting requests, in their order."""
        while self._waiters:
            (priority, _), fut, excluded = self._waiters[0]
            if fut.done():
                self._waiters.pop(0)
                continue
            if self._ahead(priority):
                return
            host = self._pick(excluded)
            if host is None:
                return
            self._waiters.pop(0)
            fut.set_result(self._grant(host))

    def release(self, lease: Lease, exc: BaseException | None = None) -> str:
        """Give ``lease`` back with how its try ended (``None``: answered); returns the outcome
        (``classify``), after the host's window, figures and health have learned from it."""
        host, latency = lease.host, time.perf_counter() - lease.t0
        host.in_flight -= 1
        outcome = OK if exc is None else classify(exc)
        stats = host.stats
        if outcome != CANCELLED:
            stats.requests += 1
        if outcome == OK:
            stats.ok += 1
            host.strikes = 0
            if host.probe_delay and stats.ok - host.ok_when_back >= 10:
                host.probe_delay = 0.0
            host.record(latency)
            host.aimd.ok(latency, lease.epoch, lease.load)
        elif outcome in (BUSY, DOWN, ERROR, FATAL):
            stats.errors += 1
            host.last_error = describe_error(exc)
            if outcome == BUSY:
                stats.busy += 1
                host.aimd.cut(lease.epoch)
            elif outcome == DOWN:
                stats.failures += 1
                host.strikes += 1
                host.aimd.cut(lease.epoch, to=1.0)
                if host.up and host.strikes >= self.down_after:
                    self._take_out(host)
        self._dispatch()
        self._maybe_log()
        return outcome

    @asynccontextmanager
    async def lease(self, exclude: Iterable[str] = ()) -> AsyncIterator[Host]:
        """``async with pool.lease() as host``: one try on one host; how the block ends (answered,
        or which exception) teaches the pool about the host."""
        lease = await self.acquire(exclude)
        try:
            yield lease.host
        except BaseException as exc:
            self.release(lease, exc)
            raise
        self.release(lease)

    async def call(self, fn: Callable[[Host], Awaitable[T]], *, max_tries: int | None = None) -> T:
        """``await fn(host)`` on a host with room; when it fails there in a way another host can
        mend (refused, dropped, timed out, busy, 5xx), again on another, up to ``max_tries`` hosts
        (then :class:`RequestFailed`). Other exceptions propagate at once."""
        tried: list[str] = []
        tries = max_tries or self.max_tries
        while True:
            lease = await self.acquire(tried)
            try:
                result = await fn(lease.host)
            except BaseException as exc:
                outcome = self.release(lease, exc)
                if outcome in (CANCELLED, FATAL):
                    raise
                tried.append(lease.host.url)
                if self._spent(tried, tries):
                    raise RequestFailed(tried, exc) from exc
                continue
            self.release(lease)
            return result

    def _spent(self, tried: list[str] | tuple[str, ...], tries: int) -> bool:
        """Whether a request failed on enough hosts to give it up. Tries on hosts that are out now
        count only past ``down_after`` per host: the host failed there, not the request (while
        every host is out, requests wait for :class:`AllHostsDown` instead)."""
        up = {h.url for h in self.hosts if h.up}
        return (sum(url in up for url in tried) >= tries
                or len(tried) >= tries + self.down_after * len(self.hosts))

    async def map(self, items: Iterable[X], fn: Callable[[Host, X], Awaitable[T]], *,
                  max_tries: int | None = None, priority: int = 0,
                  ) -> AsyncIterator[tuple[X, T | RequestFailed]]:
        """Answer every item with ``fn(host, item)``, as many at once as the hosts' windows allow;
        yields ``(item, result)`` as they finish, each item exactly once (``result`` is a
        :class:`RequestFailed` for an item that failed on ``max_tries`` hosts). An exception no
        other host can mend, or :class:`AllHostsDown`, ends the iteration (in-flight tries are
        cancelled). Several maps at once share the hosts; the lowest ``priority`` is served first."""
        todo: deque[tuple[X, tuple[str, ...]]] = deque((item, ()) for item in items)
        total, tries = len(todo), max_tries or self.max_tries
        out: asyncio.Queue[tuple[Any, Any, BaseException | None]] = asyncio.Queue()
        wake = asyncio.Event()
        running: set[asyncio.Task] = set()

        async def attempt(lease: Lease, item: X, tried: tuple[str, ...]) -> None:
            try:
                result = await fn(lease.host, item)
            except BaseException as exc:
                outcome = self.release(lease, exc)
                if outcome == CANCELLED:
                    raise
                if outcome == FATAL:
                    out.put_nowait((item, None, exc))
                elif self._spent((*tried, lease.host.url), tries):
                    out.put_nowait((item, RequestFailed([*tried, lease.host.url], exc), None))
                else:
                    tried = (*tried, lease.host.url)
                    elsewhere = any(h.up and h.url not in tried for h in self.hosts)
                    wait = self.backoff(len(tried)) if self.backoff and not elsewhere else 0.0
                    asyncio.get_running_loop().call_later(wait, again, item, tried)
                return
            self.release(lease)
            out.put_nowait((item, result, None))

        def again(item: X, tried: tuple[str, ...]) -> None:
            todo.appendleft((item, tried))
            wake.set()

        async def dispatch() -> None:
            while True:
                while not todo:
                    wake.clear()
                    await wake.wait()
                item, tried = todo.popleft()
                try:
                    lease = await self.acquire(tried, priority)
                except BaseException:
                    todo.appendleft((item, tried))
                    raise
                task = asyncio.create_task(attempt(lease, item, tried))
                running.add(task)
                task.add_done_callback(running.discard)

        def stopped(task: asyncio.Task) -> None:  # AllHostsDown (or a bug): the consumer raises it
            if not task.cancelled() and task.exception() is not None:
                out.put_nowait((None, None, task.exception()))

        queued = (priority, todo)
        self._queues.append(queued)
        dispatcher = asyncio.create_task(dispatch())
        dispatcher.add_done_callback(stopped)
        try:
            for _ in range(total):
                item, result, exc = await out.get()
                if exc is not None:
                    raise exc
                yield item, result
        finally:
            self._queues = [q for q in self._queues if q is not queued]
            dispatcher.cancel()
            for task in list(running):
                task.cancel()
            await asyncio.gather(dispatcher, *running, return_exceptions=True)

    # --- health ----------------------------------------------------------------------------------

    def _take_out(self, host: Host) -> None:
        host.up = False
        host.stats.downs += 1
        log.warning("LLM host %s taken out after %d failures in a row (%s); probing it with back-off",
                    host.url, host.strikes, host.last_error)
        self._probe_out(host)

    def _probe_out(self, host: Host) -> None:
        """Probe a host that is out; when none is left, start the wait for one to come back."""
        self._probes[host.url] = asyncio.get_running_loop().create_task(self._probe_loop(host))
        if not self.up and self._give_up is None:
            log.warning("every LLM host is out; waiting up to %.0f s for one to come back", self.all_down_s)
            self._give_up = asyncio.get_running_loop().call_later(self.all_down_s, self._all_down)

    def _all_down(self) -> None:
        self._give_up = None
        if self.up:
            return
        self._failed = AllHostsDown(self.hosts, self.all_down_s)
        while self._waiters:
            _, fut, _ = self._waiters.pop(0)
            if not fut.done():
                fut.set_exception(self._failed)

    def _bring_back(self, host: Host) -> None:
        host.up, host.strikes, host.ok_when_back = True, 0, host.stats.ok
        host.aimd.reset()
        self._failed = None
        if self._give_up is not None:
            self._give_up.cancel()
            self._give_up = None
        log.warning("LLM host %s answers again: back in the pool", host.url)
        self._dispatch()

    async def _probe_loop(self, host: Host) -> None:
        """Probe ``host`` until it answers, waiting twice as long after each miss. The wait goes on
        from where it was for a host that fails again soon after coming back (it answers a probe
        but not a request: a hung GPU), and starts over once it has answered requests again."""
        delay = max(self.probe_s, min(host.probe_delay, self.probe_max_s))
        try:
            while True:
                await asyncio.sleep(delay)
                host.stats.probes += 1
                delay = host.probe_delay = min(delay * 2, self.probe_max_s)
                if await self.probe(host):
                    self._bring_back(host)
                    return
        finally:
            self._probes.pop(host.url, None)

    async def probe(self, host: Host) -> bool:
        """Whether ``host`` answers HTTP at all (``GET /api/version``; any answer below 500 counts:
        a 401 is a server that is up)."""
        if self._probe_fn is not None:
            return await self._probe_fn(host)
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=self.probe_timeout_s)
        try:
            resp = await self._http.get(f"{host.base}/api/version")
        except (httpx.HTTPError, OSError):
            return False
        return resp.status_code < 500

    # --- figures ---------------------------------------------------------------------------------

    def stats(self) -> list[HostStats]:
        """Each host's figures now (requests, errors, p50/p95 latency, learned concurrency)."""
        return [h.snapshot() for h in self.hosts]

    def summary(self) -> dict[str, dict]:
        """The figures by host URL, as plain dicts (the run summary)."""
        return {s.url: s.to_dict() for s in self.stats()}

    def describe(self) -> str:
        """One log line: each host's answers, errors, p50/p95 and window."""
        return " | ".join(s.line() for s in self.stats())

    def _maybe_log(self) -> None:
        now = time.monotonic()
        if self.log_every_s and now - self._last_log >= self.log_every_s:
            self._last_log = now
            log.info("LLM hosts: %s", self.describe())
