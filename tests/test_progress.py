"""Long work shows its progress in the Prefect UI: a progress artifact per Progress bar in a run."""

from __future__ import annotations

import asyncio
import logging

from prefect import flow, task
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    ArtifactFilterType,
    FlowRunFilter,
    LogFilter,
    LogFilterFlowRunId,
    TaskRunFilter,
)
from prefect.client.schemas.sorting import ArtifactSort

import tasks.runtime  # noqa: F401 -- registers the Prefect bridges, as every task wrapper does
from storage.progress import Progress


@task
def work(n: int) -> int:
    with Progress(n, "embed shards") as bar:
        for _ in range(n):
            bar(1)
    return n


@flow
def long_work(n: int) -> str:
    from prefect.runtime import flow_run

    work(n)
    return flow_run.id


async def _progress_artifacts(run_id: str) -> list:
    async with get_client() as client:
        return await client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]),
                                           type=ArtifactFilterType(any_=["progress"])),
            flow_run_filter=FlowRunFilter(), task_run_filter=TaskRunFilter(), sort=ArtifactSort.CREATED_DESC,
            limit=10)


def test_progress_bars_become_progress_artifacts_of_the_run():
    run_id = long_work(40)
    [artifact] = asyncio.run(_progress_artifacts(run_id))
    assert artifact.key == "embed-shards" and artifact.description == "embed shards"
    assert float(artifact.data) == 100.0


def test_progress_outside_a_run_is_a_bar_only():
    with Progress(3, "plain") as bar:
        for _ in range(3):
            bar(1)
    assert bar.done == 3 and bar._views == []


@task
def pure_step() -> None:
    logging.getLogger("mmem.ingest.example").info("a line from a stage package")


@flow
def logs_a_pure_line() -> str:
    from prefect.runtime import flow_run

    pure_step()
    return flow_run.id


async def _run_logs(run_id: str) -> list[str]:
    async with get_client() as client:
        for _ in range(50):  # the run-log handler ships its batch in the background
            logs = await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])),
                                           limit=200, offset=0)
            if any("stage package" in log.message for log in logs):
                break
            await asyncio.sleep(0.2)
        return [log.message for log in logs]


def test_a_stage_packages_info_line_reaches_the_runs_logs():
    """Stage packages log with the standard library only; the task glue carries it to the run."""
    messages = asyncio.run(_run_logs(logs_a_pure_line()))
    assert "a line from a stage package" in messages
