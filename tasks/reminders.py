"""The reminders stage's Prefect tasks: thin wrappers around ``reminders`` (plan, validate, write)
and ``llmcalls`` (the fill's lookups and merges, the server check, a shard of calls). A shard is a
task cached by Prefect on its requests' hashes, its stats persisted as JSON under the data root.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from llmcalls.fill import Fill, plan_fill
from llmcalls.requests import LLMRequest
from llmcalls.shard import ShardFailed, ShardStats, check_server, run_shard
from reminders.prompts import plan
from reminders.write import table_version, validate_rows, write
from schemas.reminders import RemindersConfig
from tasks.runtime import CheckedResults, checked_storage, logger
from tasks.runtime.secrets import host_auth
from tasks.runtime.slots import ensure_limit, free_dead_slots

# Bump when the shard result's layout or home changes: results persisted by older code are then
# never looked up again (the response cache and the tables still skip the work they record).
# 2: JSON results (version 1 wrote pickles). 3: ShardStats moved to llmcalls.shard.
SHARD_RESULT_VERSION = 3


class ShardResults(CheckedResults):
    """Where shard stats persist: read back only as JSON of ``ShardStats``."""

    _block_type_name = "mmem reminders shard results"
    result_model = ShardStats


def shard_cache_key(context, parameters) -> str:
    """A shard's Prefect cache key: its requests' hashes (each covers the model, the messages with
    the image's content hash, and the generation options). A shard whose every request was
    answered is a cache hit on the next run (state ``Cached``); the run label, journal path and
    worker count do not matter."""
    h = hashlib.sha256(f"reminders-shard\0{SHARD_RESULT_VERSION}\0".encode())
    h.update("\0".join(r.request_hash for r in parameters["requests"]).encode())
    return f"reminders-shard-{h.hexdigest()[:40]}"


def shard_results_storage(config: RemindersConfig) -> ShardResults:
    """Shard results (their stats, JSON) persist under the data root, so a cache hit on one data root
    never answers for another."""
    return checked_storage(ShardResults, config.cache_dir / "reminders_shards", "mmem-reminders")


async def generate_shard(shard: int, requests: list[LLMRequest], config: RemindersConfig, journal_path: Path,
                         workers: int, backend: str | None,
                         answered: frozenset[str] = frozenset(),
                         caps: dict[str, int] | None = None, shared: str | None = None) -> ShardStats:
    """A shard as a task: fails (after writing every finished call) if any request still failed.

    ``requests`` is the whole shard (its cache key); those in ``answered`` (already in the response
    cache) are not asked again, so a cache miss on a done shard makes no call and writes nothing.
    ``caps``: with several hosts, the most requests at once on each (its share of the slots held)
    when the shard runs on a pool of its own, not on the fan-out's (``shared``, see ``run_shard``).
    """
    todo = [r for r in requests if r.request_hash not in answered]
    if not todo:
        return ShardStats(shard)
    stats = await run_shard(shard, todo, config, journal_path, workers, backend, auth=host_auth(config),
                            caps=caps, shared=shared)
    logger().info("shard %d: %d ok, %d failed, %d rejected, %d retries, %d skipped, %.1f s", shard, stats.ok,
                  stats.failed, stats.rejected, stats.retries, stats.skipped, stats.wall_s)
    for url, h in stats.hosts.items():
        logger().info("shard %d, host %s%s: %d ok, %d errors, p50 %s ms, p95 %s ms, %d at once (learned)",
                      shard, url, "" if h["up"] else " (out)", h["ok"], h["errors"], _ms(h["p50_ms"]),
                      _ms(h["p95_ms"]), h["concurrency"])
    if stats.failed:
        raise ShardFailed(f"shard {shard}: {stats.failed} of {stats.requests} requests still failed after "
                          f"{config.max_attempts} attempts; re-run the flow to retry only them", stats)
    return stats


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def server_backend(config: RemindersConfig) -> str:
    """Fail fast unless the host answers and has the model; the backend that will answer."""
    return check_server(config, config.model, auth=host_auth(config))


def merge_shard(fill: Fill, i: int) -> dict[str, dict]:
    """Shard ``i``'s journal into the cache; returns its error rows (the journal is gone after)."""
    fill.merge(i)
    return fill.errors(i)


def lookup_again(fill: Fill) -> dict[str, dict]:
    return fill.refresh()


plan_task = task(plan, name="plan-reminder-prompts", cache_policy=NO_CACHE)
table_version_task = task(table_version, name="read-table-version", cache_policy=NO_CACHE)
plan_fill_task = task(plan_fill, name="lookup-llm-cache", cache_policy=NO_CACHE)
lookup_again_task = task(lookup_again, name="lookup-llm-cache-again", cache_policy=NO_CACHE)
check_server_task = task(server_backend, name="check-ollama-server", cache_policy=NO_CACHE)
generate_shard_task = task(generate_shard, name="generate-shard", cache_key_fn=shard_cache_key,
                           persist_result=True, result_serializer="json")
merge_shard_task = task(merge_shard, name="cache-llm-responses", cache_policy=NO_CACHE, retries=2,
                        retry_delay_seconds=1)
free_dead_slots_task = task(free_dead_slots, name="free-dead-runs-llm-slots", cache_policy=NO_CACHE)
ensure_limit_task = task(ensure_limit, name="ensure-ollama-concurrency-limit", cache_policy=NO_CACHE)
validate_task = task(validate_rows, name="validate-reminders", cache_policy=NO_CACHE)
write_task = task(write, name="write-reminders", retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE)
