"""Crash and resume of the evaluate stage: a run SIGKILLed part-way through its generations is run
again; the second run makes only the generations the first left undone and ends with the metric
rows of a run that was never interrupted.

The killed run is a real process (``python -c``, talking to this session's Prefect server). Its
variants: a tiny in-process LLaMA (every answer generated and merged before the kill) and a
served model (the teacher behind the Ollama-protocol server, which runs in this process with a
fixed latency and one request at a time, and records what it is asked). The kill comes after a
seeded number of served requests, so the killed run leaves answers merged, answers journaled but
not merged, and prompts never asked.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from prefect.settings import PREFECT_API_URL

from llmcalls.server import TeacherBackend, make_state, running_server
from storage.lance import connect, read, table_exists

REPO = Path(__file__).resolve().parents[2]
LATENCY_S = 0.1
ROW_COLUMNS = ("variant", "metric", "value", "n", "model_artifact", "dataset_version", "backbone", "split",
               "model", "prompt")
VARIANTS = """
[[variant]]
name = "tiny_base"
backend = "hf"
model = "tiny:llama"
prompt = "base"
max_new_tokens = 4

[[variant]]
name = "served_all_turns"
backend = "ollama"
model = "mmem-teacher"
host = "{host}"
prompt = "base"
turns = "all"
"""
RUN = """
import sys
from flows.evaluate import evaluate_flow
from schemas.evaluate import EvaluateConfig
evaluate_flow(EvaluateConfig.model_validate_json(sys.argv[1]))
"""


class AskedTeacher(TeacherBackend):
    """The teacher, keeping the last message of every request in the order it came."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: list[str] = []

    async def generate(self, messages, options):
        self.asked.append(messages[-1]["content"])
        return await super().generate(messages, options)


@pytest.fixture(scope="module")
def server():
    state = make_state(teacher=True, latency_s=LATENCY_S, parallel=1)
    state.backend = AskedTeacher()
    with running_server(state) as url:
        yield url, state.backend


def config(root: Path, url: str):
    from schemas.evaluate import EvaluateConfig

    variants = root / "variants.toml"
    variants.write_text(VARIANTS.replace("{host}", url))
    return EvaluateConfig(data_root=root, variants=variants, run_label="run", bertscore=False, concurrency=1,
                          shard_size=4, batch_size=2, device="cpu", timeout_s=30, max_attempts=2)


def settled(backend: AskedTeacher, start: int, quiet_s: float = 3 * LATENCY_S) -> list[str]:
    """What the server was asked since ``start``, once nothing new has come for ``quiet_s``."""
    n = -1
    while n != len(backend.asked):
        n = len(backend.asked)
        time.sleep(quiet_s)
    return backend.asked[start:]


def metric_rows(cfg) -> list[tuple]:
    """The run's rows, the data root left out of the ``model`` column (a checkpoint's folder)."""
    rows = read(connect(cfg.lance_uri), "evaluations").to_pylist()
    for r in rows:
        r["model"] = r["model"].replace(str(cfg.data_root), "<root>")
    return sorted(tuple(r[c] for c in ROW_COLUMNS) for r in rows)


def stored(cfg) -> set[str]:
    """Request hashes answered (ok) in ``llm_responses`` or in a journal a killed run left behind."""
    keys = set()
    db = connect(cfg.lance_uri)
    if table_exists(db, "llm_responses"):
        keys |= set(read(db, "llm_responses", where="status = 'ok'").column("request_hash").to_pylist())
    for path in (cfg.cache_dir / "llm_journal").glob("*.jsonl"):
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # cut short by the kill: that answer is not stored
                continue
            if row["status"] == "ok":
                keys.add(row["request_hash"])
    return keys


def responses(cfg) -> dict[str, dict]:
    return {r["request_hash"]: r for r in read(connect(cfg.lance_uri), "llm_responses").to_pylist()}


@pytest.fixture(scope="module")
def reference(ingested_root, tmp_path_factory, server):
    """An uninterrupted run: its metric rows, and each served prompt's request hash."""
    from flows.evaluate import evaluate_flow

    url, backend = server
    root = tmp_path_factory.mktemp("eval-ref") / "root"
    shutil.copytree(ingested_root, root, symlinks=True)
    cfg = config(root, url)
    start = len(backend.asked)
    evaluate_flow(cfg)
    asked = settled(backend, start)
    served = {r["prompt"][-1]["content"]: h for h, r in responses(cfg).items()
              if r["backend"] == "teacher"}
    assert Counter(asked) == Counter(list(served))  # every served prompt asked once, and they are distinct
    assert len(served) >= 40  # the demo's val dialogs x 10 turns: room for a kill part-way
    return metric_rows(cfg), served


@pytest.mark.parametrize("seed", [0, 1])
def test_killed_evaluation_resumes_with_only_the_missing_generations(seed, reference, server, ingested_root,
                                                                     tmp_path):
    from flows.evaluate import evaluate_flow

    ref_rows, hash_of = reference
    url, backend = server
    rng = random.Random(seed)
    root = tmp_path / "root"
    shutil.copytree(ingested_root, root, symlinks=True)
    cfg = config(root, url)

    # the killed run: SIGKILL after `after` served requests (the in-process variant is done by then)
    after = rng.randint(5, len(hash_of) // 2)
    env = {**os.environ, "PYTHONPATH": str(REPO), "PREFECT_API_URL": PREFECT_API_URL.value()}
    log = (tmp_path / "killed.log").open("w")
    start = len(backend.asked)
    proc = subprocess.Popen([sys.executable, "-c", RUN, cfg.model_dump_json()], cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while len(backend.asked) - start < after:
            assert proc.poll() is None, ("the run ended before the kill:\n"
                                         + (tmp_path / "killed.log").read_text())
            assert time.monotonic() < deadline, "the run made no served requests in 300 s"
            time.sleep(0.005)
        time.sleep(rng.uniform(0, LATENCY_S))
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        log.close()
    assert proc.returncode == -signal.SIGKILL
    killed_asked = settled(backend, start)

    done = stored(cfg)
    served_done = done & set(hash_of.values())
    assert 0 < len(served_done) < len(hash_of), "the kill left nothing to resume"
    assert not table_exists(connect(cfg.lance_uri), "evaluations")  # killed before any row was written
    before = responses(cfg)
    in_process = {h: r for h, r in before.items() if r["backend"].startswith("hf:")}
    assert in_process, "the in-process variant's answers should be in the cache before the kill"

    # the resumed run, in this process
    start = len(backend.asked)
    evaluate_flow(cfg)
    again = [hash_of[c] for c in settled(backend, start)]

    # only what was not stored is asked, each once; what was merged is not touched
    assert not set(again) & done
    assert Counter(again) == Counter(set(hash_of.values()) - done)
    # asked twice overall: only a request in flight at the kill (one at a time here)
    twice = {hash_of[c] for c in killed_asked} & set(again)
    assert len(twice) <= 1
    after_rows = responses(cfg)
    for h, row in before.items():  # merged answers are cache hits: not generated again, not rewritten
        assert after_rows[h]["created_at"] == row["created_at"]
        assert after_rows[h]["response"] == row["response"]
    assert set(after_rows) >= set(in_process) | set(hash_of.values())
    assert not list((cfg.cache_dir / "llm_journal").glob("*.jsonl"))  # the killed run's journals merged

    # and the same metric rows as the run that never stopped
    assert metric_rows(cfg) == ref_rows
