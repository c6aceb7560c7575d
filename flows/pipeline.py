"""The parent flow: ingest -> embed -> reminders -> (validation gates) -> train -> evaluate.

Each stage is its own flow, run here as a subflow, so the Prefect UI shows the DAG as nested
runs and any stage can also be run (or re-run) alone. Stages hand over table versions, not
file paths: SFT trains on the exact `reminders` version the reminders stage wrote and
validated. A failed stage (a validation gate included) skips exactly the stages that depend on
it, says why in an artifact, and fails the pipeline run at the end.
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.states import Failed

from flows.embed import embed_flow
from flows.evaluate import evaluate_flow
from flows.ingest import ingest_flow
from flows.reminders import reminders_flow
from flows.train import train_memory_flow, train_sft_flow
from schemas.ingest import IngestConfig
from schemas.pipeline import DEPENDS_ON, STAGES, PipelineConfig
from tasks.runtime import logger, publish_markdown


class StageFailed(RuntimeError):
    pass


def _run(name: str, fn, *args) -> tuple[bool, Any]:
    state = fn(*args, return_state=True)
    if state.is_completed():
        return True, state.result()
    try:
        state.result()
    except Exception as exc:  # noqa: BLE001 - the reason is reported, not swallowed
        return False, f"{type(exc).__name__}: {str(exc)[:2000]}"
    return False, f"ended in state {state.type.value}"


@flow(name="pipeline", log_prints=True)
def pipeline_flow(config: PipelineConfig) -> dict:
    """Run the selected stages in DAG order; returns each stage's result (versions, artifacts)."""
    log = logger()
    results: dict[str, Any] = {}
    status: dict[str, str] = {}
    for name in STAGES:
        if name not in config.stages:
            status[name] = "not selected"
            continue
        blocked = [d for d in DEPENDS_ON[name] if d in config.stages and status.get(d) != "ok"]
        if blocked:
            status[name] = f"skipped: {', '.join(blocked)} did not succeed"
            log.warning("%s %s", name, status[name])
            continue
        ok, out = _STAGE_RUNNERS[name](config, results)
        status[name] = "ok" if ok else f"FAILED: {out}"
        results[name] = out
        log.info("stage %s: %s", name, "ok" if ok else status[name])
    publish_markdown("pipeline-summary", _summary(status, results), "What each stage did")
    failed = {k: v for k, v in status.items() if v.startswith(("FAILED", "skipped"))}
    if failed:
        return Failed(message="; ".join(f"{k}: {v}" for k, v in failed.items()), data=results)
    return results


def _ingest(config: PipelineConfig, results: dict) -> tuple[bool, Any]:
    out = {}
    for inp in config.inputs:
        ok, res = _run(f"ingest-{inp.split}", ingest_flow, IngestConfig(
            data_root=config.data_root, visdial=inp.visdial, images=inp.images, coco=inp.coco,
            workers=config.ingest_workers))
        if not ok:
            return False, f"{inp.split}: {res}"
        out[inp.split] = res
    return True, out


def _embed(config: PipelineConfig, results: dict) -> tuple[bool, Any]:
    return _run("embed", embed_flow, config.stage("embed"))


def _reminders(config: PipelineConfig, results: dict) -> tuple[bool, Any]:
    return _run("reminders", reminders_flow, config.stage("reminders"))


def _train_sft(config: PipelineConfig, results: dict) -> tuple[bool, Any]:
    sft = config.stage("train_sft")
    version = _written_version(results.get("reminders"), "reminders")
    if version is not None and sft.reminders_version is None:
        sft = sft.model_copy(update={"reminders_version": version})  # the version reminders validated
    return _run("train_sft", train_sft_flow, sft)


def _train_memory(config: PipelineConfig, results: dict) -> tuple[bool, Any]:
    return _run("train_memory", train_memory_flow, config.stage("train_memory"))


def _evaluate(config: PipelineConfig, results: dict) -> tuple[bool, Any]:
    return _run("evaluate", evaluate_flow, config.stage("evaluate"))


_STAGE_RUNNERS = {"ingest": _ingest, "embed": _embed, "reminders": _reminders, "train_sft": _train_sft,
                  "train_memory": _train_memory, "evaluate": _evaluate}


def _written_version(result: Any, table: str) -> int | None:
    if isinstance(result, dict):
        versions = result.get("versions") or result
        if isinstance(versions, dict) and isinstance(versions.get(table), int):
            return versions[table]
    return None


def _summary(status: dict[str, str], results: dict) -> str:
    lines = ["| stage | status |", "| --- | --- |"]
    lines += [f"| {k} | {v.replace('|', '/')[:300]} |" for k, v in status.items()]
    return "\n".join(lines)
