"""Train steps: pin the inputs, train (resuming from checkpoints), publish an artifact version.

A training run is identified by its fingerprint: the config fields that change what is trained,
the Lance versions of its input tables and a hash of the training code. A run whose fingerprint
already has an artifact version is not repeated (``force`` overrides), and a killed run resumes
from the checkpoints kept under ``<data_root>/checkpoints/<artifact>/<fingerprint>/``. Only one run
per fingerprint trains at a time (a pipeline's own SFT and the one its reminders subflow triggers
share a fingerprint and a checkpoint folder): the others wait, then find its version. The big
inputs are content-addressed by their Lance versions, so the tasks use ``NO_CACHE`` and rely on
that fingerprint rather than on Prefect hashing Arrow tables.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_link_artifact
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event

from schemas.train import ARTIFACT_CREATED_EVENT, MemoryTrainConfig, SftConfig
from storage.artifacts import ArtifactStore, ArtifactVersion, code_version, fingerprint
from storage.lance import connect, open_table, pin, read, resolve_versions, table_exists
from storage.paths import stored_root
from storage.quarantine import quarantine, reason_counts
from tasks.runtime import Progress, artifact_key, in_prefect_run, logger, publish_markdown, run_id
from tasks.validate import ValidationFailed, ValidationReport, validate

ROOT = Path(__file__).resolve().parent.parent
SFT_SOURCES = [ROOT / p for p in ("training/sft.py", "training/tiny_models.py", "schemas/train.py", "tasks/train.py")]
MEMORY_SOURCES = [ROOT / p for p in ("training/memory_model.py", "training/memory_loop.py", "training/tiny_llama.py",
                                     "schemas/train.py", "tasks/train.py")]
MAX_VERSIONS_CHECKED = 10


@dataclass(frozen=True)
class TrainPlan:
    """What a run would train on, its fingerprint, and the version it already produced (if any)."""

    artifact: str
    fingerprint: str
    inputs: dict[str, dict[str, Any]]
    code: dict[str, Any]
    existing: ArtifactVersion | None

    def checkpoints(self, config: SftConfig | MemoryTrainConfig) -> Path:
        return config.checkpoints_dir / self.fingerprint


def pin_inputs(lance_uri: str, inputs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each input version tagged (``pinned-v<N>``) so that cleanup keeps it for as long as a manifest
    names it, with the tag and its row count recorded beside the version."""
    db = connect(lance_uri)
    out = {}
    for name, info in inputs.items():
        version = int(info["version"])
        rows = info.get("rows")
        if rows is None:
            rows = open_table(db, name).to_lance().checkout_version(version).count_rows()
        out[name] = {**info, "rows": rows, "tag": pin(db, name, version)}
    return out


def _plan(config: SftConfig | MemoryTrainConfig, inputs: dict[str, dict[str, Any]], sources: list[Path]) -> TrainPlan:
    inputs = pin_inputs(config.lance_uri, inputs)
    code = code_version(sources=sources)
    fp = fingerprint(config.fingerprint_fields(), {k: v["version"] for k, v in inputs.items()}, code["source_hash"])
    existing = None if config.force else ArtifactStore(config.artifacts_dir).find(config.artifact, fp)
    return TrainPlan(config.artifact, fp, inputs, code, existing)


@contextmanager
def exclusive(config: SftConfig | MemoryTrainConfig, plan: TrainPlan) -> Iterator[TrainPlan]:
    """Hold the fingerprint's training lock (an flock beside its checkpoint folder, which the run
    removes when it publishes) and yield the plan with its artifact looked up again under the lock:
    a run that waited usually finds the version the other one published, and trains nothing."""
    lock = config.checkpoints_dir / f"{plan.fingerprint}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger().info("another run is training %s with fingerprint %s; waiting for it", plan.artifact,
                          plan.fingerprint)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            existing = None if config.force else ArtifactStore(config.artifacts_dir).find(config.artifact,
                                                                                          plan.fingerprint)
            yield dataclasses.replace(plan, existing=existing)
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# --- SFT ------------------------------------------------------------------------------------


def validated_reminders(lance_uri: str, pinned: int | str | None) -> tuple[int, ValidationReport]:
    """The reminders version to train on: the pinned one, which must pass the reminders suite, or
    else the newest version that passes it (the reminders flow writes only after its gate, but
    anything can write a table; the suite is the definition of "validated")."""
    from schemas.expectations import reminders_suite

    db = connect(lance_uri)
    if not table_exists(db, "reminders"):
        raise FileNotFoundError(f"no reminders table under {lance_uri}: run `mmem reminders` first")
    tbl = open_table(db, "reminders")
    if pinned is not None:
        version = resolve_versions(db, ["reminders"], {"reminders": pinned})["reminders"]
        candidates = [version]
    else:
        candidates = sorted((v["version"] for v in tbl.list_versions()), reverse=True)[:MAX_VERSIONS_CHECKED]
    failures = []
    for version in candidates:
        rows = read(db, "reminders", version=version)
        if len(rows) == 0:
            continue
        report = validate(rows, reminders_suite(), table_name=f"reminders@v{version}")
        if report.success:
            return version, report
        failures.append(report.markdown())
    raise ValidationFailed("no validated reminders version among " + ", ".join(map(str, candidates)) + "\n"
                           + "\n".join(failures))


def plan_sft(config: SftConfig) -> TrainPlan:
    from training.sft import base_path

    base_path(config)  # a missing local base fails here, before the data is read and validated
    version, report = validated_reminders(config.lance_uri, config.reminders_version)
    logger().info("SFT input: reminders@v%d (%d rows, suite %s passed)", version, report.rows, report.suite)
    return _plan(config, {"reminders": {"version": version, "rows": report.rows, "validated": report.suite}},
                 SFT_SOURCES)


def stored_image_paths(lance_uri: str, image_ids: list[int]) -> dict[int, Path]:
    """image_id -> file, from the ``images`` table (root recorded at ingest + relative path)."""
    db = connect(lance_uri)
    if not table_exists(db, "images") or not image_ids:
        return {}
    tbl = read(db, "images", where=f"image_id IN ({', '.join(map(str, image_ids))})")
    if "root" not in tbl.column_names:
        return {}
    data_root = Path(lance_uri).parent
    return {r["image_id"]: Path(stored_root(r["root"], data_root)) / r["path"]
            for r in tbl.select(["image_id", "root", "path"]).to_pylist() if r["root"]}


def run_sft(config: SftConfig, plan: TrainPlan) -> ArtifactVersion:
    """Train the LoRA adapter (resuming from the plan's checkpoints) and publish it as a version."""
    from transformers import TrainerCallback

    from training.sft import base_path, build_examples, drop_too_long, load_processor, save_adapter, train_sft

    db = connect(config.lance_uri)
    rows = read(db, "reminders", version=plan.inputs["reminders"]["version"])
    data = build_examples(rows, config, stored_image_paths(config.lance_uri, rows.column("image_id").to_pylist()))
    data = drop_too_long(data, load_processor(base_path(config)), config.max_seq_length)
    quarantine(db, "train_sft", data.rejections, run_id())
    log = logger()
    log.info("SFT data: %d train / %d held-out dialogs, %d quarantined %s", len(data.train), len(data.held_out),
             len(data.rejections), reason_counts(data.rejections))

    class ProgressCallback(TrainerCallback):  # the Trainer's steps as a progress bar + Prefect log lines
        bar: Progress | None = None

        def on_train_begin(self, args, state, control, **kw):
            self.bar = Progress(state.max_steps, "train sft")
            self.bar(state.global_step)

        def on_step_end(self, args, state, control, **kw):
            self.bar(1)

        def on_train_end(self, args, state, control, **kw):
            self.bar.close()

    ckpt = plan.checkpoints(config)
    run = train_sft(config, data, ckpt, callbacks=[ProgressCallback()])
    log.info("SFT backend %s (%s); metrics %s", run.backend, run.backend_reason, run.metrics)
    art = ArtifactStore(config.artifacts_dir).publish(
        config.artifact, lambda folder: save_adapter(run, folder, data, copy_base=config.tiny),
        kind="lora-adapter", inputs=plan.inputs, config=config.model_dump(mode="json"), code=plan.code,
        metrics=run.metrics, fingerprint_=plan.fingerprint,
        extra={"backend": run.backend, "backend_reason": run.backend_reason, "resumed_from_step": run.resumed_from,
               "base": {"path": str(run.base), "tiny": config.tiny},
               "data": {"train": len(data.train), "held_out": len(data.held_out),
                        "quarantined": len(data.rejections)}},
    )
    shutil.rmtree(ckpt, ignore_errors=True)  # the version holds the result now
    return art


# --- memory model -----------------------------------------------------------------------------


def plan_memory(config: MemoryTrainConfig) -> TrainPlan:
    from training.memory_model import MEMORY_INPUTS, preflight

    preflight(config)  # a missing local LM, or 4-bit without CUDA, fails before any data is read
    db = connect(config.lance_uri)
    missing = [n for n in MEMORY_INPUTS if not table_exists(db, n)]
    if missing:
        raise FileNotFoundError(f"tables {missing} are missing under {config.lance_uri}: run ingest and embed first")
    versions = resolve_versions(db, MEMORY_INPUTS, config.table_versions)
    return _plan(config, {n: {"version": v} for n, v in versions.items()}, MEMORY_SOURCES)


def run_memory(config: MemoryTrainConfig, plan: TrainPlan) -> ArtifactVersion:
    """Train the memory model (resuming from the plan's checkpoints) and publish it as a version."""
    from training.memory_loop import train_memory
    from training.memory_model import (
        build_memory_data,
        build_memory_model,
        read_memory_inputs,
        resolve_device,
        save_memory_model,
    )

    log = logger()
    device = resolve_device(config.device)
    model = build_memory_model(config, device)
    pins = {n: i["version"] for n, i in plan.inputs.items()}
    loaded = read_memory_inputs(config.lance_uri, [config.split, config.eval_split], pins)
    with Progress(len(loaded.turns) * 2, "tokenize turns") as bar:
        train, rejections = build_memory_data(loaded, config.split, model.tokenizer, model.arch,
                                              limit_dialogs=config.limit, progress=bar)
        evaluation = None
        if config.eval_limit and config.eval_split != config.split:
            evaluation, more = build_memory_data(loaded, config.eval_split, model.tokenizer, model.arch,
                                                 limit_samples=config.eval_limit, progress=bar)
            rejections += more
    quarantine(connect(config.lance_uri), "train_memory", rejections, run_id())
    log.info("memory data: %d train samples (%d dialogs), %d eval samples; %d dialogs quarantined %s; device %s",
             len(train), len(train.image_ids), len(evaluation) if evaluation else 0, len(rejections),
             reason_counts(rejections), device)
    from training.memory_loop import total_steps

    ckpt = plan.checkpoints(config)
    with Progress(total_steps(len(train), config), "train memory") as bar:
        result = train_memory(model, train.to(device), evaluation.to(device) if evaluation else None, config, ckpt,
                              device=device, progress=bar)
    log.info("memory model: %d steps (resumed from %d); metrics %s", result.steps, result.resumed_from, result.metrics)

    def write(folder: Path) -> None:
        save_memory_model(model, folder, copy_llm=config.tiny)
        (folder / "history.json").write_text(json.dumps(result.history))
        split = {"train": train.image_ids.tolist(), "eval": evaluation.image_ids.tolist() if evaluation else []}
        (folder / "data_split.json").write_text(json.dumps(split))

    art = ArtifactStore(config.artifacts_dir).publish(
        config.artifact, write, kind="memory-model", inputs=plan.inputs, config=config.model_dump(mode="json"),
        code=plan.code, metrics=result.metrics, fingerprint_=plan.fingerprint,
        extra={"resumed_from_step": result.resumed_from, "device": str(device),
               "trainable": sorted(model.trainable_modules()),
               "data": {"train_samples": len(train), "eval_samples": len(evaluation) if evaluation else 0,
                        "quarantined": len(rejections)}},
    )
    shutil.rmtree(ckpt, ignore_errors=True)
    return art


# --- publication ------------------------------------------------------------------------------


def manifest_markdown(art: ArtifactVersion) -> str:
    m = art.manifest
    lines = [f"## Artifact `{art.ref}` ({m.get('kind')})", "", f"`{art.path}`", "",
             "| field | value |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in art.summary().items()]
    lines += ["", "| metric | value |", "| --- | --- |"] + [f"| {k} | {v} |" for k, v in m.get("metrics", {}).items()]
    lines += ["", "| input table | Lance version |", "| --- | --- |"]
    lines += [f"| {k} | {v.get('version')} |" for k, v in m.get("inputs", {}).items()]
    lines += ["", "<details><summary>config</summary>", "", "```json", json.dumps(m.get("config"), indent=2), "```",
              "", "</details>"]
    return "\n".join(lines)


def announce(art: ArtifactVersion, created: bool) -> None:
    """A link and a markdown summary as Prefect artifacts; a new version also emits
    ``mmem.artifact.created``, on which a deployment trigger starts evaluation."""
    if not in_prefect_run():
        return
    create_link_artifact(key=artifact_key(f"model-{art.name}"), link=art.path.resolve().as_uri(), link_text=art.ref,
                         description=f"Model artifact {art.ref}")
    publish_markdown(f"model-{art.name}-manifest", manifest_markdown(art), f"Manifest of {art.ref}")
    if created:
        emit_event(
            event=ARTIFACT_CREATED_EVENT,
            resource={"prefect.resource.id": f"mmem.artifact.{art.name}.v{art.version}",
                      "prefect.resource.name": art.ref, "mmem.artifact.name": art.name,
                      "mmem.artifact.version": str(art.version), "mmem.artifact.ref": art.ref,
                      "mmem.artifact.kind": str(art.manifest.get("kind")), "mmem.artifact.path": str(art.path)},
            payload={"metrics": art.manifest.get("metrics", {}), "inputs": art.manifest.get("inputs", {})},
        )


# --- Prefect task wrappers -------------------------------------------------------------------

# Inputs are identified by Lance versions inside the plan's fingerprint; Prefect need not hash them.
plan_sft_task = task(plan_sft, name="plan-sft", cache_policy=NO_CACHE)
plan_memory_task = task(plan_memory, name="plan-memory-model", cache_policy=NO_CACHE)
# A retry resumes from the newest checkpoint, so a crash mid-run costs at most one checkpoint interval.
train_sft_task = task(run_sft, name="train-sft", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=10)
train_memory_task = task(run_memory, name="train-memory-model", cache_policy=NO_CACHE, retries=1,
                         retry_delay_seconds=10)
announce_task = task(announce, name="publish-artifact", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
