"""The parent flow: ingest -> embed -> reminders -> (validation gates) -> train -> evaluate.

Each stage is its own flow, run here as a subflow, so the Prefect UI shows the DAG as nested
runs and any stage can also be run (or re-run) alone. Stages hand over table versions, not
file paths, through their configs' pin fields (run alone, a stage reads the latest): embed and
reminders read the `images`/`dialogs`/`turns` versions ingest wrote, the memory model trains on
those `turns`/`dialogs` and the embeddings versions embed wrote, SFT on the exact `reminders`
version the reminders stage wrote and validated. The log and the summary artifact name what each
stage read and wrote. A failed stage (a validation gate included) skips exactly the stages that
depend on it, says why in an artifact, and fails the pipeline run at the end.
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
from schemas.pipeline import DEPENDS_ON, STAGES, PipelineConfig, PipelineResult
from schemas.results import StageResult
from schemas.train import TrainResult
from storage.lance import versions_text
from tasks.runtime import enforce_trust, logger, publish_markdown


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
def pipeline_flow(config: PipelineConfig) -> PipelineResult:
    """Run the selected stages in DAG order; returns each stage's result (versions, artifacts)."""
    enforce_trust(config)  # every stage's data root, scheduler and hosts, before the first stage starts
    log = logger()
    result = PipelineResult()
    for name in STAGES:
        if name not in config.stages:
            result.status[name] = "not selected"
            continue
        blocked = [d for d in DEPENDS_ON[name] if d in config.stages and result.status.get(d) != "ok"]
        if blocked:
            result.status[name] = f"skipped: {', '.join(blocked)} did not succeed"
            log.warning("%s %s", name, result.status[name])
            continue
        ok, out = _STAGE_RUNNERS[name](config, result)
        if ok:
            setattr(result, name, out)
            if name != "ingest":
                log.info("stage %s read %s; wrote %s", name, versions_text(out.read_versions),
                         versions_text(_wrote(out)))
        result.status[name] = "ok" if ok else f"FAILED: {out}"
        log.info("stage %s: %s", name, result.status[name])
    publish_markdown("pipeline-summary", _summary(result), "What each stage did")
    failed = {k: v for k, v in result.status.items() if v.startswith(("FAILED", "skipped"))}
    if failed:
        return Failed(message="; ".join(f"{k}: {v}" for k, v in failed.items()), data=result)
    return result


def _ingest(config: PipelineConfig, result: PipelineResult) -> tuple[bool, Any]:
    out = {}
    for inp in config.inputs:
        ok, res = _run(f"ingest-{inp.split}", ingest_flow, IngestConfig(
            data_root=config.data_root, visdial=inp.visdial, images=inp.images, coco=inp.coco,
            workers=config.ingest_workers))
        if not ok:
            return False, f"{inp.split}: {res}"
        out[inp.split] = res
    return True, out


def _embed(config: PipelineConfig, result: PipelineResult) -> tuple[bool, Any]:
    return _run("embed", embed_flow, _pinned(config.stage("embed"), "table_versions", result.ingested()))


def _reminders(config: PipelineConfig, result: PipelineResult) -> tuple[bool, Any]:
    return _run("reminders", reminders_flow, _pinned(config.stage("reminders"), "table_versions",
                                                     result.ingested()))


def _train_sft(config: PipelineConfig, result: PipelineResult) -> tuple[bool, Any]:
    sft = config.stage("train_sft")
    version = result.reminders.versions.get("reminders") if result.reminders else None
    if version is not None and sft.reminders_version is None:
        sft = sft.model_copy(update={"reminders_version": version})  # the version reminders validated
    return _run("train_sft", train_sft_flow, sft)


def _train_memory(config: PipelineConfig, result: PipelineResult) -> tuple[bool, Any]:
    """The memory model trains on the turns/dialogs ingest wrote and the embeddings embed wrote."""
    ingested = {k: v for k, v in result.ingested().items() if k in ("turns", "dialogs")}
    embedded = {k: v for k, v in (result.embed.versions if result.embed else {}).items()
                if k in ("image_embeddings", "text_embeddings")}
    return _run("train_memory", train_memory_flow,
                _pinned(config.stage("train_memory"), "table_versions", {**ingested, **embedded}))


def _evaluate(config: PipelineConfig, result: PipelineResult) -> tuple[bool, Any]:
    """Evaluation loads the artifact versions this run's training produced (or found up to date)."""
    trained = {
        r.name: r.version for r in (result.train_sft, result.train_memory) if isinstance(r, TrainResult)
    }
    return _run("evaluate", evaluate_flow, _pinned(config.stage("evaluate"), "artifact_versions", trained))


def _pinned(stage, field: str, versions: dict[str, int]):
    """The stage config with ``versions`` handed over; a version the profile pinned itself wins."""
    if not versions:
        return stage
    return stage.model_copy(update={field: {**versions, **getattr(stage, field)}})


_STAGE_RUNNERS = {"ingest": _ingest, "embed": _embed, "reminders": _reminders, "train_sft": _train_sft,
                  "train_memory": _train_memory, "evaluate": _evaluate}


def _wrote(result: StageResult) -> dict[str, int]:
    """The table versions a stage wrote; a train stage's is the model artifact it produced (or found
    up to date)."""
    if isinstance(result, TrainResult) and not result.versions:
        return {result.name: result.version}
    return result.versions


def _summary(result: PipelineResult) -> str:
    """Each stage's status and the table versions it read and wrote (the hand-over between stages)."""
    lines = ["| stage | status | read | wrote |", "| --- | --- | --- | --- |"]
    for k, v in result.status.items():
        out = getattr(result, k)
        if k == "ingest":
            read, wrote = "", "; ".join(f"{s}: {versions_text(r.versions)}" for s, r in out.items())
        elif out is not None:
            read, wrote = versions_text(out.read_versions), versions_text(_wrote(out))
        else:
            read = wrote = ""
        lines.append(f"| {k} | {v.replace('|', '/')[:300]} | {read} | {wrote} |")
    return "\n".join(lines)
