"""Deployments through a real Prefect server: served, listed, run from the API like the UI does."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
from prefect.settings import PREFECT_API_URL

from storage.lance import connect, read


async def _automation_names() -> set[str]:
    """The served deployments' triggers live on the server as automations."""
    async with get_client() as client:
        resp = await client._client.post(
            "/automations/filter", json={"sort": "NAME_ASC", "limit": 200, "offset": 0}
        )
        resp.raise_for_status()
        return {a["name"] for a in resp.json()}


def _profile(tmp_path, demo_dir, root):
    p = tmp_path / "profile.toml"
    p.write_text(
        f'data_root = "{root}"\n[pipeline]\n'
        f'inputs = [{{ split = "train", visdial = "{demo_dir}/visdial_1.0_train.json", '
        f'images = "{demo_dir}/images/train2014", coco = "{demo_dir}/captions_train2014.json" }}]\n'
        "[embed]\ntiny = true\n[train_sft]\ntiny = true\n[train_memory]\ntiny = true\n"
    )
    return p


def test_every_flow_has_a_deployment_and_the_pipeline_a_paused_schedule(tmp_path, demo_dir):
    from deployments.serve import build_deployments

    deps = {d.name: d for d in build_deployments(_profile(tmp_path, demo_dir, tmp_path / "root"))}
    assert set(deps) == {"pipeline", "ingest", "embed", "reminders", "train-sft", "train-memory", "evaluate",
                         "memory-upkeep"}
    assert deps["pipeline"].paused is True and deps["pipeline"].schedules
    assert deps["memory-upkeep"].schedules[0].schedule.cron == "17 * * * *"
    assert deps["ingest"].parameters["config"]["visdial"].endswith("visdial_1.0_train.json")
    # Chained through events, so the chain works from the UI too.
    assert [t.name for t in deps["train-sft"].triggers] == ["sft-on-new-validated-reminders"]
    # one evaluation trigger per artifact the variants use (the report's: the SFT adapter), which
    # evaluates only the variants of that artifact, labelled with the version that fired
    [evaluate] = deps["evaluate"].triggers
    assert evaluate.name == "evaluate-on-new-gemma3-4b-reminders-lora"
    assert evaluate.match["mmem.artifact.name"] == ["gemma3-4b-reminders-lora"]
    config = evaluate.parameters["config"]
    assert config["only"] == ["4b_finetuned"] and "mmem.artifact.version" in config["run_label"]
    assert config["artifact_versions"] == {
        "gemma3-4b-reminders-lora": "{{ event.resource['mmem.artifact.version'] }}"
    }
    handed = ("only", "run_label", "artifact_versions")
    assert {k: v for k, v in config.items() if k not in handed} == \
        {k: v for k, v in deps["evaluate"].parameters["config"].items() if k not in handed}
    # The flow's config is the parameter schema, so the UI renders a form for it.
    assert "config" in deps["embed"]._parameter_openapi_schema.properties
    # Flows load by module path: as a script, flows/embed.py would have its folder first on
    # sys.path and shadow the embed package (a served run then crashed on `import embed.plan`).
    from prefect.flows import load_flow_from_entrypoint

    assert deps["embed"].entrypoint == "flows.embed.embed_flow"
    for d in deps.values():
        assert load_flow_from_entrypoint(d.entrypoint).name == d.flow_name


def test_a_served_deployment_runs_through_the_server(tmp_path, demo_dir):
    root = tmp_path / "root"
    # the serving process looks for scheduled runs every second (Prefect's default: every 10)
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_RUNNER_POLL_FREQUENCY": "1"}
    code = "import sys; from deployments.serve import serve_all; serve_all(sys.argv[1])"
    proc = subprocess.Popen([sys.executable, "-c", code, str(_profile(tmp_path, demo_dir, root))], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        flow_run = None
        while flow_run is None:
            try:
                flow_run = run_deployment("ingest/ingest", timeout=240)
            except Exception:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(3)
        assert flow_run.state.is_completed(), flow_run.state
        automations = asyncio.run(_automation_names())
        assert {"sft-on-new-validated-reminders", "evaluate-on-new-gemma3-4b-reminders-lora"} <= automations
        assert len(read(connect(root / "lance"), "dialogs")) == 20
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    assert "ingest" in out
