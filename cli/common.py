"""Shared command-line state and helpers: the data root, the profile, config loading, output."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from schemas.config import StageConfig

C = TypeVar("C", bound=StageConfig)


@dataclass
class State:
    data_root: Path | None = None
    profile: Path | None = None


STATE = State()

DataRootOpt = Annotated[
    Path | None,
    typer.Option("--data-root", help="Data root (default ./mmem-data or $MMEM_DATA_ROOT).", show_default=False),
]
ProfileOpt = Annotated[Path | None, typer.Option("--profile", help="TOML profile with per-flow sections.")]


def load(cls: type[C], data_root: Path | None = None, **overrides: Any) -> C:
    """The flow config: defaults < profile < MMEM_* env < command-line options."""
    root = data_root or STATE.data_root
    if root is not None:
        overrides["data_root"] = root
    return cls.load(STATE.profile, **overrides)


def quiet_prefect() -> None:
    """No telemetry and no network calls from a command-line run on an offline machine."""
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def fail(message: str, code: int = 1) -> None:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code)
