"""The memory model's training: the loop's resume after a kill, the flows (publish, skip a rerun,
one run per fingerprint at a time) and ``mmem train memory``."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from killing import sigkill_when
from test_memory_model import REPO, make_embedded_root, tiny_config
from triggers_support import covers

from storage.lance import connect, read
from training.memory_data import MemoryData, build_memory_data, read_memory_inputs
from training.memory_loop import list_checkpoints, train_memory, trainable_state
from training.memory_model import build_memory_model, load_memory_model


@pytest.fixture(scope="module")
def embedded_root(tmp_path_factory, ingested_root) -> Path:
    return make_embedded_root(tmp_path_factory, ingested_root)


def _wait_for_event(client, ref: str, timeout: float = 30.0):
    """The ``mmem.artifact.created`` event for ``ref``, as the Prefect server stored it."""
    from prefect.events.filters import EventFilter, EventNameFilter

    deadline = time.monotonic() + timeout
    while True:
        page = client.read_events(
            EventFilter(event=EventNameFilter(name=["mmem.artifact.created"])), limit=50
        )
        found = [e for e in page.events if e.resource.get("mmem.artifact.ref") == ref]
        if found:
            return found[0]
        assert time.monotonic() < deadline, f"no mmem.artifact.created event for {ref}"
        time.sleep(0.5)




RUN_SCRIPT = """
import sys, time, torch
from pathlib import Path
from schemas.train import MemoryTrainConfig
from training.memory_loop import train_memory
from training.memory_data import build_memory_data, read_memory_inputs
from training.memory_model import build_memory_model
root, ckpt = Path(sys.argv[1]), Path(sys.argv[2])
torch.set_num_threads(int(sys.argv[3]))  # the parent's: a float sum's order depends on it
config = MemoryTrainConfig(data_root=root, tiny=True, device="cpu", max_steps=8, checkpoint_every=2,
                           batch_size=2)
model = build_memory_model(config, torch.device("cpu"))
loaded = read_memory_inputs(config.lance_uri, ["train"], {})
data, _ = build_memory_data(loaded, "train", model.tokenizer, model.arch)
print("ready", flush=True)
train_memory(model, data, None, config, ckpt, device=torch.device("cpu"),
             on_step=lambda s, o: time.sleep(0.3))
"""


def test_loop_resumes_after_sigkill_with_the_same_data_order(embedded_root, tmp_path):
    """Kill a training process after a checkpoint; resuming ends with exactly the weights of a run
    that never stopped."""
    config = tiny_config(embedded_root, max_steps=8, checkpoint_every=2, batch_size=2)
    cpu = torch.device("cpu")

    def fresh():
        model = build_memory_model(config, cpu)
        loaded = read_memory_inputs(config.lance_uri, ["train"], {})
        return model, build_memory_data(loaded, "train", model.tokenizer, model.arch)[0]

    model, data = fresh()
    straight = train_memory(model, data, None, config, tmp_path / "straight", device=cpu)
    assert straight.resumed_from == 0 and straight.steps == 8
    reference = trainable_state(model)

    ckpt = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", RUN_SCRIPT, str(embedded_root), str(ckpt),
                             str(torch.get_num_threads())], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sigkill_when(
        proc, lambda: any(p.name.endswith("0004") for p in list_checkpoints(ckpt)), "checkpoint at step 4"
    )
    steps = [int(p.name.split("-")[1]) for p in list_checkpoints(ckpt)]
    assert 4 <= max(steps) < 8  # killed after a checkpoint, before the end

    model, data = fresh()
    resumed = train_memory(model, data, None, config, ckpt, device=cpu)
    assert resumed.resumed_from == max(steps)
    state = trainable_state(model)
    assert state.keys() == reference.keys()
    for k in state:
        assert torch.equal(state[k], reference[k]), k


def test_train_memory_flow_publishes_and_skips_rerun(embedded_root):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, TaskRunFilter

    from flows.train import train_memory_flow
    from storage.artifacts import ArtifactStore

    config = tiny_config(embedded_root, max_steps=3, eval_limit=8, artifact="memory-flow-test")
    first = train_memory_flow(config)
    assert first.created and first.artifact == "memory-flow-test:v1"
    db = connect(embedded_root / "lance")
    versions = {
        n: db.open_table(n).version for n in ("turns", "dialogs", "image_embeddings", "text_embeddings")
    }
    assert first.read_versions == versions and first.versions == {}
    art = ArtifactStore(config.artifacts_dir).get("memory-flow-test", verify=True)
    m = art.manifest
    assert {k: v["version"] for k, v in m["inputs"].items()} == versions
    assert m["config"]["infonce_weight"] == 0.0 and m["kind"] == "memory-model"
    assert m["trainable"] == ["imagebind_fc", "turn_pe"] and m["metrics"]["steps"] == 3
    assert m["data"]["quarantined"] == 1 and m["metrics"]["eval_samples"] == 8
    assert set(m["code"]) == {"commit", "dirty", "source_hash"}
    q = read(db, "quarantine", where="stage = 'train_memory'")
    assert q.column("reason").to_pylist() == ["embedding_missing"]

    again = train_memory_flow(config)
    assert not again.created and again.artifact == first.artifact
    assert ArtifactStore(config.artifacts_dir).versions("memory-flow-test") == [1]

    with get_client(sync_client=True) as client:
        published = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=["model-memory-flow-test", "model-memory-flow-test-manifest"])
            ),
            flow_run_filter=FlowRunFilter(),
            task_run_filter=TaskRunFilter(),
            limit=10,
            offset=0,
            sort="CREATED_DESC",
        )
        kinds = {a.key: a for a in published}
        link = kinds["model-memory-flow-test"].data  # Prefect stores a link artifact as markdown
        assert link.startswith("[memory-flow-test:v1](file://") and link.endswith("/memory-flow-test/v1)")
        assert "memory-flow-test:v1" in kinds["model-memory-flow-test-manifest"].data
        event = _wait_for_event(client, "memory-flow-test:v1")
    # the evaluation trigger fires on exactly this event; the SFT trigger does not
    from deployments.triggers import evaluate_on_new_artifact, sft_on_new_reminders

    assert covers(evaluate_on_new_artifact(), event) and covers(
        evaluate_on_new_artifact(artifacts="memory-flow-test"), event
    )
    assert not covers(evaluate_on_new_artifact(artifacts="gemma3-4b-reminders-lora"), event)
    assert not covers(sft_on_new_reminders(), event)

    loaded = load_memory_model(art.path, device="cpu")
    data, _ = build_memory_data(read_memory_inputs(config.lance_uri, ["val"], {}), "val", loaded.tokenizer,
                                loaded.arch, limit_samples=3)
    answers = loaded.generate(data.batch(torch.arange(3)), max_new_tokens=3)
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)
    assert isinstance(data, MemoryData)


def _lock_waiters(lock: Path) -> int:
    """Processes or threads blocked on ``lock`` (Linux /proc/locks marks them with ``->``)."""
    inode = f":{os.stat(lock).st_ino} "
    return sum(1 for line in Path("/proc/locks").read_text().splitlines() if "->" in line and inode in line)


def test_concurrent_runs_of_one_fingerprint_train_once(embedded_root):
    """Two runs with the same inputs at the same time (a pipeline's own training and the one a trigger
    started): one trains and publishes, the other waits and reuses its version."""
    import threading

    from flows.train import train_memory_flow
    from storage.artifacts import ArtifactStore
    from training.plan import exclusive, plan_memory

    config = tiny_config(embedded_root, max_steps=2, eval_limit=0, artifact="memory-concurrent-test")
    plan = plan_memory(config)
    pinned = plan_memory(
        config.model_copy(update={"table_versions": {n: i["version"] for n, i in plan.inputs.items()}})
    )
    assert pinned.fingerprint == plan.fingerprint  # pinning the versions it would pick anyway is the same run
    results, errors = [], []

    def run() -> None:
        try:
            results.append(train_memory_flow(config))
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    lock = config.checkpoints_dir / f"{plan.fingerprint}.lock"
    with exclusive(config, plan) as held:  # both runs plan, then queue on the lock behind this one
        assert held.existing is None
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while _lock_waiters(lock) < 2:
            assert time.monotonic() < deadline and all(t.is_alive() for t in threads), errors
            time.sleep(0.05)
    for t in threads:
        t.join(timeout=120)
    assert not errors and len(results) == 2
    assert sorted(r.created for r in results) == [False, True]
    assert {r.artifact for r in results} == {"memory-concurrent-test:v1"}
    assert ArtifactStore(config.artifacts_dir).versions("memory-concurrent-test") == [1]


def test_cli_train_memory_tiny(embedded_root):
    """`mmem train memory --tiny` trains, prints the version, and `mmem artifacts list` shows it."""
    import json

    from typer.testing import CliRunner

    from cli.main import app

    root = ["--data-root", str(embedded_root)]
    res = CliRunner().invoke(app, [*root, "train", "memory", "--tiny", "--max-steps", "2", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    result = json.loads(res.output[res.output.index("{\n"):])
    assert result["created"] and result["artifact"] == "memory-model:v1" and result["metrics"]["steps"] == 2
    listed = CliRunner().invoke(app, [*root, "artifacts", "list", "memory-model", "--json"])
    assert listed.exit_code == 0, listed.output
    assert [r["artifact"] for r in json.loads(listed.output)] == ["memory-model:v1"]
