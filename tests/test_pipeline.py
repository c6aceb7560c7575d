"""The parent flow: a poisoned record fails one shard; after the fix, a re-run redoes only it."""

from __future__ import annotations

import asyncio
import json
import re
import shutil

from prefect.client.orchestration import get_client

from flows.pipeline import pipeline_flow
from schemas.pipeline import PipelineConfig, SplitInput
from storage.lance import connect
from training.llm_server import Faults, make_state, running_server

POISON = "POISONED-RECORD"
EMBED_SHARD = re.compile(r"embed-(image|text)-\d+$")  # embed_shard_task's task_run_name


async def _task_runs(parent_id) -> list[dict]:
    """Every task run of a flow run and of its subflow runs, through the Prefect REST API."""
    async with get_client() as client:
        flow_ids, frontier = {str(parent_id)}, [str(parent_id)]
        while frontier:
            resp = await client._client.post("/flow_runs/filter", json={
                "flow_runs": {"parent_flow_run_id": {"any_": frontier}}, "limit": 200, "offset": 0,
                "sort": "ID_DESC"})
            resp.raise_for_status()
            frontier = [f["id"] for f in resp.json() if f["id"] not in flow_ids]
            flow_ids.update(frontier)
        resp = await client._client.post("/task_runs/filter", json={
            "flow_runs": {"id": {"any_": sorted(flow_ids)}}, "limit": 200, "offset": 0, "sort": "ID_DESC"})
        resp.raise_for_status()
        return resp.json()


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


def test_rerun_after_a_poisoned_record_redoes_only_the_failed_shard(tmp_path, demo_dir):
    state = make_state(teacher=True, faults=Faults(poison=POISON.lower()))
    with running_server(state) as url:
        cfg = PipelineConfig.load(
            None, data_root=tmp_path / "root", inputs=[_poisoned_demo(tmp_path, demo_dir)],
            stages=["ingest", "embed", "reminders", "train_sft"],
            embed={"tiny": True, "device": "cpu", "shard_rows": 64},
            reminders={"ollama_host": url, "model": "mmem-teacher", "shard_size": 4, "max_attempts": 2,
                       "backoff_s": 0.01, "backoff_max_s": 0.02, "shard_retries": 0, "timeout_s": 20},
            train_sft={"tiny": True, "max_steps": 1},
        )
        first = pipeline_flow(cfg, return_state=True)
        assert first.is_failed()
        assert "reminders" in first.message and "train_sft" in first.message  # failed, and its dependent skipped
        runs1 = asyncio.run(_task_runs(first.state_details.flow_run_id))
        shards1 = [t for t in runs1 if t["name"].startswith("shard-")]
        assert len(shards1) == 5 and [t["state_type"] for t in shards1].count("FAILED") == 1
        assert [t for t in runs1 if EMBED_SHARD.match(t["name"])], "the first run embeds"
        db = connect(tmp_path / "root" / "lance")
        ingested = {n: db.open_table(n).version for n in ("images", "dialogs", "turns")}

        state.faults = Faults()  # the cause is fixed
        calls_before = sum(state.requests.values())
        second = pipeline_flow(cfg, return_state=True)
        assert second.is_completed(), second.message
        results = second.result()
        runs2 = asyncio.run(_task_runs(second.state_details.flow_run_id))

    shards2 = [t for t in runs2 if t["name"].startswith("shard-")]
    assert len(shards2) == 1 and shards2[0]["state_type"] == "COMPLETED"  # only the failed shard ran again
    assert not [t for t in runs2 if EMBED_SHARD.match(t["name"])]  # every embed shard was up to date
    # The poisoned shard's other prompts were answered in run 1 and written through to the cache:
    # the re-run asks for the one prompt that failed, nothing else.
    assert results["reminders"]["cache_hits"] == 19 and results["reminders"]["calls"] == 1
    assert sum(state.requests.values()) - calls_before == 1
    assert results["reminders"]["valid"] == 20
    assert {n: results["ingest"]["train"]["versions"][n] for n in ingested} == ingested  # ingest wrote nothing
    assert results["train_sft"]["version"] == 1
