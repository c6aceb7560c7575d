"""Crash and resume (issue 9) of the reminders stage: SIGKILLed at random points, then re-run; see
test_crash_resume.py for the guarantee."""

from __future__ import annotations

import asyncio
import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from contextlib import suppress
from pathlib import Path

import pytest
from crash_support import CONCURRENCY, REPO, SEEDS, copy_root, tail, unique

from storage.lance import connect, read, table_exists

# --- reminders -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llm():
    """The teacher server, recording the conversation of every request it receives (in order).
    Clearing ``gate`` holds every request after it is recorded, so a run stays in its fan-out."""
    from llmcalls.server import TeacherBackend, make_state, running_server

    class Recording(TeacherBackend):
        def __init__(self) -> None:
            self.asked: list[str] = []
            self.gate = threading.Event()
            self.gate.set()

        async def generate(self, messages, options):
            self.asked.append(messages[-1]["content"])
            while not self.gate.is_set():
                await asyncio.sleep(0.01)
            return await super().generate(messages, options)

    state = make_state(teacher=True, latency_s=0.05, parallel=CONCURRENCY)
    state.backend = Recording()
    with running_server(state) as url:
        yield url, state.backend


def reminders_config(root: Path, url: str) -> dict:
    return {"data_root": str(root), "ollama_host": url, "model": "mmem-teacher", "shard_size": 4,
            "shard_retries": 0, "backoff_s": 0.01, "backoff_max_s": 0.05, "timeout_s": 10,
            "concurrency": CONCURRENCY}


def asked_since(backend, start: int, settle: float = 0.3) -> list[str]:
    """Requests received since index ``start``, once none has arrived for ``settle`` s."""
    n = -1
    while n != len(backend.asked):
        n = len(backend.asked)
        time.sleep(settle)
    return backend.asked[start:]


def active_slots(url: str) -> int:
    """Slots of the host's Prefect concurrency limit taken now."""
    from prefect.client.orchestration import get_client

    from tasks.runtime.slots import limit_name

    with get_client(sync_client=True) as client:
        return client.read_global_concurrency_limit_by_name(limit_name(url)).active_slots


def slot_records(cfg) -> list[Path]:
    from tasks.runtime.slots import slots_dir

    return sorted(slots_dir(cfg).glob("*.slots"))


@pytest.fixture(scope="module")
def reminders_reference(ingested_root, tmp_path_factory, llm):
    from flows.reminders import reminders_flow
    from reminders.prompts import build_prompts, load_inputs
    from schemas.reminders import RemindersConfig

    url, backend = llm
    root = copy_root(ingested_root, tmp_path_factory.mktemp("reminders-ref") / "root")
    cfg = RemindersConfig(**reminders_config(root, url))
    start = len(backend.asked)
    out = reminders_flow(cfg)
    prompts, _ = build_prompts(cfg, *load_inputs(cfg.lance_uri))
    hash_of = {p.request.messages[-1]["content"]: p.request.request_hash for p in prompts}
    assert len(hash_of) == len(prompts) == out["prompts"] == out["valid"]  # a conversation names its prompt
    assert Counter(asked_since(backend, start)) == Counter(list(hash_of))  # each prompt asked once
    db = connect(cfg.lance_uri)
    return out, hash_of, unique(read(db, "reminders"), ["image_id"]), unique(read(db, "llm_responses"),
                                                                              ["request_hash"])


def stored_answers(cfg) -> set[str]:
    """Keys answered (status ok) in ``llm_responses`` or in a journal left on disk."""
    db = connect(cfg.lance_uri)
    keys = set()
    if table_exists(db, "llm_responses"):
        keys |= set(read(db, "llm_responses", columns=["request_hash"], where="status = 'ok'")
                    .column("request_hash").to_pylist())
    for path in (cfg.cache_dir / "llm_journal").glob("*.jsonl"):
        for line in path.read_text().splitlines():
            with suppress(json.JSONDecodeError):  # a line cut short by the kill: that call was in flight
                row = json.loads(line)
                if row["status"] == "ok":
                    keys.add(row["request_hash"])
    return keys


def kill_reminders_run(runner, llm, root: Path, log: Path, after: int, delay: float) -> list[str]:
    """Start a reminders run, SIGKILL it after ``after`` requests + ``delay`` s; the requests it made."""
    url, backend = llm
    start = len(backend.asked)
    pid = runner.start("reminders", reminders_config(root, url), log)
    runner.kill_after(pid, log, lambda: len(backend.asked) - start >= after, delay)
    return asked_since(backend, start)


@pytest.mark.parametrize("seed", SEEDS)
def test_reminders_killed_at_a_random_point_resumes_without_asking_again(
    seed, runner, llm, reminders_reference, ingested_root, tmp_path
):
    from flows.reminders import reminders_flow
    from schemas.reminders import RemindersConfig

    ref, hash_of, ref_reminders, ref_responses = reminders_reference
    url, backend = llm
    rng = random.Random(seed)
    root = copy_root(ingested_root, tmp_path / "root")
    cfg = RemindersConfig(**reminders_config(root, url))
    killed = [
        hash_of[c]
        for c in kill_reminders_run(
            runner,
            llm,
            root,
            tmp_path / "killed.log",
            rng.randint(1, ref["prompts"] // 2),
            rng.uniform(0, 0.05),
        )
    ]
    stored = stored_answers(cfg)
    assert stored <= set(hash_of.values()) and len(stored) < ref["prompts"], "nothing left to resume"
    assert active_slots(url) == CONCURRENCY and len(slot_records(cfg)) == 1  # the killed run's

    start = len(backend.asked)
    out = reminders_flow(cfg)
    again = [hash_of[c] for c in asked_since(backend, start)]

    # no call for a key already answered; every other key asked exactly once
    assert not set(again) & stored
    assert Counter(again) == Counter(set(hash_of.values()) - stored)
    assert (out["cache_hits"], out["calls"]) == (len(stored), len(again))
    # asked twice: only the calls in flight at the kill, never more than the concurrency
    twice = set(killed) & set(again)
    assert twice == set(killed) - stored and len(twice) <= CONCURRENCY
    assert len(killed) + len(again) == ref["calls"] + len(twice)

    db = connect(cfg.lance_uri)
    assert unique(read(db, "reminders"), ["image_id"]).to_pylist() == ref_reminders.to_pylist()
    responses = unique(read(db, "llm_responses"), ["request_hash"])
    for col in ("request_hash", "response", "status", "model", "prompt", "backend"):
        assert responses.column(col).to_pylist() == ref_responses.column(col).to_pylist(), col
    assert read(db, "quarantine", where="stage = 'reminders'").num_rows == 0
    assert not list((cfg.cache_dir / "llm_journal").glob("*.jsonl"))  # every journal merged
    assert active_slots(url) == 0 and not slot_records(cfg)  # the killed run's slots given back, and its own


def test_a_killed_run_does_not_block_its_resume_on_llm_slots(runner, llm, reminders_reference, ingested_root,
                                                             tmp_path):
    """A run killed while it holds the Ollama host's slots (a Prefect global concurrency limit taken
    for the whole fan-out) must not stall the run that resumes it: nothing on this temporary test
    server ever revokes the killed run's lease, so only the resume can give its slots back."""
    from schemas.reminders import RemindersConfig

    url, _ = llm
    root = copy_root(ingested_root, tmp_path / "root")
    cfg = RemindersConfig(**reminders_config(root, url))
    kill_reminders_run(runner, llm, root, tmp_path / "killed.log", after=2, delay=0.0)
    assert active_slots(url) == CONCURRENCY and len(slot_records(cfg)) == 1
    log = tmp_path / "resume.log"
    pid = runner.start("reminders", reminders_config(root, url), log)
    try:
        end = runner.lines.get(timeout=20)  # an uninterrupted run here takes ~6 s
    except queue.Empty:
        os.kill(pid, signal.SIGKILL)
        runner.expect_killed(pid, log)
        pytest.fail("the resumed run still waits for the killed run's concurrency slots after 20 s")
    assert end == {"pid": pid, "exit": 0, "signal": None}, tail(log)
    assert active_slots(url) == 0 and not slot_records(cfg)


def test_a_live_runs_slots_are_never_freed_by_another_run(runner, llm, reminders_reference, ingested_root,
                                                          tmp_path):
    """Two runs on one data root at once: what a second run does first (give back the slots of
    dead runs) leaves the slots of the first, alive and mid-fan-out, alone; the first gives them
    back itself when it ends."""
    from schemas.reminders import RemindersConfig
    from tasks.runtime.slots import free_dead_slots

    url, backend = llm
    root = copy_root(ingested_root, tmp_path / "root")
    cfg = RemindersConfig(**reminders_config(root, url))
    log = tmp_path / "live.log"
    start = len(backend.asked)
    backend.gate.clear()  # the live run's requests wait, so it holds its slots until the gate opens
    try:
        pid = runner.start("reminders", reminders_config(root, url), log)
        deadline = time.monotonic() + 60
        while len(backend.asked) == start:
            assert runner.lines.empty(), f"the run ended before its first request:\n{tail(log)}"
            assert time.monotonic() < deadline, tail(log)
            time.sleep(0.01)
        assert active_slots(url) == CONCURRENCY and len(slot_records(cfg)) == 1
        assert free_dead_slots(cfg) == 0  # from this process, as a second run would
        assert active_slots(url) == CONCURRENCY and len(slot_records(cfg)) == 1
    finally:
        backend.gate.set()
    assert runner._next(60) == {"pid": pid, "exit": 0, "signal": None}, tail(log)
    assert active_slots(url) == 0 and not slot_records(cfg)


HOLD_SLOTS = """
import sys, time
from pathlib import Path
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from tasks.runtime.slots import hold_slots
with get_client(sync_client=True) as client:
    client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name="ollama-x", limit=3))
with hold_slots(Path(sys.argv[1]), "ollama-x", 2):
    print("held", flush=True)
    time.sleep(600)
"""

FREE_SLOTS = """
import json, sys
from pathlib import Path
from prefect.client.orchestration import get_client
from tasks.runtime.slots import free_dead
with get_client(sync_client=True) as client:
    before = client.read_global_concurrency_limit_by_name("ollama-x").active_slots
    freed = free_dead(Path(sys.argv[1]), client)
    after = client.read_global_concurrency_limit_by_name("ollama-x").active_slots
print(json.dumps({"before": before, "freed": freed, "after": after}))
"""


def test_slots_taken_through_a_temporary_server_are_given_back_after_a_kill(tmp_path):
    """`mmem reminders` without a Prefect server: each process starts its own temporary server on
    one database. A killed run's lease dies with its server, which revokes nothing, while the
    database still counts the slots; the next process (another temporary server, which has never
    heard of that lease) must give them back. About 30 s: two temporary servers start."""
    import psutil

    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PYTHONPATH=str(REPO), PREFECT_HOME=str(tmp_path / "prefect"),
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120")
    folder, out = tmp_path / "slots", tmp_path / "holder.log"
    with out.open("w") as log:
        holder = subprocess.Popen([sys.executable, "-c", HOLD_SLOTS, str(folder)], env=env, stdout=log,
                                  stderr=subprocess.STDOUT)
    server = []
    try:
        deadline = time.monotonic() + 120
        while "held" not in out.read_text():
            assert holder.poll() is None and time.monotonic() < deadline, tail(out)
            time.sleep(0.1)
        server = psutil.Process(holder.pid).children(recursive=True)  # its temporary server
        assert server, "the holder started no temporary server"
    finally:
        holder.kill()
        holder.wait()
        for proc in server:  # a SIGKILLed parent leaves its server running: stop it as its kill would
            with suppress(psutil.NoSuchProcess):
                proc.terminate()
                proc.wait(10)
    assert len(list(folder.glob("*.slots"))) == 1

    done = subprocess.run([sys.executable, "-c", FREE_SLOTS, str(folder)], check=False, env=env,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-4000:]
    assert json.loads(done.stdout.splitlines()[-1]) == {"before": 2, "freed": 1, "after": 0}
    assert not list(folder.iterdir())
