"""``mmem train sft``, ``mmem train memory`` and ``mmem artifacts list``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from cli.common import DataRootOpt, fail, load, run_flow
from schemas.config import StageConfig

train_app = typer.Typer(no_args_is_help=True, help="Train models into versioned artifacts.")
artifacts_app = typer.Typer(no_args_is_help=True, help="The model artifact store.")

TinyOpt = Annotated[
    bool, typer.Option("--tiny", help="Tiny random-weight model of the same architecture (demo, tests).")
]
MaxStepsOpt = Annotated[int | None, typer.Option(help="Stop after N optimiser steps.")]
LimitOpt = Annotated[int | None, typer.Option(help="Only the first N train dialogs.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Train again even if this exact run has a version.")]
DeviceOpt = Annotated[str | None, typer.Option(help="auto, cuda or cpu.")]
# What a training command reports as one line: missing inputs or models, a refused option, a
# missing optional package, a failed run or data-quality gate.
TRAIN_ERRORS = (FileNotFoundError, ValueError, ImportError, RuntimeError)


def register(app: typer.Typer) -> None:
    app.add_typer(train_app, name="train")
    app.add_typer(artifacts_app, name="artifacts")


def _load(cls: type[StageConfig], data_root: Path | None, **overrides) -> StageConfig:
    """The config, or one line naming each refused field (e.g. an artifact name that is a path)."""
    from pydantic import ValidationError

    try:
        return load(cls, data_root, **overrides)
    except ValidationError as exc:
        fail("; ".join(f"{'.'.join(map(str, e['loc'])) or cls.__name__}: {e['msg']}" for e in exc.errors()))


def _exclusive(path: Path | None, tiny: bool, name: str) -> None:
    if path is not None and tiny:
        fail(f"give either {name} or --tiny, not both")


@train_app.command("sft")
def sft(
    base: Annotated[Path | None, typer.Option(help="Local gemma-3-4b-it folder (HF layout).")] = None,
    tiny: TinyOpt = False,
    backend: Annotated[str | None, typer.Option(help="auto (unsloth on CUDA), unsloth or peft.")] = None,
    reminders_version: Annotated[
        str | None, typer.Option(help="Pinned reminders version (number or tag).")
    ] = None,
    max_steps: MaxStepsOpt = None,
    limit: LimitOpt = None,
    device: DeviceOpt = None,
    force: ForceOpt = False,
    data_root: DataRootOpt = None,
) -> None:
    """LoRA-tune Gemma3 (vision + language) on the validated reminders; prints the artifact version."""
    from flows.train import train_sft_flow
    from schemas.train import SftConfig
    from storage.lance import version_ref

    _exclusive(base, tiny, "--base")
    config = _load(SftConfig, data_root, base=base, tiny=tiny or None, backend=backend, max_steps=max_steps,
                  limit=limit, device=device, force=force or None,
                  reminders_version=version_ref(reminders_version))
    # a failed data-quality gate (ValidationFailed) is a RuntimeError
    run_flow(train_sft_flow, config, errors=TRAIN_ERRORS)


@train_app.command("memory")
def memory(
    llm: Annotated[Path | None, typer.Option(help="Local LLaMA-3.2-1B folder (HF layout).")] = None,
    tiny: TinyOpt = False,
    load_in_4bit: Annotated[
        bool | None, typer.Option("--4bit/--no-4bit", help="Frozen LM in 4-bit (CUDA).")
    ] = None,
    train_qformer: Annotated[bool | None, typer.Option("--train-qformer/--freeze-qformer")] = None,
    infonce_weight: Annotated[
        float | None, typer.Option(help="Weight of the multi-positive InfoNCE loss.")
    ] = None,
    max_steps: MaxStepsOpt = None,
    limit: LimitOpt = None,
    device: DeviceOpt = None,
    force: ForceOpt = False,
    data_root: DataRootOpt = None,
) -> None:
    """Train the ImageBind memory model on the stored embeddings; prints the artifact version."""
    from flows.train import train_memory_flow
    from schemas.train import MemoryTrainConfig

    _exclusive(llm, tiny, "--llm")
    config = _load(
        MemoryTrainConfig,
        data_root,
        llm=llm,
        tiny=tiny or None,
        load_in_4bit=load_in_4bit,
        train_qformer=train_qformer,
        infonce_weight=infonce_weight,
        max_steps=max_steps,
        limit=limit,
        device=device,
        force=force or None,
    )
    run_flow(train_memory_flow, config, errors=TRAIN_ERRORS)


@artifacts_app.command("list")
def list_artifacts(
    name: Annotated[str | None, typer.Argument(help="Only this artifact.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Manifest summaries as JSON.")] = False,
    data_root: DataRootOpt = None,
) -> None:
    """Every artifact version with its manifest summary (inputs, code, metrics, size)."""
    from storage.artifacts import ArtifactError, ArtifactStore

    store = ArtifactStore(load(StageConfig, data_root).artifacts_dir)
    try:
        versions = store.list(name)
    except (ArtifactError, ValueError) as exc:  # ValueError: a name that is no plain name
        fail(str(exc))
    if name and not versions:
        fail(f"no artifact named {name!r}")
    rows = []
    for art in versions:
        latest = store.get(art.name).version == art.version
        rows.append({**art.summary(), "latest": latest, "path": str(art.path)})
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        typer.echo(f"no artifacts under {store.root}")
    for r in rows:
        typer.echo(f"{r['artifact']}{' (latest)' if r['latest'] else ''}  {r['kind']}  {r['created_at']}  "
                   f"code={r['code']}  {r['files']} files, {r['bytes']} bytes")
        typer.echo(f"    inputs: {r['inputs'] or '-'}")
        typer.echo(f"    metrics: {r['metrics'] or '-'}")
