"""The deployment triggers on the real Prefect test server: the events the flows really emit, read
back through the events API, match the triggers, and the server's automations start the runs.

Chain: a ``reminders`` flow run completes -> the SFT deployment gets a flow run; the SFT flow
publishes an artifact version (``mmem.artifact.created``) -> the evaluation deployment gets a flow
run that evaluates only the variants of that artifact and is labelled with its version. The
deployments are registered under test names (nothing serves them, so their runs stay Scheduled)
and removed afterwards with their automations and runs.
"""

from __future__ import annotations

import time

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
from prefect.client.schemas.sorting import FlowRunSort
from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter
from triggers_support import covers

from deployments.triggers import evaluate_on_new_artifact, sft_on_new_reminders
from flows.reminders import reminders_flow
from flows.train import train_sft_flow
from llmcalls.server import make_state, running_server
from schemas.evaluate import EvaluateConfig
from schemas.reminders import RemindersConfig
from schemas.train import ARTIFACT_CREATED_EVENT, SftConfig

TIMEOUT_S = 30




def _flow_of(event) -> str | None:
    """The name of the flow whose run the event is about (its related resource in role ``flow``)."""
    return next(
        (r.get("prefect.resource.name") for r in event.related if r.get("prefect.resource.role") == "flow"),
        None,
    )


def _poll(read, what: str):
    deadline = time.monotonic() + TIMEOUT_S
    while not (found := read()):
        assert time.monotonic() < deadline, f"no {what} within {TIMEOUT_S} s"
        time.sleep(0.3)
    return found


def _events(client, name: str, resource_id: str | None = None) -> list:
    flt = EventFilter(event=EventNameFilter(name=[name]))
    if resource_id:
        flt.resource = EventResourceFilter(id=[resource_id])
    return client.read_events(flt, limit=50).events


def _runs_of(client, deployment_id) -> list:
    return client.read_flow_runs(
        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
        limit=20,
        sort=FlowRunSort.ID_DESC,
    )


@pytest.fixture
def registered(tmp_path, demo_dir, data_root):
    """The train-sft and evaluate deployments of ``mmem serve`` (tiny profile, demo variants),
    registered with their triggers under test names; removed afterwards."""
    from deployments.serve import build_deployments

    profile = tmp_path / "profile.toml"
    profile.write_text(f'data_root = "{data_root}"\n[train_sft]\ntiny = true\nmax_steps = 1\ndevice = "cpu"\n'
                       '[evaluate]\nvariants = "demo"\n')
    deps = {d.name: d for d in build_deployments(profile)}
    picked = {}
    for name in ("train-sft", "evaluate"):
        dep = deps[name]
        dep.name = f"trigger-test-{name}"
        picked[name] = (dep, dep.apply())
    yield picked
    with get_client(sync_client=True) as client:
        for _, dep_id in picked.values():
            for run in _runs_of(client, dep_id):
                client.delete_flow_run(run.id)
            client.delete_resource_owned_automations(f"prefect.deployment.{dep_id}")
            client.delete_deployment(dep_id)


def test_reminders_completion_starts_sft_and_a_new_artifact_starts_its_evaluation(registered, data_root):
    (sft_dep, sft_id), (eval_dep, eval_id) = registered["train-sft"], registered["evaluate"]
    assert [t.name for t in eval_dep.triggers] == ["evaluate-on-new-gemma3-4b-reminders-lora",
                                                   "evaluate-on-new-memory-model"]

    # 1. a real reminders run (teacher backend) completes: the server's automation starts SFT
    with running_server(make_state(teacher=True)) as url:
        state = reminders_flow(RemindersConfig(data_root=data_root, ollama_host=url, model="mmem-teacher",
                                               limit=4, shard_size=4), return_state=True)
    assert state.is_completed(), state
    run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        completed = _poll(lambda: _events(client, "prefect.flow-run.Completed", f"prefect.flow-run.{run_id}"),
                          "Completed event of the reminders run")[0]
        assert covers(sft_on_new_reminders(), completed)
        assert not covers(evaluate_on_new_artifact(), completed)
        sft_runs = _poll(lambda: _runs_of(client, sft_id), "flow run of the SFT deployment")
        assert len(sft_runs) == 1 and sft_runs[0].parameters == sft_dep.parameters
        assert _runs_of(client, eval_id) == []
        # a completed run of another flow (the session's ingest runs, ...) is no new reminders version
        others = [e for e in _events(client, "prefect.flow-run.Completed") if _flow_of(e) != "reminders"]
        assert others and not any(covers(sft_on_new_reminders(), e) for e in others)

    # 2. SFT runs with the deployment's parameters (here in-process, as the pipeline would) and
    #    publishes v1: the automation starts an evaluation of exactly the variants that use it
    result = train_sft_flow(SftConfig(**sft_dep.parameters["config"]))
    assert result.created and result.artifact == "gemma3-4b-reminders-lora:v1"
    with get_client(sync_client=True) as client:
        event = _poll(lambda: [e for e in _events(client, ARTIFACT_CREATED_EVENT)
                               if e.resource.get("mmem.artifact.path") == result.path],
                      "mmem.artifact.created event of the new version")[0]
        assert event.resource.get("mmem.artifact.ref") == result.artifact
        fired = [t for t in eval_dep.triggers if covers(t, event)]
        assert [t.name for t in fired] == ["evaluate-on-new-gemma3-4b-reminders-lora"]
        assert not covers(sft_on_new_reminders(), event)
        runs = _poll(lambda: _runs_of(client, eval_id), "flow run of the evaluate deployment")
    assert len(runs) == 1
    config = runs[0].parameters["config"]
    assert config["only"] == ["tiny_finetuned"]  # demo.toml's variant of this artifact
    assert config["run_label"] == "on-gemma3-4b-reminders-lora-v1"  # rendered from the event
    pinned = config["artifact_versions"]  # the version that fired, not whatever is latest later
    assert {k: int(v) for k, v in pinned.items()} == {"gemma3-4b-reminders-lora": 1}
    assert EvaluateConfig.model_validate(config).artifact_versions["gemma3-4b-reminders-lora"] in (1, "1")
    handed = ("only", "run_label", "artifact_versions")
    assert {k: v for k, v in config.items() if k not in handed} == \
        {k: v for k, v in eval_dep.parameters["config"].items() if k not in handed}
