"""The parent flow: a poisoned record fails one shard; after the fix, a re-run redoes only it (every
other shard a Prefect cache hit), and each stage reads the table versions the one before wrote."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
from collections import Counter

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterParentFlowRunId,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.client.schemas.sorting import FlowRunSort, TaskRunSort
from prefect.logging.handlers import APILogHandler

from flows.pipeline import pipeline_flow
from llmcalls.server import Faults, make_state, running_server
from schemas.pipeline import PipelineConfig, SplitInput
from storage.lance import connect

POISON = "POISONED-RECORD"
EMBED_SHARD = re.compile(r"embed-(image|text)-\d+$")  # embed_shard_task's task_run_name
REMINDER_SHARD = re.compile(r"shard-.+-gen-(\d+)$")  # generate_shard_task's task_run_name: the shard index


PAGE = 200  # the most the API returns at once


async def _paged(read) -> list:
    out, page = [], None
    while page is None or len(page) == PAGE:
        page = await read(len(out))
        out += page
    return out


async def _read_runs(parent_id) -> dict:
    """Through the Prefect client: the flow run's subflow runs (recursively) by flow name, their
    task runs, and their logs."""
    async with get_client() as client:
        flows, frontier = {}, [parent_id]
        while frontier:
            children = await client.read_flow_runs(
                flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=frontier)),
                limit=200,
                sort=FlowRunSort.ID_DESC,
            )
            frontier = [f.id for f in children if f.id not in flows]
            flows.update({f.id: f for f in children})
        ids = [parent_id, *flows]
        tasks = await _paged(lambda offset: client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)), sort=TaskRunSort.ID_DESC, limit=PAGE,
            offset=offset))
        names = {fid: (await client.read_flow(fid)).name for fid in {f.flow_id for f in flows.values()}}
        logs = await _paged(lambda offset: client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=ids)), limit=PAGE, offset=offset))
    by_flow: dict[str, list] = {}
    for f in flows.values():
        by_flow.setdefault(names[f.flow_id], []).append(f)
    return {"flows": by_flow, "tasks": tasks, "logs": [entry.message for entry in logs]}


def _poisoned_demo(tmp_path, demo_dir):
    demo = tmp_path / "demo"
    shutil.copytree(demo_dir, demo)
    path = demo / "visdial_1.0_train.json"
    doc = json.loads(path.read_text())
    doc["data"]["questions"].append(f"is this a {POISON.lower()} question")
    doc["data"]["dialogs"][13]["dialog"][2]["question"] = len(doc["data"]["questions"]) - 1
    path.write_text(json.dumps(doc))
    return SplitInput(split="train", visdial=path, images=demo / "images" / "train2014",
                      coco=demo / "captions_train2014.json")


def _versions(versions: dict) -> str:
    return ", ".join(f"{k}@v{v}" for k, v in sorted(versions.items()))


def test_rerun_after_a_poisoned_record_redoes_only_the_failed_shard(tmp_path, demo_dir):
    state = make_state(teacher=True, faults=Faults(poison=POISON.lower()))
    with running_server(state) as url:
        cfg = PipelineConfig.load(
            None, data_root=tmp_path / "root", inputs=[_poisoned_demo(tmp_path, demo_dir)],
            stages=["ingest", "embed", "reminders", "train_sft", "train_memory"],
            embed={"tiny": True, "device": "cpu", "shard_rows": 64},
            reminders={"ollama_host": url, "model": "mmem-teacher", "shard_size": 4, "max_attempts": 2,
                       "backoff_s": 0.01, "backoff_max_s": 0.02, "shard_retries": 0, "timeout_s": 20},
            train_sft={"tiny": True, "max_steps": 1},
            train_memory={"tiny": True, "device": "cpu", "max_steps": 1, "eval_limit": 0},
        )
        first = pipeline_flow(cfg, return_state=True)
        assert first.is_failed()
        assert (
            "reminders" in first.message and "train_sft" in first.message
        )  # failed, and its dependent skipped
        runs1 = asyncio.run(_read_runs(first.state_details.flow_run_id))
        shards1 = {
            int(REMINDER_SHARD.match(t.name)[1]): t for t in runs1["tasks"] if REMINDER_SHARD.match(t.name)
        }
        assert len(shards1) == 5
        poisoned = [i for i, t in shards1.items() if t.state_type.value == "FAILED"]
        assert len(poisoned) == 1
        assert [t for t in runs1["tasks"] if EMBED_SHARD.match(t.name)], "the first run embeds"
        db = connect(tmp_path / "root" / "lance")
        ingested = {n: db.open_table(n).version for n in ("images", "dialogs", "turns")}

        # Stands for fixing the cause: the server that choked on this record answers it now. The
        # prompt, so every shard's cache key, is unchanged: only the failed shard has work left.
        state.faults = Faults()
        calls_before = sum(state.requests.values())
        second = pipeline_flow(cfg, return_state=True)
        assert second.is_completed(), second.message
        results = second.result()
        APILogHandler().flush()  # the logs reach the API before they are read back
        runs2 = asyncio.run(_read_runs(second.state_details.flow_run_id))

    # Through the Prefect API: the failed shard ran again (Completed), every other one was a cache hit.
    shards2 = {
        int(REMINDER_SHARD.match(t.name)[1]): t for t in runs2["tasks"] if REMINDER_SHARD.match(t.name)
    }
    assert sorted(shards2) == sorted(shards1)
    assert Counter(t.state_name for t in shards2.values()) == {"Cached": 4, "Completed": 1}
    assert [i for i, t in shards2.items() if t.state_name == "Completed"] == poisoned
    assert all(t.state_type.value == "COMPLETED" for t in shards2.values())
    # Embed shards are not even dispatched: the tables already hold their rows, by the same model.
    assert not [t for t in runs2["tasks"] if EMBED_SHARD.match(t.name)]
    assert results.embed.shards_up_to_date == results.embed.shards
    # The poisoned shard's other prompts were answered in run 1 and written through to the cache:
    # the re-run asks for the one prompt that failed, nothing else.
    assert results.reminders.cache_hits == 19 and results.reminders.calls == 1
    assert results.reminders.shards_cached == 4
    assert sum(state.requests.values()) - calls_before == 1
    assert results.reminders.valid == 20
    assert {n: results.ingest["train"].versions[n] for n in ingested} == ingested  # ingest wrote nothing
    assert results.train_sft.version == 1

    # Table versions handed over, as the subflow runs' parameters say.
    (embed_run,), (reminders_run,) = runs2["flows"]["embed"], runs2["flows"]["reminders"]
    (memory_run,), (sft_run,) = runs2["flows"]["train-memory-model"], runs2["flows"]["train-sft"]
    assert embed_run.parameters["config"]["table_versions"] == ingested
    assert reminders_run.parameters["config"]["table_versions"] == ingested
    embedded = {n: results.embed.versions[n] for n in ("image_embeddings", "text_embeddings")}
    assert memory_run.parameters["config"]["table_versions"] == {
        "turns": ingested["turns"], "dialogs": ingested["dialogs"], **embedded}
    assert sft_run.parameters["config"]["reminders_version"] == results.reminders.versions["reminders"]
    assert results.embed.read_versions == results.reminders.read_versions == ingested

    # The logs name what each stage read and wrote.
    logs = "\n".join(runs2["logs"])
    wrote = {**embedded, "quarantine": results.embed.versions["quarantine"]}
    assert (
        f"embed read {_versions(ingested)}; wrote {_versions(wrote)}"
        in logs
    )
    assert f"reminders read {_versions(ingested)}; wrote {_versions(results.reminders.versions)}" in logs
