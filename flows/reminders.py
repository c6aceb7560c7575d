"""The reminders flow: every cleaned dialog -> one ``<reminder>`` self-reflection sample.

Composition only. Shards of uncached prompts are tasks; while they run, the flow holds the
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
from dataclasses import replace

from prefect import flow
from prefect.futures import as_completed
from prefect.utilities.annotations import quote

from schemas.reminders import RemindersConfig
from tasks.llm_client import LLMRequest, ResponseCache
from tasks.llm_slots import hold_slots
from tasks.reminders import (
    Outcome,
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
    repair_request,
    run_summary,
    shard_errors,
    slots_dir,
    sort_out,
    validate_task,
    write_task,
)
from tasks.runtime import logger, publish_markdown, publish_table, run_id
from tasks.validate import ValidationFailed


def fan_out(config: RemindersConfig, cache: ResponseCache, requests: list[LLMRequest], backend: str,
            label: str) -> tuple[list[ShardStats], list[int], dict[str, dict], float]:
    """Run the shards; merge each one's journal as it finishes.
    Returns (stats, failed shards, errors, seconds spent generating)."""
    name, slots = ensure_limit_task(config)
    shards = [requests[i:i + config.shard_size] for i in range(0, len(requests), config.shard_size)]
    window = 2 if slots >= 2 and slots % 2 == 0 and len(shards) > 1 else 1
    paths = [cache.journal_path(label, i) for i in range(len(shards))]
    shard_task = generate_shard_task.with_options(retries=config.shard_retries,
                                                  retry_delay_seconds=config.shard_retry_delay_s)
    stats, failed, errors = [], [], {}
    pending, running = deque(range(len(shards))), {}
    log = logger()
    # A one-minute lease, renewed while this run lives; a killed run's slots are given back by
    # the next run on this data root (tasks.llm_slots), whatever server granted them.
    with hold_slots(slots_dir(config), name, slots):
        t0 = time.perf_counter()
        while pending or running:
            while pending and len(running) < window:
                i = pending.popleft()
                running[i] = shard_task.with_options(task_run_name=f"shard-{label}-{i:05d}").submit(
                    i, quote(shards[i]), config, paths[i], slots // window, backend)
            done = next(as_completed(list(running.values())))
            i = next(k for k, f in running.items() if f is done)
            del running[i]
            result = done.result(raise_on_failure=False)
            if isinstance(result, ShardFailed):
                failed.append(i)
                stats.append(result.stats)
            elif isinstance(result, BaseException):
                failed.append(i)
                log.error("shard %d failed: %s", i, result)
            else:
                stats.append(result)
            errors.update(shard_errors([paths[i]]))
            merge_journal_task(cache, paths[i])
            log.info("%s: %d/%d shards done (%d failed)", label, len(shards) - len(pending) - len(running),
                     len(shards), len(failed))
        wall = time.perf_counter() - t0
    return stats, failed, errors, wall


@flow(name="reminders", log_prints=True)
def reminders_flow(config: RemindersConfig) -> dict:
    """Generate, cache, validate and write ``<reminder>`` samples for every dialog in ``config``.

    Returns the run summary; raises (after writing everything it has) when a shard failed, so a
    re-run, which makes no call for a cached key, finishes the job.
    """
    t0 = time.perf_counter()
    run = run_id()
    cache = ResponseCache(config.lance_uri, config.cache_dir / "llm_journal")
    recovered = recover_task(cache)
    free_dead_slots_task(config)
    prompts, plan_rejections = plan_task(config)
    hashes = [p.request.request_hash for p in prompts]
    answers = lookup_task(cache, quote(hashes))
    cache_hits = len(answers)
    todo = [p.request for p in prompts if p.request.request_hash not in answers]
    logger().info("%d prompts: %d cached, %d to generate (%d journal rows recovered)", len(prompts), cache_hits,
                  len(todo), recovered)
    stats, failed_shards, errors, backend, gen_s = [], [], {}, None, 0.0
    if todo:
        backend = check_server_task(config)
        stats, failed_shards, errors, gen_s = fan_out(config, cache, todo, backend, f"{run}-gen")
        answers = lookup_task(cache, quote(hashes))
    outcome = sort_out(prompts, answers, errors)
    if config.repair and outcome.rejections:
        outcome, more = _repair(config, cache, prompts, answers, outcome, backend, run)
        stats += more[0]
        failed_shards += more[1]
        gen_s += more[3]
    outcome = Outcome(outcome.rows, plan_rejections + outcome.rejections, outcome.failed)

    report = validate_task(quote(outcome.rows))
    publish_markdown("reminders-validation", report.markdown(), "Great Expectations: reminders")
    if not report.success:
        raise ValidationFailed("reminders validation failed:\n" + report.markdown())
    written = write_task(config.lance_uri, quote(outcome), run)
    summary = run_summary(len(prompts) + len(plan_rejections), cache_hits, stats, outcome,
                          time.perf_counter() - t0, gen_s, backend)
    summary.update(outcome.counts())
    summary.update(written)  # "versions": the table versions this run wrote (SFT trains on that one)
    if summary["valid"] + summary["quarantined"] + summary["failures"] != summary["prompts"]:
        raise RuntimeError(f"reminders counts do not reconcile: {summary}")
    flat = {**{k: v for k, v in summary.items() if k != "versions"},
            **{f"version_{k}": v for k, v in summary["versions"].items()}}
    publish_table("reminders-run", [{"count": k, "value": v} for k, v in flat.items()],
                  "Reminders run: prompts, cache hits, calls, retries, failures, quarantined, latency, tokens/s")
    logger().info("reminders: %s", summary)
    if failed_shards:
        raise ShardFailed(f"{len(outcome.failed)} prompts still failed in shards {sorted(failed_shards)}; "
                          "re-run `mmem reminders`: cached answers are not requested again", ShardStats(-1))
    return summary


def _repair(config, cache, prompts, answers, outcome, backend, run):
    """One bounded re-ask for each answer that broke the format; the re-ask's verdict is final."""
    by_id = {p.image_id: p for p in prompts}
    bad = {int(r.key): r for r in outcome.rejections if r.record.get("response")}
    fixes = {i: repair_request(by_id[i].request, r.record["response"]) for i, r in bad.items()}
    fixed_answers = lookup_task(cache, quote([f.request_hash for f in fixes.values()]))
    todo = [f for f in fixes.values() if f.request_hash not in fixed_answers]
    more = ([], [], {}, 0.0)
    if todo:
        backend = backend or check_server_task(config)
        more = fan_out(config, cache, todo, backend, f"{run}-repair")
        fixed_answers = lookup_task(cache, quote([f.request_hash for f in fixes.values()]))
    repaired = [replace(by_id[i], request=fixes[i]) for i in fixes]
    second = sort_out(repaired, fixed_answers, more[2])
    kept = [r for r in outcome.rejections if int(r.key) not in bad]
    return Outcome(outcome.rows + second.rows, kept + second.rejections, outcome.failed + second.failed), more
