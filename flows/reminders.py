"""The reminders flow: every cleaned dialog -> one ``<reminder>`` self-reflection sample.

Composition only. The response cache is the authority on what was answered: ``llmcalls.fill``
plans each round (the dialogs' requests, then the one bounded repair round), cuts its requests
into fixed shards (prompt order) and merges each shard's journal as it ends. Every shard is a task
cached by Prefect on its requests' hashes (results persisted under the data root): on a re-run
the shards answered before show as ``Cached`` and only those with unanswered prompts run, asking
only for those prompts. The flow logs the input table versions it read and the versions it wrote.

While shards that ask the server run, the flow holds the Ollama host's slots of a Prefect global
concurrency limit (named after the host), so several flow runs together never exceed what the
server serves. The flow holds them once rather than a shard or a request at a time because each
acquisition is a round trip to the Prefect API, and a blocked acquirer sleeps for the limit's
average occupancy before asking again. Inside, at most two shards run at once, splitting the
slots between them, so one shard's tail overlaps the next one's start. The slots are held through
``tasks.runtime.slots``, which records the lease on disk so that the next run gives back the
slots of a killed run (Prefect's own context manager would leave them taken).

Given several Ollama hosts, the flow holds each host's slots of its own limit and opens one host
pool for the fan-out (``llmcalls.spread.SharedHosts``), which the shards running in this process
hand their requests to: each host takes as many at once as it shows it can (learned once for the
run, not per shard), at most the slots held there, and a host that fails hands its requests to the
others. The earlier shard's requests go first, so the next shard fills the room its tail leaves
while it is merged (a shard run elsewhere, e.g. on a Dask worker, gets a pool of its own, with its
share of the slots). Each host's figures go to the logs and the run's summary (``hosts``).
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from dataclasses import dataclass, field, replace

from prefect import flow
from prefect.futures import as_completed
from prefect.utilities.annotations import quote

from llmcalls.cache import ResponseCache
from llmcalls.fill import Fill
from llmcalls.requests import LLMUnavailable
from llmcalls.shard import ShardFailed, ShardStats, hosts_summary, open_hosts
from reminders.outcome import Outcome, repaired, sort_out, to_repair
from reminders.prompts import Prompt, repair_request
from reminders.summary import run_summary
from schemas.config import host_url
from schemas.reminders import RemindersConfig, RemindersResult
from schemas.validate import ValidationFailed
from storage.lance import versions_text
from tasks.reminders import (
    check_server_task,
    ensure_limit_task,
    free_dead_slots_task,
    generate_shard_task,
    lookup_again_task,
    merge_shard_task,
    plan_fill_task,
    plan_task,
    shard_results_storage,
    table_version_task,
    validate_task,
    write_task,
)
from tasks.runtime import enforce_trust, logger, publish_markdown, publish_table, run_id
from tasks.runtime.secrets import host_auth
from tasks.runtime.slots import hold_slots, slots_dir


@dataclass
class Round:
    """What one fan-out over a fill did: stats of the shards that ran, failed shard indexes, the
    error rows of the shards that asked, the answers after it, seconds spent generating, shards
    served from Prefect's cache, and why no host could answer (the fan-out stopped there)."""

    fill: Fill
    answers: dict[str, dict]
    stats: list[ShardStats] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    errors: dict[str, dict] = field(default_factory=dict)
    seconds: float = 0.0
    cached: int = 0
    unavailable: LLMUnavailable | None = None


def fan_out(config: RemindersConfig, fill: Fill, backend: str | None) -> Round:
    """Run every shard of ``fill`` (fixed by prompt order, so a shard is the same on each run).

    A shard whose requests are all in the response cache is submitted as is: Prefect serves it
    from its persisted result (state ``Cached``), or, with no record, it runs and asks nothing. A
    shard with unanswered requests runs with ``refresh_cache`` (our cache is the authority: a
    stale Prefect record must not hide missing answers) and asks only those, holding the host's
    slots; each one's journal is merged as it finishes.
    """
    shard_task = generate_shard_task.with_options(retries=config.shard_retries,
                                                  retry_delay_seconds=config.shard_retry_delay_s,
                                                  result_storage=shard_results_storage(config))
    need = list(fill.needed)
    out = Round(fill, fill.answers)
    log = logger()

    def submit(i: int, workers: int, refresh: bool, caps: dict[str, int] | None = None):
        named = shard_task.with_options(task_run_name=f"shard-{fill.label}-{i:05d}", refresh_cache=refresh)
        return named.submit(i, quote(fill.shards[i]), config, fill.journal(i), workers, backend,
                            quote(fill.answered(i)), caps, fill.label if refresh else None)

    def settle(i: int, fut) -> None:
        result = fut.result(raise_on_failure=False)
        if fut.state.name == "Cached":
            out.cached += 1  # answered on an earlier run: no call, no stats counted twice
        elif isinstance(result, ShardFailed):
            out.failed.append(i)
            out.stats.append(result.stats)
        elif isinstance(result, BaseException):
            out.failed.append(i)
            log.error("shard %d failed: %s", i, result)
            if isinstance(result, LLMUnavailable):  # no host left (or no such model): ask no more
                out.unavailable = out.unavailable or result
        else:
            out.stats.append(result)

    quiet = {i: submit(i, 1, False) for i in sorted(set(range(len(fill.shards))) - set(need))}
    if need:
        hosts = [host_url(h) for h in config.hosts]
        limits = [ensure_limit_task(config, h) for h in hosts]  # (name, slots) of each host's limit
        slots = sum(n for _, n in limits)
        window = 2 if slots >= 2 and slots % 2 == 0 and len(need) > 1 else 1
        caps = {h: max(1, n // window) for h, (_, n) in zip(hosts, limits, strict=True)}  # a pool of its own
        pending, running = deque(need), {}
        # A one-minute lease per host, renewed while this run lives; a killed run's slots are given
        # back by the next run on this data root (tasks.runtime.slots), whatever server granted them.
        with contextlib.ExitStack() as held:
            for name, n in limits:
                held.enter_context(hold_slots(slots_dir(config), name, n))
            held_slots = {h: n for h, (_, n) in zip(hosts, limits, strict=True)}
            held.enter_context(open_hosts(fill.label, config, held_slots, backend, auth=host_auth(config)))
            t0 = time.perf_counter()
            while pending or running:
                while pending and len(running) < window:
                    i = pending.popleft()
                    running[i] = submit(i, slots // window, True, caps)
                done = next(as_completed(list(running.values())))
                i = next(k for k, f in running.items() if f is done)
                del running[i]
                settle(i, done)
                if out.unavailable is not None:
                    pending.clear()
                out.errors.update(merge_shard_task(quote(fill), i))  # the journal's error rows
                log.info("%s: %d/%d shards to ask done (%d failed)", fill.label,
                         len(need) - len(pending) - len(running), len(need), len(out.failed))
            out.seconds = time.perf_counter() - t0
        out.answers = lookup_again_task(quote(fill))
    for i, fut in quiet.items():
        settle(i, fut)
    log.info("%s: %d shards, %d asked the server, %d served from Prefect's cache", fill.label,
             len(fill.shards), len(need), out.cached)
    return out


@flow(name="reminders", log_prints=True)
def reminders_flow(config: RemindersConfig) -> RemindersResult:
    """Generate, cache, validate and write ``<reminder>`` samples for every dialog in ``config``.

    Returns the run's result; raises (after writing everything it has) when a shard failed, so a
    re-run, which makes no call for a cached key, finishes the job.
    """
    enforce_trust(config)
    t0 = time.perf_counter()
    run = run_id()
    cache = ResponseCache(config.lance_uri, config.cache_dir / "llm_journal")
    llm_before = table_version_task(config.lance_uri, "llm_responses")  # this run's merges are tagged
    free_dead_slots_task(config)
    prompts, plan_rejections, read_versions = plan_task(config)
    log = logger()
    log.info("reminders read %s", versions_text(read_versions))
    fill = plan_fill_task(cache, quote([p.request for p in prompts]), f"{run}-gen", config.shard_size)
    log.info("%d prompts: %d cached, %d to generate (%d journal rows recovered)", len(prompts),
             fill.cached, len(fill.missing()), fill.recovered)
    backend = check_server_task(config) if fill.needed else None
    rounds = [fan_out(config, fill, backend)]
    outcome = sort_out(prompts, rounds[0].answers, rounds[0].errors)
    if config.repair and outcome.rejections and rounds[0].unavailable is None:
        outcome, more = _repair(config, cache, prompts, outcome, backend, run)
        rounds.append(more)
    outcome = Outcome([], plan_rejections, []) + outcome
    failed_shards = [i for r in rounds for i in r.failed]

    report = validate_task(quote(outcome.rows))
    publish_markdown("reminders-validation", report.markdown(), "Great Expectations: reminders")
    if not report.success:
        raise ValidationFailed("reminders validation failed:\n" + report.markdown())
    written = write_task(config.lance_uri, quote(outcome), run, llm_before)
    result = run_summary(len(prompts) + len(plan_rejections), fill.cached,
                         [s for r in rounds for s in r.stats], outcome, time.perf_counter() - t0,
                         sum(r.seconds for r in rounds), backend,
                         shards=sum(len(r.fill.shards) for r in rounds),
                         shards_cached=sum(r.cached for r in rounds), read_versions=read_versions,
                         hosts=hosts_summary([s for r in rounds for s in r.stats]), **written)
    if not result.reconciles():
        raise RuntimeError(f"reminders counts do not reconcile: {result.to_json()}")
    publish_table("reminders-run", result.artifact_rows(),
                  "Reminders run: prompts, cache hits, calls, retries, failures, quarantined, latency, "
                  "tokens/s")
    log.info("reminders read %s; wrote %s (+%d inserted, %d updated)", versions_text(read_versions),
             versions_text(result.versions), result.inserted, result.updated)
    log.info("reminders: %s", result.flat())
    unavailable = next((r.unavailable for r in rounds if r.unavailable is not None), None)
    if unavailable is not None:
        raise unavailable  # one line saying which hosts and what to do; what was answered is kept
    if failed_shards:
        raise ShardFailed(f"{len(outcome.failed)} prompts still failed in shards {sorted(failed_shards)}; "
                          "re-run `mmem reminders`: cached answers are not requested again", ShardStats(-1))
    return result


def _repair(config: RemindersConfig, cache: ResponseCache, prompts: list[Prompt], outcome: Outcome,
            backend: str | None, run: str) -> tuple[Outcome, Round]:
    """One bounded re-ask for each answer that broke the format; the re-ask's verdict is final."""
    by_id = {p.image_id: p for p in prompts}
    fixes = {i: repair_request(by_id[i].request, bad) for i, bad in to_repair(outcome).items()}
    fill = plan_fill_task(cache, quote(list(fixes.values())), f"{run}-repair", config.shard_size,
                          recover=False)
    if fill.needed:
        backend = backend or check_server_task(config)
    more = fan_out(config, fill, backend)
    second = sort_out([replace(by_id[i], request=fixes[i]) for i in fixes], more.answers, more.errors)
    return repaired(outcome, second), more
