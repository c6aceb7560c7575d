"""Crash and resume (issue 9): the embed and reminders stages are SIGKILLed at random points, then re-run.

Guarantee: after a run is killed and the stage is run again, its tables equal those of a run that
never stopped (same keys, no duplicate, no missing row, equal values), and the resumed run does
not redo finished work: embed computes only the shards that were neither merged nor persisted,
reminders asks the LLM only for prompts whose answer was neither merged nor journaled (the calls
in flight at the kill, at most ``concurrency`` of them, are the only ones made twice).

The killed runs are real processes (forked by ``_stage_runner.py``, talking to this session's
Prefect server); the kill point is drawn from the seed: after k finished shards / k received LLM
requests plus a short random delay. The LLM server runs in this process, so its request log
survives the kills.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from contextlib import suppress
from pathlib import Path

import numpy as np
import pytest
import torch
from prefect.settings import PREFECT_API_URL

from storage.lance import connect, read, table_exists

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SEEDS = (0, 1, 2)
CONCURRENCY = 4


class Runner:
    """The fork server of ``_stage_runner.py``: starts a stage run, kills it when told."""

    def __init__(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO), "PREFECT_API_URL": PREFECT_API_URL.value()}
        self.proc = subprocess.Popen([sys.executable, str(HERE / "_stage_runner.py")], cwd=REPO, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.lines: queue.Queue = queue.Queue()
        self.ready = False  # its imports overlap with the reference runs; the first start waits for them
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(json.loads(line))
        self.lines.put(None)

    def _next(self, timeout: float) -> dict:
        msg = self.lines.get(timeout=timeout)
        assert msg is not None, "the stage runner died"
        return msg

    def start(self, stage: str, config: dict, log: Path) -> int:
        if not self.ready:
            assert self._next(180) == {"ready": True}
            self.ready = True
        job = {"stage": stage, "config": config, "threads": torch.get_num_threads(), "log": str(log)}
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        return self._next(60)["pid"]

    def kill_after(self, pid: int, log: Path, progressed, delay: float, timeout: float = 120) -> None:
        """SIGKILL the run ``delay`` s after ``progressed()`` turns true; fail if it ended by itself first."""
        deadline = time.monotonic() + timeout
        while not progressed():
            assert self.lines.empty(), f"the run ended before doing the work to kill it in:\n{tail(log)}"
            assert time.monotonic() < deadline, f"no progress in {timeout} s:\n{tail(log)}"
            time.sleep(0.005)
        time.sleep(delay)
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        self.expect_killed(pid, log)

    def expect_killed(self, pid: int, log: Path) -> None:
        end = self._next(60)
        assert end == {"pid": pid, "exit": None, "signal": signal.SIGKILL}, f"{end}: not killed mid-run\n{tail(log)}"

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def tail(log: Path, n: int = 4000) -> str:
    return log.read_text(errors="replace")[-n:] if log.exists() else "(no log)"


@pytest.fixture(scope="module")
def runner():
    r = Runner()
    yield r
    r.close()


def copy_root(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def unique(table, key: list[str]):
    """The table sorted by ``key``, after checking that no key occurs twice."""
    assert len(table.group_by(key).aggregate([])) == table.num_rows, f"duplicate keys {key}"
    return table.sort_by([(k, "ascending") for k in key])


# --- embed -----------------------------------------------------------------------------------

EMBED_TABLES = {"image_embeddings": ["image_id"], "text_embeddings": ["text_hash"]}


def embed_config(root: Path) -> dict:
    """Shards of 8 rows (24 shards on the demo), merged two at a time: a kill finds shards merged,
    shards persisted but not merged, and shards not started."""
    return {"data_root": str(root), "tiny": True, "device": "cpu", "shard_rows": 8, "decode_workers": 1,
            "merge_rows": 16, "concurrent_shards": 2, "index_min_rows": 10**6}


@pytest.fixture(scope="module")
def embed_reference(ingested_root, tmp_path_factory):
    from flows.embed import embed_flow
    from schemas.embed import EmbedConfig

    root = copy_root(ingested_root, tmp_path_factory.mktemp("embed-ref") / "root")
    counts = embed_flow(EmbedConfig(**embed_config(root)))
    assert counts["shards_computed"] == counts["shards"] > 10
    db = connect(root / "lance")
    return counts, {name: unique(read(db, name), key) for name, key in EMBED_TABLES.items()}


def shard_state(cfg) -> list[tuple[str, bool, bool]]:
    """Per planned shard: (content key, all its rows in the table, a readable persisted result)."""
    from prefect.results import ResultRecord

    from tasks.embed import ModelArgs, image_items, plan_shards, text_items

    db = connect(cfg.lance_uri)
    fingerprint = ModelArgs.from_config(cfg).fingerprint
    out = []
    for kind, items, name, key in (("image", image_items(db, cfg), "image_embeddings", "image_id"),
                                   ("text", text_items(db, cfg), "text_embeddings", "text_hash")):
        have = set(read(db, name, columns=[key]).column(key).to_pylist()) if table_exists(db, name) else set()
        for s in plan_shards(kind, items, cfg.shard_rows, fingerprint):
            path = cfg.results_dir / s.key
            readable = False
            if path.is_file():
                with suppress(Exception):  # a file cut short by the kill is a cache miss, as for Prefect
                    ResultRecord.deserialize(path.read_bytes())
                    readable = True
            out.append((s.key, set(s.rows.column(key).to_pylist()) <= have, readable))
    return out


@pytest.mark.parametrize("seed", SEEDS)
def test_embed_killed_at_a_random_point_resumes_to_the_uninterrupted_tables(seed, runner, embed_reference,
                                                                            ingested_root, tmp_path):
    from flows.embed import embed_flow
    from schemas.embed import EmbedConfig

    ref_counts, ref_tables = embed_reference
    rng = random.Random(seed)
    root = copy_root(ingested_root, tmp_path / "root")
    cfg = EmbedConfig(**embed_config(root))
    log = tmp_path / "killed.log"
    after = rng.randint(1, 2 * ref_counts["shards"] // 3)  # finished shards before the kill
    pid = runner.start("embed", embed_config(root), log)
    runner.kill_after(pid, log, lambda: cfg.results_dir.is_dir() and len(os.listdir(cfg.results_dir)) >= after,
                      rng.uniform(0, 0.15))

    state = shard_state(cfg)
    up_to_date = sum(merged for _, merged, _ in state)
    cached = sum(ok and not merged for _, merged, ok in state)
    assert up_to_date + cached < len(state), "the kill came after the last shard: nothing left to resume"
    persisted = {k: (cfg.results_dir / k).stat().st_mtime_ns for k, _, ok in state if ok}
    db = connect(cfg.lance_uri)
    before = {n: read(db, n, columns=[k[0]]).num_rows if table_exists(db, n) else 0 for n, k in EMBED_TABLES.items()}

    out = embed_flow(cfg)

    # only the shards neither merged nor persisted were computed again
    assert (out["shards_up_to_date"], out["shards_cached"], out["shards_computed"]) == (
        up_to_date, cached, len(state) - up_to_date - cached)
    assert {k: (cfg.results_dir / k).stat().st_mtime_ns for k in persisted} == persisted  # not rewritten
    db = connect(cfg.lance_uri)
    assert read(db, "quarantine", where="stage = 'embed'").num_rows == 0
    for name, key in EMBED_TABLES.items():
        got, ref = unique(read(db, name), key), ref_tables[name]
        assert out[f"{name}_inserted"] == ref.num_rows - before[name] and out[f"{name}_updated"] == 0
        assert got.num_rows == ref.num_rows
        for col in got.column_names:
            if col == "vector":
                np.testing.assert_allclose(np.stack(got.column(col).to_numpy(zero_copy_only=False)),
                                           np.stack(ref.column(col).to_numpy(zero_copy_only=False)), atol=1e-5)
            else:
                assert got.column(col).to_pylist() == ref.column(col).to_pylist(), (name, col)


# --- reminders -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llm():
    """The teacher server, recording the conversation of every request it receives (in order).
    Clearing ``gate`` holds every request after it is recorded, so a run stays in its fan-out."""
    from training.llm_server import TeacherBackend, make_state, running_server

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

    from tasks.reminders import limit_name

    with get_client(sync_client=True) as client:
        return client.read_global_concurrency_limit_by_name(limit_name(url)).active_slots


def slot_records(cfg) -> list[Path]:
    from tasks.reminders import slots_dir

    return sorted(slots_dir(cfg).glob("*.slots"))


@pytest.fixture(scope="module")
def reminders_reference(ingested_root, tmp_path_factory, llm):
    from flows.reminders import reminders_flow
    from schemas.reminders import RemindersConfig
    from tasks.reminders import build_prompts, load_inputs

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
def test_reminders_killed_at_a_random_point_resumes_without_asking_again(seed, runner, llm, reminders_reference,
                                                                         ingested_root, tmp_path):
    from flows.reminders import reminders_flow
    from schemas.reminders import RemindersConfig

    ref, hash_of, ref_reminders, ref_responses = reminders_reference
    url, backend = llm
    rng = random.Random(seed)
    root = copy_root(ingested_root, tmp_path / "root")
    cfg = RemindersConfig(**reminders_config(root, url))
    killed = [hash_of[c] for c in kill_reminders_run(runner, llm, root, tmp_path / "killed.log",
                                                     rng.randint(1, ref["prompts"] // 2), rng.uniform(0, 0.05))]
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
    from tasks.reminders import free_dead_slots

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
from tasks.llm_slots import hold_slots
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
from tasks.llm_slots import free_dead
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
