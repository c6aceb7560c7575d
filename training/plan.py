"""A training run's plan: the input versions it pins, its fingerprint, and the version it already
produced (if any).

A run is identified by its fingerprint: the config fields that change what is trained, the Lance
versions of its input tables and a hash of the training code (:data:`SFT_CODE`,
:data:`MEMORY_CODE`: the modules that decide what is trained, not the orchestration around them).
A run whose fingerprint already has an artifact version is not repeated (``force`` overrides), and
a killed run resumes from the checkpoints kept under ``<data_root>/checkpoints/<artifact>/<fingerprint>/``.
Only one run per fingerprint trains at a time (:func:`exclusive`): the others wait, then find its
version.
"""

from __future__ import annotations

import dataclasses
import fcntl
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from schemas.train import MemoryTrainConfig, SftConfig
from schemas.validate import ValidationFailed, ValidationReport, validate
from storage.artifacts import ArtifactStore, ArtifactVersion, code_version, fingerprint
from storage.lance import connect, open_table, pin, read, require, resolve_versions

log = logging.getLogger("mmem." + __name__)

ROOT = Path(__file__).resolve().parent.parent
# The code a fingerprint hashes: what is trained and how (data building, model, loop, config).
# A change here retrains once; moving the orchestration around it does not.
SFT_CODE = tuple(ROOT / p for p in ("training/sft.py", "training/tiny_models.py", "training/run.py",
                                    "schemas/train.py"))
MEMORY_CODE = tuple(ROOT / p for p in ("training/memory_net.py", "training/memory_data.py",
                                       "training/memory_llm.py", "training/memory_model.py",
                                       "training/memory_loop.py", "training/tiny_llama.py", "training/run.py",
                                       "schemas/train.py"))
MAX_VERSIONS_CHECKED = 10
REMINDERS_HINT = "run `mmem reminders` first"


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


def make_plan(config: SftConfig | MemoryTrainConfig, inputs: dict[str, dict[str, Any]],
              sources: tuple[Path, ...]) -> TrainPlan:
    inputs = pin_inputs(config.lance_uri, inputs)
    code = code_version(sources=sources)
    fp = fingerprint(
        config.fingerprint_fields(), {k: v["version"] for k, v in inputs.items()}, code["source_hash"]
    )
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
            log.info("another run is training %s with fingerprint %s; waiting for it", plan.artifact,
                     plan.fingerprint)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            store = ArtifactStore(config.artifacts_dir)
            existing = None if config.force else store.find(config.artifact, plan.fingerprint)
            yield dataclasses.replace(plan, existing=existing)
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def validated_reminders(lance_uri: str, pinned: int | str | None) -> tuple[int, ValidationReport]:
    """The reminders version to train on: the pinned one, which must pass the reminders suite, or
    else the newest version that passes it (the reminders flow writes only after its gate, but
    anything can write a table; the suite is the definition of "validated")."""
    from schemas.expectations import reminders_suite

    db = connect(lance_uri)
    require(db, ["reminders"], hint=REMINDERS_HINT)
    if pinned is not None:
        candidates = [resolve_versions(db, ["reminders"], {"reminders": pinned})["reminders"]]
    else:
        versions = open_table(db, "reminders").list_versions()
        candidates = sorted((v["version"] for v in versions), reverse=True)[:MAX_VERSIONS_CHECKED]
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
    """The SFT run's plan: the validated reminders version it trains on (a missing local base
    model fails first, before the data is read and validated)."""
    from training.sft import base_path

    base_path(config)
    version, report = validated_reminders(config.lance_uri, config.reminders_version)
    log.info("SFT input: reminders@v%d (%d rows, suite %s passed)", version, report.rows, report.suite)
    return make_plan(
        config, {"reminders": {"version": version, "rows": report.rows, "validated": report.suite}}, SFT_CODE
    )


def plan_memory(config: MemoryTrainConfig) -> TrainPlan:
    """The memory model run's plan: the versions of turns, dialogs and both embedding tables (a
    missing local LM, or 4-bit without CUDA, fails first, before any data is read)."""
    from training.memory_data import INPUTS_HINT, MEMORY_INPUTS
    from training.memory_llm import preflight

    preflight(config)
    db = connect(config.lance_uri)
    versions = resolve_versions(db, MEMORY_INPUTS, config.table_versions, hint=INPUTS_HINT)
    return make_plan(config, {n: {"version": v} for n, v in versions.items()}, MEMORY_CODE)
