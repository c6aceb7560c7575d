"""The reminders flow: every cleaned dialog -> one ``<reminder>`` self-reflection sample.

Composition only. Every prompt belongs to a fixed shard (prompt order), and every shard is a
task cached by Prefect on its requests' hashes (results persisted under the data root): on a
re-run the shards answered before show as ``Cached`` and only those with unanswered prompts run,
asking only for those prompts (the response cache stays the authority, so a Prefect cache miss
asks nothing twice). The flow logs the input table versions it read and the versions it wrote.

While shards that ask the server run, the flow holds the
Ollama host's slots of a Prefect global concurrency limit (named after the host), so several
flow runs together never exceed what the server serves. The flow holds them once rather than a
shard or a request at a time because each acquisition is a round trip to the Prefect API (about
0.15 s here, and a blocked acquirer sleeps for the limit's average occupancy before asking
again). Inside, at most two shards run at once, splitting the slots between them, so one
shard's tail overlaps the next one's start. The slots are held through ``tasks.llm_slots``,
which records the lease on disk so that the next run gives back the slots of a killed run
(Prefect's own context manager would leave them taken).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field, replace

from prefect import flow
from prefect.futures import as_completed
from prefect.utilities.annotations import quote

from reminders.outcome import Outcome, repaired, sort_out, to_repair
from reminders.prompts import repair_request
from reminders.summary import run_summary
from reminders.write import table_version
from schemas.reminders import RemindersConfig, RemindersResult
from storage.lance import versions_text
from tasks.llm_client import LLMRequest, ResponseCache
from tasks.llm_slots import hold_slots
from tasks.reminders import (
    ShardFailed,
    ShardStats,
    check_server_task,
    ensure_limit_task,
    free_dead_slots_task,
    generate_shard_task,
    lookup_task,
    merge_journal_task,
    plan_task,
    recover_task,
    shard_errors,
    shard_results_storage,
    slots_dir,
    validate_task,
    write_task,
)
from tasks.runtime import enforce_trust, logger, publish_markdown, publish_table, run_id
from tasks.validate import ValidationFailed


@dataclass
class Round:
    """What one fan-out did: stats of the shards that ran, failed shard indexes, this round's error
    rows, seconds spent generating, and shards served from Prefect's cache."""

    stats: list[ShardStats] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    errors: dict[str, dict] = field(default_factory=dict)
    seconds: float = 0.0
    shards: int = 0
    cached: int = 0


def fan_out(config: RemindersConfig, cache: ResponseCache, requests: list[LLMRequest], answered: set[str],
            backend: str | None, label: str) -> Round:
    """Run every shard of ``requests`` (fixed by prompt order, so a shard is the same on each run).

    A shard whose requests are all in the response cache is submitted as is: Prefect serves it
    from its persisted result (state ``Cached``), or, with no record, it runs and asks nothing. A
    shard with unanswered requests runs with ``refresh_cache`` (our cache is the authority: a
    stale Prefect record must not hide missing answers) and asks only those, holding the host's
    slots; each one's journal is merged as it finishes.
    """
    shards = [requests[i:i + config.shard_size] for i in range(0, len(requests), config.shard_size)]
    paths = [cache.journal_path(label, i) for i in range(len(shards))]
    shard_task = generate_shard_task.with_options(retries=config.shard_retries,
                                                  retry_delay_seconds=config.shard_retry_delay_s,
                                                  result_storage=shard_results_storage(config))
    need = [i for i, s in enumerate(shards) if any(r.request_hash not in answered for r in s)]
    out = Round(shards=len(shards))
    log = logger()

    def submit(i: int, workers: int, refresh: bool):
        done_here = frozenset(r.request_hash for r in shards[i] if r.request_hash in answered)
        return shard_task.with_options(task_run_name=f"shard-{label}-{i:05d}", refresh_cache=refresh).submit(
            i, quote(shards[i]), config, paths[i], workers, backend, quote(done_here))

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
        else:
            out.stats.append(result)

    quiet = {i: submit(i, 1, False) for i in sorted(set(range(len(shards))) - set(need))}
    if need:
        name, slots = ensure_limit_task(config)
        window = 2 if slots >= 2 and slots % 2 == 0 and len(need) > 1 else 1
        pending, running = deque(need), {}
        # A one-minute lease, renewed while this run lives; a killed run's slots are given back by
        # the next run on this data root (tasks.llm_slots), whatever server granted them.
        with hold_slots(slots_dir(config), name, slots):
            t0 = time.perf_counter()
            while pending or running:
                while pending and len(running) < window:
                    i = pending.popleft()
                    running[i] = submit(i, slots // window, True)
                done = next(as_completed(list(running.values())))
                i = next(k for k, f in running.items() if f is done)
                del running[i]
                settle(i, done)
                out.errors.update(shard_errors([paths[i]]))
                merge_journal_task(cache, paths[i])
                log.info("%s: %d/%d shards to ask done (%d failed)", label, len(need) - len(pending) - len(running),
                         len(need), len(out.failed))
            out.seconds = time.perf_counter() - t0
    for i, fut in quiet.items():
        settle(i, fut)
    log.info("%s: %d shards, %d asked the server, %d served from Prefect's cache", label, len(shards), len(need),
             out.cached)
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
    llm_before = table_version(config.lance_uri, "llm_responses")  # what this run merges is tagged with it
    recovered = recover_task(cache)
    free_dead_slots_task(config)
    prompts, plan_rejections, read_versions = plan_task(config)
    log = logger()
    log.info("reminders read %s", versions_text(read_versions))
    hashes = [p.request.request_hash for p in prompts]
    answers = lookup_task(cache, quote(hashes))
    cache_hits = len(answers)
    todo = [p.request for p in prompts if p.request.request_hash not in answers]
    log.info("%d prompts: %d cached, %d to generate (%d journal rows recovered)", len(prompts), cache_hits,
             len(todo), recovered)
    backend = check_server_task(config) if todo else None
    gen = fan_out(config, cache, [p.request for p in prompts], set(answers), backend, f"{run}-gen")
    if todo:
        answers = lookup_task(cache, quote(hashes))
    outcome = sort_out(prompts, answers, gen.errors)
    rounds = [gen]
    if config.repair and outcome.rejections:
        outcome, more = _repair(config, cache, prompts, outcome, backend, run)
        rounds.append(more)
    outcome = Outcome([], plan_rejections, []) + outcome
    failed_shards = [i for r in rounds for i in r.failed]

    report = validate_task(quote(outcome.rows))
    publish_markdown("reminders-validation", report.markdown(), "Great Expectations: reminders")
    if not report.success:
        raise ValidationFailed("reminders validation failed:\n" + report.markdown())
    written = write_task(config.lance_uri, quote(outcome), run, llm_before)
    result = run_summary(len(prompts) + len(plan_rejections), cache_hits, [s for r in rounds for s in r.stats],
                         outcome, time.perf_counter() - t0, sum(r.seconds for r in rounds), backend,
                         shards=sum(r.shards for r in rounds), shards_cached=sum(r.cached for r in rounds),
                         read_versions=read_versions, **written)
    if not result.reconciles():
        raise RuntimeError(f"reminders counts do not reconcile: {result.to_json()}")
    publish_table("reminders-run", result.artifact_rows(),
                  "Reminders run: prompts, cache hits, calls, retries, failures, quarantined, latency, tokens/s")
    log.info("reminders read %s; wrote %s (+%d inserted, %d updated)", versions_text(read_versions),
             versions_text(result.versions), result.inserted, result.updated)
    log.info("reminders: %s", result.flat())
    if failed_shards:
        raise ShardFailed(f"{len(outcome.failed)} prompts still failed in shards {sorted(failed_shards)}; "
                          "re-run `mmem reminders`: cached answers are not requested again", ShardStats(-1))
    return result


def _repair(config, cache, prompts, outcome, backend, run):
    """One bounded re-ask for each answer that broke the format; the re-ask's verdict is final."""
    by_id = {p.image_id: p for p in prompts}
    fixes = {i: repair_request(by_id[i].request, bad) for i, bad in to_repair(outcome).items()}
    fix_hashes = [f.request_hash for f in fixes.values()]
    fixed_answers = lookup_task(cache, quote(fix_hashes))
    todo = [f for f in fixes.values() if f.request_hash not in fixed_answers]
    if todo:
        backend = backend or check_server_task(config)
    more = fan_out(config, cache, list(fixes.values()), set(fixed_answers), backend, f"{run}-repair")
    if todo:
        fixed_answers = lookup_task(cache, quote(fix_hashes))
    second = sort_out([replace(by_id[i], request=fixes[i]) for i in fixes], fixed_answers, more.errors)
    return repaired(outcome, second), more
