"""``mmem``: the command line. Each stage adds its commands from its own ``cli/<stage>.py``
module (a ``register(app)`` function), so this file stays a table of contents.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import typer

from cli.common import STATE, DataRootOpt, ProfileOpt, quiet_prefect

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="multimodal-memory: VisDial -> multimodal long-term memory, as Prefect flows over Lance tables.",
)


@app.callback()
def main(data_root: DataRootOpt = None, profile: ProfileOpt = None) -> None:
    from schemas.config import TRUSTED_ENV

    # A command line is the trusted process: its options and profile are its own choice, never
    # checked against an allow-list it may have inherited (`mmem serve` writes its own).
    os.environ.pop(TRUSTED_ENV, None)
    STATE.data_root = data_root
    STATE.profile = profile
    quiet_prefect()


# "serve" after "pipeline": it puts the --allow-* options in front of pipeline's `mmem serve`
STAGE_MODULES = (
    "ingest",
    "tables",
    "embed",
    "reminders",
    "llm",
    "train",
    "evaluate",
    "memory",
    "pipeline",
    "serve",
)

for _name in STAGE_MODULES:
    try:
        _mod = importlib.import_module(f"cli.{_name}")
    except ModuleNotFoundError as exc:  # a stage whose commands are not written yet
        if exc.name != f"cli.{_name}":
            raise
        continue
    _mod.register(app)


if __name__ == "__main__":
    app()


__all__ = ["Path", "app"]
