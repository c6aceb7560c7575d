"""Reminders steps: dialogs -> prompts -> (cached) LLM calls -> validated ``reminders`` rows.

Pure functions do the work; the ``@task`` wrappers at the bottom add orchestration. Every prompt
ends in exactly one of three states, and the counts reconcile:

- valid: a row in ``reminders``;
- quarantined: a ``quarantine`` row with its reason (bad format, a 4xx, a changed image);
- failed: the call still failed after its retries; the shard failed as a task, the finished
  calls are in the cache, and a re-run makes only the missing calls.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
import urllib.parse
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict

from schemas.expectations import reminders_suite
from schemas.quarantine import Reason, Rejection
from schemas.reminders import (
    ANSWER_CHARS,
    ANY_TAG_RE,
    ECHO_RE,
    REMINDER_CHARS,
    REMINDER_RE,
    REMINDERS,
    RemindersConfig,
    load_prompt_data,
)
from storage.lance import connect, merge, open_table, read, resolve_versions, table_exists, tag_run
from storage.paths import stored_root as stored_root_of
from storage.quarantine import quarantine
from tasks.llm_client import (
    ERROR,
    OK,
    REJECTED,
    ImageRef,
    Journal,
    LLMClient,
    LLMRequest,
    ResponseCache,
    read_journal,
)
from tasks.llm_slots import free_dead
from tasks.runtime import CheckedResults, Progress, checked_storage, logger
from tasks.secrets import HostAuth, host_auth
from tasks.validate import ValidationReport, validate

STAGE = "reminders"
INPUTS = ("dialogs", "turns", "images")
# Bump when ShardStats' layout changes: stats persisted by older code must not be served from cache.
# 2: JSON results (version 1 wrote pickles: their keys are never looked up again).
SHARD_RESULT_VERSION = 2
REPAIR_TEXT = (
    "Your answer did not follow the format. Answer again: one <reminder>...</reminder> tag that summarises "
    "the conversation, then exactly one sentence that answers the last question, and nothing else."
)


# --- prompts ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prompt:
    """One dialog's request, with what the ``reminders`` row needs besides the answer."""

    image_id: int
    split: str
    conversation: str
    target_answer: str
    image_url: str
    request: LLMRequest


def conversation_text(qa: list[tuple[str, str]]) -> tuple[str, str]:
    """The report's format: ``Q:``/``A:`` lines with the LAST answer dropped; returns (text, dropped)."""
    lines = []
    for i, (q, a) in enumerate(qa):
        lines.append(f"Q: {q}")
        if i < len(qa) - 1:
            lines.append(f"A: {a}")
    return "\n".join(lines), qa[-1][1] if qa else ""


def system_prompt(instructions: str, examples: list[dict[str, str]]) -> str:
    shots = "\n\n".join(f"Example {i}:\nconversation:\n{ex['conversation']}\nanswer:\n{ex['response']}"
                        for i, ex in enumerate(examples, 1))
    return f"{instructions}\n\n{shots}" if shots else instructions


def _columns(table: pa.Table, names: list[str]) -> list[list]:
    """Columns as Python lists: far cheaper than a list of row dicts at VisDial scale."""
    return [table.column(n).to_pylist() for n in names]


def build_prompts(config: RemindersConfig, dialogs: pa.Table, turns: pa.Table,
                  images: pa.Table) -> tuple[list[Prompt], list[Rejection]]:
    """One prompt per dialog (in ``image_id`` order, ``limit`` first), the image by reference."""
    instructions, examples = load_prompt_data(config.examples)
    system = {"role": "system", "content": system_prompt(instructions, examples)}
    if config.splits:
        dialogs = dialogs.filter(pc.is_in(dialogs.column("split"), pa.array(config.splits)))
    dialogs = dialogs.sort_by("image_id")
    if config.limit:
        dialogs = dialogs.slice(0, config.limit)
    ids = dialogs.column("image_id")
    turns = turns.filter(pc.is_in(turns.column("image_id"), ids)).sort_by([("image_id", "ascending"),
                                                                           ("turn", "ascending")])
    qa: dict[int, list[tuple[str, str]]] = {}
    for image_id, q, a in zip(*_columns(turns, ["image_id", "question", "answer"]), strict=True):
        qa.setdefault(image_id, []).append((q, a))
    images = images.filter(pc.is_in(images.column("image_id"), ids))
    roots = _columns(images, ["root"])[0] if "root" in images.column_names else [None] * len(images)
    where = {i: (p, h, r) for i, p, h, r in zip(*_columns(images, ["image_id", "path", "sha256"]), roots, strict=True)}
    prompts, rejections, absent_roots = [], [], {}
    for image_id, split in zip(*_columns(dialogs, ["image_id", "split"]), strict=True):
        rel, sha, stored_root = where.get(image_id, (None, None, None))
        root = config.image_roots.get(split) or stored_root_of(stored_root, config.data_root)
        path = os.path.abspath(os.path.join(root, rel)) if rel and root else None
        if root and not os.path.isdir(root):
            absent_roots.setdefault(str(root), split)
            continue
        if path is None or not os.path.isfile(path):
            rejections.append(Rejection(str(image_id), Reason.IMAGE_MISSING, {"image_id": image_id, "split": split},
                                        f"no image file for {image_id} (root {root}); set image_roots"))
            continue
        conv, target = conversation_text(qa.get(image_id, []))
        if not conv:
            rejections.append(Rejection(str(image_id), Reason.EMPTY_TEXT, {"image_id": image_id, "split": split},
                                        "dialog has no turns"))
            continue
        user = {"role": "user", "content": f"conversation:\n{conv}", "images": (ImageRef(path, sha),)}
        prompts.append(Prompt(image_id, split, conv, target, "file://" + urllib.parse.quote(path),
                              LLMRequest(config.model, (system, user), config.options)))
    if absent_roots:
        raise ImageRootMissing(absent_roots)
    return prompts, rejections


class ImageRootMissing(FileNotFoundError):
    """A whole image folder is gone (the data root or the images moved): the run stops before it
    writes, rather than quarantine every dialog as ``image_missing`` and drop their reminders."""

    def __init__(self, roots: dict[str, str]) -> None:
        example = json.dumps({split: "/new/folder" for split in dict.fromkeys(roots.values())})
        super().__init__(f"image folder(s) {sorted(roots)} do not exist (moved?); nothing was written. Point "
                         f"the reminders config's image_roots at them, e.g. MMEM_REMINDERS_IMAGE_ROOTS='{example}'")


def repair_request(req: LLMRequest, bad_answer: str) -> LLMRequest:
    """The one bounded re-ask: the same conversation, the invalid answer, and the format again."""
    return LLMRequest(req.model, req.messages + ({"role": "assistant", "content": bad_answer},
                                                 {"role": "user", "content": REPAIR_TEXT}), req.options)


def input_versions(db, pins: dict[str, int | str] | None = None) -> dict[str, int]:
    """The version of each input table a run reads: the pinned one, else the latest now."""
    return resolve_versions(db, INPUTS, pins)


def load_inputs(lance_uri: str, versions: dict[str, int] | None = None) -> tuple[pa.Table, pa.Table, pa.Table]:
    """``dialogs``, ``turns``, ``images`` at ``versions`` (default: the latest)."""
    db = connect(lance_uri)
    missing = [n for n in INPUTS if not table_exists(db, n)]
    if missing:
        raise FileNotFoundError(f"tables {missing} are missing under {lance_uri}: run `mmem ingest` first")
    v = versions or {}
    return (read(db, "dialogs", columns=["image_id", "split"], version=v.get("dialogs")),
            read(db, "turns", columns=["image_id", "turn", "question", "answer"], version=v.get("turns")),
            read(db, "images", version=v.get("images")))


# --- parsing and checking an answer ----------------------------------------------------------


def parse_response(text: str) -> tuple[str, str] | tuple[Reason, str]:
    """(reminder, final_answer), or (reason, detail) when the answer breaks the format."""
    tags = ANY_TAG_RE.findall(text)
    blocks = REMINDER_RE.findall(text)
    if not blocks:
        return Reason.NO_REMINDER, "no <reminder>...</reminder> block"
    if len(blocks) > 1 or len(tags) != 2:
        return Reason.MULTIPLE_REMINDERS, f"{len(blocks)} blocks, {len(tags)} tags"
    reminder = blocks[0].strip()
    final = text[REMINDER_RE.search(text).end():].strip()
    if not reminder:
        return Reason.EMPTY_REMINDER, "the reminder is empty"
    if not final:
        return Reason.EMPTY_ANSWER, "no final answer after the reminder"
    for what, value, (lo, hi) in (("reminder", reminder, REMINDER_CHARS), ("final answer", final, ANSWER_CHARS)):
        if len(value) > hi:
            return Reason.TOO_LONG, f"{what} has {len(value)} characters (max {hi})"
        if len(value) < lo:
            return Reason.TOO_SHORT, f"{what} has {len(value)} characters (min {lo})"
    if ECHO_RE.search(reminder) or ECHO_RE.search(final):
        return Reason.ECHOED_DIALOG, "the answer copies Q:/A: lines"
    return reminder, final


def check(prompt: Prompt, answer: dict) -> dict | Rejection:
    """The ``reminders`` row for a cached answer, or why it is rejected."""
    text = (answer.get("response") or "").strip()
    parsed = parse_response(text)
    if isinstance(parsed[0], Reason):
        record = {"image_id": prompt.image_id, "request_hash": answer["request_hash"], "response": text}
        return Rejection(str(prompt.image_id), parsed[0], record, parsed[1])
    return {"image_id": prompt.image_id, "split": prompt.split, "image_url": prompt.image_url,
            "conversation": prompt.conversation, "response": text, "reminder": parsed[0], "final_answer": parsed[1],
            "target_answer": prompt.target_answer, "request_hash": answer["request_hash"],
            "model": answer.get("model"), "backend": answer.get("backend")}


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


# --- outcomes --------------------------------------------------------------------------------


@dataclass
class Outcome:
    rows: list[dict]
    rejections: list[Rejection]
    failed: list[int]  # image ids still retryable

    def counts(self) -> dict[str, int]:
        """Quarantined prompts per reason."""
        return {f"quarantined_{k}": v for k, v in sorted(Counter(str(r.reason) for r in self.rejections).items())}


def sort_out(prompts: list[Prompt], answers: dict[str, dict], errors: dict[str, dict]) -> Outcome:
    """Each prompt -> valid row, rejection, or still failed; from the cache and the round's errors."""
    out = Outcome([], [], [])
    for p in prompts:
        rh = p.request.request_hash
        if rh in answers:
            res = check(p, answers[rh])
            (out.rejections if isinstance(res, Rejection) else out.rows).append(res)
        elif errors.get(rh, {}).get("status") == REJECTED:
            out.rejections.append(Rejection(str(p.image_id), Reason.LLM_ERROR,
                                            {"image_id": p.image_id, "request_hash": rh}, errors[rh].get("error") or ""))
        else:
            out.failed.append(p.image_id)
    return out


def shard_errors(paths: list[Path]) -> dict[str, dict]:
    """Error rows of this round's journals (read before they are merged)."""
    rows = {}
    for path in paths:
        for r in read_journal(path):  # signed rows only: a planted error row quarantines nothing
            if r["status"] != OK:
                rows[r["request_hash"]] = r
    return rows


def validate_rows(rows: list[dict]) -> ValidationReport:
    return validate(pa.Table.from_pylist(rows, schema=REMINDERS.schema), reminders_suite(), table_name=STAGE)


def table_version(lance_uri: str, name: str) -> int | None:
    """The table's latest version now (None where it does not exist yet)."""
    db = connect(lance_uri)
    return open_table(db, name).version if table_exists(db, name) else None


def write(lance_uri: str, outcome: Outcome, run: str, llm_before: int | None = None) -> dict:
    """Merge valid rows, drop stale rows of dialogs now quarantined, quarantine the rejects; tag what
    this run wrote with ``reminders-<run>`` (``llm_responses`` too when it moved past ``llm_before``,
    its version when the run started)."""
    db = connect(lance_uri)
    res = merge(db, "reminders", pa.Table.from_pylist(outcome.rows, schema=REMINDERS.schema))
    bad = {int(r.key) for r in outcome.rejections if r.key.isdigit()}
    stale = sorted(bad & set(read(db, "reminders", columns=["image_id"]).column("image_id").to_pylist()))
    if stale:  # a dialog valid before and invalid now (another model, other options) loses its old row
        open_table(db, "reminders").delete(f"image_id IN ({', '.join(map(str, stale))})")
    q = quarantine(db, STAGE, outcome.rejections, run)
    versions = {"reminders": open_table(db, "reminders").version, "quarantine": q.version,
                "llm_responses": open_table(db, "llm_responses").version}
    label = f"{STAGE}-{run}"
    if res.inserted or res.updated or stale:
        tag_run(db, "reminders", label, versions["reminders"])
    if versions["llm_responses"] != llm_before:  # this run's calls were merged
        tag_run(db, "llm_responses", label, versions["llm_responses"])
    return {"versions": versions, "inserted": res.inserted, "updated": res.updated}


def run_summary(prompts: int, cache_hits: int, shards: list[ShardStats], outcome: Outcome, wall_s: float,
                gen_s: float, backend: str | None) -> dict:
    """The run's artifact: what was asked, what came from the cache, and how fast it went."""
    lat = np.array([x for s in shards for x in s.latencies]) if shards else np.array([])
    tokens = sum(s.completion_tokens for s in shards)
    calls = sum(s.requests - s.skipped for s in shards)
    return {
        "prompts": prompts, "cache_hits": cache_hits, "calls": calls,
        "retries": sum(s.retries for s in shards), "failures": len(outcome.failed),
        "quarantined": len(outcome.rejections), "valid": len(outcome.rows),
        "latency_p50_s": round(float(np.percentile(lat, 50)), 4) if lat.size else None,
        "latency_p95_s": round(float(np.percentile(lat, 95)), 4) if lat.size else None,
        "tokens_per_s": round(tokens / gen_s, 1) if gen_s else None,
        "requests_per_s": round(calls / gen_s, 1) if gen_s else None,
        "wall_s": round(wall_s, 2), "backend": backend,
    }


# --- export ----------------------------------------------------------------------------------


def read_reminders(lance_uri: str, version: int | str | None = None) -> pa.Table:
    db = connect(lance_uri)
    if not table_exists(db, "reminders"):
        raise FileNotFoundError(f"no reminders table under {lance_uri}: run `mmem reminders` first")
    return read(db, "reminders", version=version)


def export_report_json(table: pa.Table, out: Path) -> int:
    """The report's sample format: a JSON list of ``image_id, image_url, conversation, response``."""
    rows = table.select(["image_id", "image_url", "conversation", "response"]).to_pylist()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
    return len(rows)


def export_hf(table: pa.Table, out: Path) -> dict[str, int]:
    """A ``datasets.DatasetDict`` (one split per dialog split), loadable with ``load_from_disk``."""
    import datasets

    splits = sorted(set(table.column("split").to_pylist())) or ["train"]
    dd = datasets.DatasetDict({
        s: datasets.Dataset(table.filter(pa.compute.equal(table.column("split"), s))) for s in splits
    })
    dd.save_to_disk(str(out))
    return {s: len(d) for s, d in dd.items()}


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


def plan(config: RemindersConfig) -> tuple[list[Prompt], list[Rejection], dict[str, int]]:
    """The prompts, the dialogs rejected before asking, and the input table versions read."""
    db = connect(config.lance_uri)
    missing = [n for n in INPUTS if not table_exists(db, n)]
    if missing:
        raise FileNotFoundError(f"tables {missing} are missing under {config.lance_uri}: run `mmem ingest` first")
    versions = input_versions(db, config.table_versions)
    return (*build_prompts(config, *load_inputs(config.lance_uri, versions)), versions)


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
