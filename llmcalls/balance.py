"""How many requests one host gets at once, learned from its answers (AIMD on latency).

Nobody configures an Ollama host's capacity: a server with ``OLLAMA_NUM_PARALLEL=4`` answers four
requests at a time and queues the rest, so past its capacity more requests in flight only make
each one wait longer. :class:`Aimd` grows a host's window while its latency stays near the host's
own low-load baseline (one more request per round trip; doubling at the start, as TCP's slow
start does) and shrinks it when the latency shows a queue (``tolerance`` x the baseline), or the
server says busy (429/503), or requests time out. A latency cut lands where Little's law puts the
host's capacity (requests in flight x baseline / latency), so the window saws between about the
capacity and ``tolerance`` x it: every slot stays busy, and a host twice as fast ends with a
window twice as wide.

Latency is judged over a window of a few answers (their median), not one, because generation
times vary with the answer's length; the baseline is the lowest such median of the recent past,
or the latest one measured with a single request in flight (nothing of ours can queue then: the
host really got slower, e.g. longer prompts or a neighbour on its GPU). Answers to requests sent
before a cut say nothing about the new window and are ignored (one cut per congestion, not one
per queued request).
"""

from __future__ import annotations

import asyncio
import statistics
from collections import deque
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx
import ollama
from pydantic import BaseModel, ConfigDict

from llmcalls.requests import LLMUnavailable

# How one try on a host ended (``classify``): answered; the host is busy (429/503: fewer at once);
# the host is down or too slow (refused, dropped, timed out: fewer at once, and a strike); it failed
# there with a 5xx (try another host); the caller's own problem (a 4xx, a bug: no other host mends
# it); the caller gave up (cancelled: teaches nothing).
OK, BUSY, DOWN, ERROR, FATAL, CANCELLED = "ok", "busy", "down", "error", "fatal", "cancelled"


@dataclass
class Aimd:
    """One host's concurrency window. ``allowed`` is how many requests it may have in flight."""

    initial: float = 1.0
    cap: int | None = None  # the user's limit for a host shared with others
    ceiling: int = 256  # the most without a cap
    tolerance: float = 1.75  # window medians above tolerance x baseline mean a queue
    patience: int = 2  # windows in a row above it (a stall of the client's own process lasts one)
    window: int = 4  # answers per latency median (at least: a window is one round trip's answers)
    memory: int = 1000  # medians the baseline remembers
    backoff: float = 0.5  # the cut on a busy answer or a timeout
    quiet: float = 1.25  # a window median within quiet x baseline: no queue at that many in flight

    limit: float = field(init=False)
    epoch: int = field(init=False, default=0)  # bumped by each cut; leases remember theirs
    slow_start: bool = field(init=False, default=True)
    cuts: int = field(init=False, default=0)
    peak: int = field(init=False, default=0)
    _recent: list[tuple[float, int]] = field(init=False, default_factory=list, repr=False)
    _slow: int = field(init=False, default=0)  # windows in a row above tolerance
    _medians: deque[float] = field(init=False, repr=False)
    _quiet: deque[float] = field(init=False, repr=False)  # in-flight counts the host served without a queue

    def __post_init__(self) -> None:
        if self.cap is not None and self.cap < 1:
            raise ValueError(f"a host's cap must be at least 1, not {self.cap}")
        self._medians = deque(maxlen=self.memory)
        self._quiet = deque(maxlen=self.memory)
        self.reset()

    @property
    def top(self) -> int:
        return min(self.cap, self.ceiling) if self.cap is not None else self.ceiling

    @property
    def allowed(self) -> int:
        return max(1, min(int(self.limit), self.top))

    @property
    def baseline(self) -> float | None:
        """The host's low-load latency in seconds (None until a window of answers came back)."""
        return min(self._medians) if self._medians else None

    def reset(self) -> None:
        """Start over (a host that came back may be another server now); the baseline is kept."""
        self.limit = float(min(self.initial, self.top))
        self.slow_start = True
        self.epoch += 1
        self._slow = 0
        self._recent.clear()
        self.peak = max(self.peak, self.allowed)

    def learned(self) -> tuple[float, float | None, float | None]:
        """What to start the next pool on this host from: (window, baseline, most in flight
        served without a queue)."""
        return self.limit, self.baseline, max(self._quiet, default=None)

    def resume(self, window: float, baseline: float | None, quiet: float | None) -> None:
        """Start from what an earlier pool learned (a run's shards, one pool each, one after
        another): that window, without slow start, and its baseline."""
        self.limit = float(max(1.0, min(window, self.top)))
        self.slow_start = False
        if baseline is not None:
            self._medians.append(baseline)
        if quiet is not None:
            self._quiet.append(quiet)
        self.peak = max(self.peak, self.allowed)

    def ok(self, latency_s: float, epoch: int, load: int) -> None:
        """An answer after ``latency_s``, to a request sent in ``epoch`` with ``load`` requests in
        flight on the host (itself included). The window grows only when that filled it (a window
        the caller never fills says nothing about the host)."""
        if epoch != self.epoch:
            return
        if load >= self.allowed and not self._slow:  # (no growth while a queue is suspected)
            self.limit = min(self.limit + (1.0 if self.slow_start else 1.0 / self.limit), float(self.top))
            self.peak = max(self.peak, self.allowed)
        self._recent.append((latency_s, load))
        if len(self._recent) < max(self.window, self.allowed):
            return
        median = statistics.median(lat for lat, _ in self._recent)
        in_flight = statistics.median(n for _, n in self._recent)
        self._recent.clear()
        if in_flight <= 1:  # alone on the host: this is its latency now, whatever it was before
            self._medians.clear()
            self._quiet.clear()
        base = self.baseline
        if base is None or median <= self.tolerance * base:
            self._slow = 0
            self._medians.append(median)
            if base is None or median <= self.quiet * base:
                self._quiet.append(in_flight)
            return
        self._slow += 1
        if self._slow >= self.patience:
            # Little's law: the host serves in_flight x base / median at once; and at least as many
            # as it recently served without a queue (a stall of the client's own process makes
            # every answer late, and says nothing about the host)
            capacity = max(in_flight * base / median, max(self._quiet, default=1.0))
            self.cut(epoch, to=capacity)

    def cut(self, epoch: int, to: float | None = None) -> bool:
        """Shrink the window (to ``to``, or by ``backoff``), once per epoch: answers to requests
        sent before a cut do not cut again. Returns whether it cut."""
        self._slow = 0
        target = max(1.0, to if to is not None else self.limit * self.backoff)
        if epoch != self.epoch or target >= self.limit:
            return False
        self.limit = target
        self.slow_start = False
        self.epoch += 1
        self.cuts += 1
        self._recent.clear()
        return True


class HostBusy(RuntimeError):
    """Raise in a try to say the host is overloaded (as a 429/503 does)."""


class HostDown(ConnectionError):
    """Raise in a try to say the host did not answer (as a refused connection does)."""


def classify(exc: BaseException) -> str:
    """Which outcome an exception from a try on a host is (``OK`` ... ``CANCELLED`` above)."""
    if isinstance(exc, asyncio.CancelledError):
        return CANCELLED
    if isinstance(exc, HostBusy):
        return BUSY
    status = None
    if isinstance(exc, ollama.ResponseError):
        status = exc.status_code
    elif isinstance(exc, httpx.HTTPStatusError):
        status = exc.response.status_code
    if status is not None:
        if status in (429, 503):
            return BUSY
        if status == -1:
            return DOWN
        return ERROR if status >= 500 else FATAL
    if isinstance(exc, (httpx.TransportError, TimeoutError, ConnectionError)):
        return DOWN  # httpx.TimeoutException is a TransportError; ollama raises ConnectionError on refusal
    return FATAL


def describe_error(exc: BaseException | None) -> str:
    """One line for a host's last error: the exception's type and its first 200 characters."""
    if exc is None:
        return ""
    text = " ".join(str(exc).split())[:200]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def base_url(url: str) -> str:
    """``url`` as a base URL, with scheme and port filled in as Ollama's client does."""
    default = None
    if "://" not in url:
        url, default = "http://" + url, 11434
    parts = urlsplit(url)
    port = parts.port or default or (443 if parts.scheme == "https" else 80)
    name = parts.hostname or "localhost"
    name = f"[{name}]" if ":" in name else name
    return f"{parts.scheme}://{name}:{port}{parts.path.rstrip('/')}"


@dataclass(frozen=True)
class HostSpec:
    """One host as the user names it: ``URL``, or ``URL=limit`` (at most ``limit`` at once)."""

    url: str
    cap: int | None = None

    @classmethod
    def parse(cls, text: str) -> HostSpec:
        text = text.strip()
        url, sep, limit = text.rpartition("=")
        if sep and limit.strip().isdigit():
            cap = int(limit)
            if cap < 1:
                raise ValueError(f"{text!r}: a host's limit must be at least 1")
            return cls(url.strip(), cap)
        if not text:
            raise ValueError("an empty host name")
        return cls(text)

    def __str__(self) -> str:
        return self.url if self.cap is None else f"{self.url}={self.cap}"


class HostStats(BaseModel):
    """One host's figures: for the logs and the run summary."""

    model_config = ConfigDict(extra="forbid")

    url: str
    up: bool = True
    requests: int = 0  # tries that ended (answered or failed)
    ok: int = 0
    errors: int = 0  # tries that failed here (each went to another host, or was given up)
    busy: int = 0  # of which: 429/503
    failures: int = 0  # of which: refused, dropped or timed out
    downs: int = 0  # times taken out
    probes: int = 0
    in_flight: int = 0
    concurrency: int = 0  # the window learned so far
    peak_concurrency: int = 0
    cap: int | None = None
    cuts: int = 0
    p50_ms: float | None = None
    p95_ms: float | None = None
    baseline_ms: float | None = None
    last_error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()

    def line(self) -> str:
        p50 = f"{self.p50_ms:.0f}" if self.p50_ms is not None else "-"
        p95 = f"{self.p95_ms:.0f}" if self.p95_ms is not None else "-"
        state = "" if self.up else " DOWN"
        return (f"{self.url}{state}: {self.ok} ok, {self.errors} errors, p50 {p50} ms, p95 {p95} ms, "
                f"{self.in_flight}/{self.concurrency} in flight")


class Host:
    """A host of a pool: its window, health and figures, and the caller's client for it."""

    def __init__(self, spec: HostSpec, aimd: Aimd, client: Any = None, keep: int = 20000) -> None:
        self.spec, self.url, self.base = spec, spec.url, base_url(spec.url)
        self.aimd, self.client = aimd, client
        self.up, self.in_flight, self.strikes = True, 0, 0
        self.probe_delay, self.ok_when_back = 0.0, 0  # the probes' back-off, kept over a quick relapse
        self.last_error: str | None = None
        self.stats = HostStats(url=spec.url, cap=spec.cap)
        self._latencies: deque[float] = deque(maxlen=keep)

    def __repr__(self) -> str:
        return f"Host({self.url!r}, up={self.up}, in_flight={self.in_flight}, allowed={self.aimd.allowed})"

    def record(self, latency_s: float) -> None:
        self._latencies.append(latency_s)

    def snapshot(self) -> HostStats:
        lat = sorted(self._latencies)
        p50 = 1000 * lat[len(lat) // 2] if lat else None
        p95 = 1000 * lat[min(len(lat) - 1, int(0.95 * len(lat)))] if lat else None
        base = self.aimd.baseline
        return self.stats.model_copy(update={
            "up": self.up, "in_flight": self.in_flight, "concurrency": self.aimd.allowed,
            "peak_concurrency": self.aimd.peak, "cuts": self.aimd.cuts, "p50_ms": p50, "p95_ms": p95,
            "baseline_ms": 1000 * base if base is not None else None, "last_error": self.last_error})


class AllHostsDown(LLMUnavailable):
    """Every host was out for the whole wait: nothing left to send requests to."""

    def __init__(self, hosts: list[Host], waited_s: float) -> None:
        lines = "; ".join(f"{h.url}: {h.last_error or 'no answer'}" for h in hosts)
        super().__init__(f"no LLM host answered for {waited_s:.0f} s ({lines}). Start them again (or "
                         "point --ollama-host elsewhere) and re-run: answered requests are not asked again.")


class RequestFailed(RuntimeError):
    """One request failed on every host it was tried on; ``last`` is the last host's error."""

    def __init__(self, tried: list[str], last: BaseException) -> None:
        super().__init__(f"failed on {len(tried)} tries ({', '.join(dict.fromkeys(tried))}): "
                         f"{type(last).__name__}: {' '.join(str(last).split())[:200]}")
        self.tried, self.last = tried, last
