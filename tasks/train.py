"""Train tasks: thin Prefect wrappers around :mod:`training.plan` and :mod:`training.run`, plus the
publication of a new version (link and manifest artifacts, and the ``mmem.artifact.created`` event
on which a deployment trigger starts evaluation).

The big inputs are content-addressed by their Lance versions inside the plan's fingerprint, so
the tasks use ``NO_CACHE`` and rely on that fingerprint rather than on Prefect hashing Arrow tables.
"""

from __future__ import annotations

import json

from prefect import task
from prefect.artifacts import create_link_artifact
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event

from schemas.train import ARTIFACT_CREATED_EVENT, MemoryTrainConfig, SftConfig
from storage.artifacts import ArtifactVersion
from tasks.runtime import artifact_key, in_prefect_run, publish_markdown, run_id
from training.plan import TrainPlan, plan_memory, plan_sft
from training.run import run_memory, run_sft


@task(name="plan-sft", cache_policy=NO_CACHE)
def plan_sft_task(config: SftConfig) -> TrainPlan:
    return plan_sft(config)


@task(name="plan-memory-model", cache_policy=NO_CACHE)
def plan_memory_task(config: MemoryTrainConfig) -> TrainPlan:
    return plan_memory(config)


# A retry resumes from the newest checkpoint, so a crash mid-run costs at most one checkpoint interval.
@task(name="train-sft", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=10)
def train_sft_task(config: SftConfig, plan: TrainPlan) -> ArtifactVersion:
    return run_sft(config, plan, run_id())


@task(name="train-memory-model", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=10)
def train_memory_task(config: MemoryTrainConfig, plan: TrainPlan) -> ArtifactVersion:
    return run_memory(config, plan, run_id())


def manifest_markdown(art: ArtifactVersion) -> str:
    m = art.manifest
    lines = [f"## Artifact `{art.ref}` ({m.get('kind')})", "", f"`{art.path}`", "",
             "| field | value |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in art.summary().items()]
    lines += ["", "| metric | value |", "| --- | --- |"] + [
        f"| {k} | {v} |" for k, v in m.get("metrics", {}).items()
    ]
    lines += ["", "| input table | Lance version |", "| --- | --- |"]
    lines += [f"| {k} | {v.get('version')} |" for k, v in m.get("inputs", {}).items()]
    lines += [
        "",
        "<details><summary>config</summary>",
        "",
        "```json",
        json.dumps(m.get("config"), indent=2),
        "```",
        "",
        "</details>",
    ]
    return "\n".join(lines)


@task(name="publish-artifact", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def announce_task(art: ArtifactVersion, created: bool) -> None:
    """A link and a markdown summary as Prefect artifacts; a new version also emits
    ``mmem.artifact.created``, on which a deployment trigger starts evaluation."""
    if not in_prefect_run():
        return
    create_link_artifact(
        key=artifact_key(f"model-{art.name}"),
        link=art.path.resolve().as_uri(),
        link_text=art.ref,
        description=f"Model artifact {art.ref}",
    )
    publish_markdown(f"model-{art.name}-manifest", manifest_markdown(art), f"Manifest of {art.ref}")
    if created:
        emit_event(
            event=ARTIFACT_CREATED_EVENT,
            resource={
                "prefect.resource.id": f"mmem.artifact.{art.name}.v{art.version}",
                "prefect.resource.name": art.ref,
                "mmem.artifact.name": art.name,
                "mmem.artifact.version": str(art.version),
                "mmem.artifact.ref": art.ref,
                "mmem.artifact.kind": str(art.manifest.get("kind")),
                "mmem.artifact.path": str(art.path),
            },
            payload={"metrics": art.manifest.get("metrics", {}), "inputs": art.manifest.get("inputs", {})},
        )
