"""The reminders stage's Prefect tasks: thin wrappers around ``reminders`` (plan, validate, write)
and the LLM shard as a task, cached by Prefect on its requests' hashes with its stats persisted as
JSON under the data root (``ShardResults``).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict

# SHIM(17): the pure names other modules still import from here (re-exports marked F401);
# deleted by the final import rewrite
from reminders.export import export_hf, export_report_json, read_reminders  # noqa: F401
from reminders.outcome import Outcome, sort_out  # noqa: F401
from reminders.parse import check, parse_response  # noqa: F401
from reminders.prompts import (  # noqa: F401
    ImageRootMissing,
    Prompt,
    build_prompts,
    conversation_text,
    input_versions,
    load_inputs,
    plan,
    repair_request,
    system_prompt,
)
from reminders.write import table_version, validate_rows, write  # noqa: F401
from schemas.reminders import RemindersConfig
from tasks.llm_client import (
    ERROR,
    OK,
    REJECTED,
    Journal,
    LLMClient,
    LLMRequest,
    ResponseCache,
    read_journal,
)
from tasks.llm_slots import free_dead
from tasks.runtime import CheckedResults, Progress, checked_storage, logger
from tasks.secrets import HostAuth, host_auth

# Bump when ShardStats' layout or home changes: stats persisted by older code must not be served from cache.
# 2: JSON results (version 1 wrote pickles: their keys are never looked up again).
SHARD_RESULT_VERSION = 2


# --- the shard ------------------------------------------------------------------------------


class ShardStats(BaseModel):
    """What a shard did: its task's result, persisted as JSON (``ShardResults``)."""

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

    def __init__(self, shard: int | None = None, /, **data) -> None:
        if shard is not None:
            data["shard"] = shard
        super().__init__(**data)


class ShardResults(CheckedResults):
    """Where shard stats persist: read back only as JSON of ``ShardStats``."""

    _block_type_name = "mmem reminders shard results"
    result_model = ShardStats


class ShardFailed(RuntimeError):
    """A shard still had failed requests after their retries: re-run the flow to retry only those."""

    def __init__(self, message: str, stats: ShardStats) -> None:
        super().__init__(message, stats)
        self.stats = stats

    def __str__(self) -> str:
        return str(self.args[0])


async def run_shard(shard: int, requests: list[LLMRequest], config: RemindersConfig, journal_path: Path,
                    workers: int, backend: str | None = None, auth: HostAuth | None = None) -> ShardStats:
    """Make the shard's calls, ``workers`` at a time, appending each finished one to the journal.
    ``auth``: which host gets which token (default: the config's bindings)."""
    stats = ShardStats(shard, requests=len(requests))
    t0 = time.perf_counter()
    with Journal(journal_path) as journal, Progress(len(requests), f"shard {shard}", log_every=0.5,
                                                    enabled=False) as progress:
        done = journal.done()
        todo = [r for r in requests if r.request_hash not in done]
        stats.skipped = len(requests) - len(todo)
        queue: asyncio.Queue[LLMRequest] = asyncio.Queue()
        for r in todo:
            queue.put_nowait(r)

        def retried() -> None:
            stats.retries += 1

        async with LLMClient(config.host, timeout_s=config.timeout_s, max_attempts=config.max_attempts,
                             backoff_s=config.backoff_s, backoff_max_s=config.backoff_max_s,
                             backend=backend, auth=auth or host_auth(config)) as client:

            async def worker() -> None:
                while not queue.empty():
                    req = queue.get_nowait()
                    res = await client.chat(req, on_retry=retried)
                    journal.append(res.row(req, config.host))
                    stats.latencies.append(res.latency_s)
                    stats.ok += res.status == OK
                    stats.failed += res.status == ERROR
                    stats.rejected += res.status == REJECTED
                    stats.completion_tokens += res.completion_tokens or 0
                    progress()

            await asyncio.gather(*(worker() for _ in range(min(workers, len(todo)) or 1)))
    stats.wall_s = time.perf_counter() - t0
    return stats


def shard_errors(paths: list[Path]) -> dict[str, dict]:
    """Error rows of this round's journals (read before they are merged)."""
    rows = {}
    for path in paths:
        for r in read_journal(path):  # signed rows only: a planted error row quarantines nothing
            if r["status"] != OK:
                rows[r["request_hash"]] = r
    return rows



# --- Prefect task wrappers -------------------------------------------------------------------


def check_server(config: RemindersConfig, auth: HostAuth | None = None) -> str:
    async def _check() -> str:
        async with LLMClient(config.host, timeout_s=config.timeout_s, auth=auth or host_auth(config)) as client:
            return await client.check(config.model)

    return asyncio.run(_check())


def limit_name(host: str) -> str:
    """The Prefect global concurrency limit shared by every flow run that talks to ``host``."""
    return "ollama-" + "".join(c if c.isalnum() or c in ".-_" else "-" for c in host.split("://")[-1])


def ensure_limit(config: RemindersConfig) -> tuple[str, int]:
    """Create the host's limit with ``config.concurrency`` slots if missing; returns (name, slots to
    hold), never more than the limit an operator may have set lower."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    name = limit_name(config.host)
    with get_client(sync_client=True) as client:
        try:
            limit = client.read_global_concurrency_limit_by_name(name).limit
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name,
                                                                                    limit=config.concurrency))
            except ObjectAlreadyExists:
                pass
            limit = client.read_global_concurrency_limit_by_name(name).limit
    if limit < 1:
        raise RuntimeError(f"the concurrency limit {name!r} has no slots; raise it in the Prefect UI")
    return name, min(limit, config.concurrency)


def lookup(cache: ResponseCache, hashes: list[str]) -> dict[str, dict]:
    return cache.lookup(hashes)


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
                         workers: int, backend: str | None, answered: frozenset[str] = frozenset()) -> ShardStats:
    """A shard as a task: fails (after writing every finished call) if any request still failed.

    ``requests`` is the whole shard (its cache key); those in ``answered`` (already in the response
    cache) are not asked again, so a cache miss on a done shard makes no call and writes nothing.
    """
    todo = [r for r in requests if r.request_hash not in answered]
    if not todo:
        return ShardStats(shard)
    stats = await run_shard(shard, todo, config, journal_path, workers, backend)
    logger().info("shard %d: %d ok, %d failed, %d rejected, %d retries, %d skipped, %.1f s", shard, stats.ok,
                  stats.failed, stats.rejected, stats.retries, stats.skipped, stats.wall_s)
    if stats.failed:
        raise ShardFailed(f"shard {shard}: {stats.failed} of {stats.requests} requests still failed after "
                          f"{config.max_attempts} attempts; re-run the flow to retry only them", stats)
    return stats


def merge_journal(cache: ResponseCache, path: Path) -> int:
    return cache.merge(path)


def recover_journals(cache: ResponseCache) -> int:
    """Finished calls of a killed run, still in its journals, go into the cache first."""
    return cache.recover()


def slots_dir(config: RemindersConfig) -> Path:
    """Where runs on this data root record the LLM host's concurrency slots they hold."""
    return config.cache_dir / "llm_slots"


def free_dead_slots(config: RemindersConfig) -> int:
    """Give back the concurrency slots that killed runs still hold (see ``tasks.llm_slots``)."""
    return free_dead(slots_dir(config))


plan_task = task(plan, name="plan-reminder-prompts", cache_policy=NO_CACHE)
check_server_task = task(check_server, name="check-ollama-server", cache_policy=NO_CACHE)
generate_shard_task = task(generate_shard, name="generate-shard", cache_key_fn=shard_cache_key, persist_result=True,
                           result_serializer="json")
merge_journal_task = task(merge_journal, name="cache-llm-responses", cache_policy=NO_CACHE, retries=2,
                          retry_delay_seconds=1)
recover_task = task(recover_journals, name="recover-llm-journals", cache_policy=NO_CACHE)
free_dead_slots_task = task(free_dead_slots, name="free-dead-runs-llm-slots", cache_policy=NO_CACHE)
ensure_limit_task = task(ensure_limit, name="ensure-ollama-concurrency-limit", cache_policy=NO_CACHE)
lookup_task = task(lookup, name="lookup-llm-cache", cache_policy=NO_CACHE)
validate_task = task(validate_rows, name="validate-reminders", cache_policy=NO_CACHE)
write_task = task(write, name="write-reminders", retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE)
