"""One shard of LLM calls spread over several Ollama hosts (issue 20): a :class:`HostPool` picks the
host of each request, learns how many each host takes at once, and moves a request that failed on
a host (refused, dropped, timed out, busy, 5xx) to another; each finished call is journaled at
once, with the host that answered it, so the response cache stays one cache.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable

from llmcalls.cache import Journal
from llmcalls.client import LLMClient
from llmcalls.hosts import Host, HostPool, HostSpec, RequestFailed
from llmcalls.requests import ERROR, LLMRequest, LLMResult

log = logging.getLogger("mmem." + __name__)

# What this process's pools learned about each host (window, baseline, queue-free load): a run's
# shards, one pool each, start where the last one ended instead of from one request at a time.
LEARNED: dict[str, tuple] = {}


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
                 journal: Journal, record: Callable[[str, LLMResult], None], *, max_tries: int,
                 all_down_s: float = 120.0, log_every_s: float = 30.0) -> dict[str, dict]:
    """Answer ``requests`` over ``hosts`` (each call's row to ``journal``, then ``record(host, result)``);
    returns each host's figures. A request that failed on ``max_tries`` hosts is journaled as an
    error (a re-run asks it again); ``AllHostsDown`` (no host back within ``all_down_s``) and a
    host's ``LLMUnavailable`` (no such model, refused token) end the shard."""
    tries: Counter[str] = Counter()

    async def ask(host: Host, req: LLMRequest) -> tuple[str, LLMResult]:
        tries[req.request_hash] += 1
        return host.url, await host.client.ask(req)

    async with HostPool(hosts, connect=connect, max_tries=max_tries, log_every_s=log_every_s,
                        all_down_s=all_down_s, memory=LEARNED) as pool:
        async for req, got in pool.map(requests, ask):
            if isinstance(got, RequestFailed):
                host, res = got.tried[-1], LLMResult(req.request_hash, ERROR, error=str(got),
                                                     attempts=tries[req.request_hash])
            else:
                host, res = got
                res.attempts = tries[req.request_hash]
            journal.append(res.row(req, host))
            record(host, res)
        log.info("LLM hosts: %s", pool.describe())
        return pool.summary()


def merge_hosts(per_shard: list[dict[str, dict]], latencies: dict[str, list[float]]) -> dict[str, dict]:
    """Each host's figures over a run's shards (``per_shard``: each shard's ``HostPool.summary()``;
    ``latencies``: each host's answered calls' seconds, for the run's p50/p95)."""
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
