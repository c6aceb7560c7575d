"""The run's summary: what was asked, what came from the cache, each prompt's fate, and how fast
the calls went (the ``reminders-run`` artifact and the JSON ``mmem reminders`` prints)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from llmcalls.shard import ShardStats
from reminders.outcome import Outcome
from schemas.reminders import RemindersResult


def run_summary(prompts: int, cache_hits: int, shard_stats: Sequence[ShardStats], outcome: Outcome,
                wall_s: float, gen_s: float, backend: str | None, **more) -> RemindersResult:
    """The result of a run; ``more``: its other fields (shard counts, versions read and written)."""
    lat = np.array([x for s in shard_stats for x in s.latencies]) if shard_stats else np.array([])
    tokens = sum(s.completion_tokens for s in shard_stats)
    calls = sum(s.requests - s.skipped for s in shard_stats)
    return RemindersResult(
        prompts=prompts, cache_hits=cache_hits, calls=calls,
        retries=sum(s.retries for s in shard_stats), failures=len(outcome.failed),
        quarantined=len(outcome.rejections), valid=len(outcome.rows),
        latency_p50_s=round(float(np.percentile(lat, 50)), 4) if lat.size else None,
        latency_p95_s=round(float(np.percentile(lat, 95)), 4) if lat.size else None,
        tokens_per_s=round(tokens / gen_s, 1) if gen_s else None,
        requests_per_s=round(calls / gen_s, 1) if gen_s else None,
        wall_s=round(wall_s, 2), backend=backend, **outcome.counts(), **more)
