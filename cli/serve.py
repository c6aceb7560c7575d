"""``mmem serve`` with its allow-list options: which values a run started through the API may name.

The command itself lives in ``cli/pipeline.py``; this module puts the ``--allow-*`` options in
front of it (they become the serving process's ``schemas.config.Trusted`` allow-list, which
``deployments.serve.serve_all`` completes from the profile and exports to every run).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.common import DataRootOpt, ProfileOpt, fail


def register(app: typer.Typer) -> None:
    app.registered_commands = [c for c in app.registered_commands if c.name != "serve"]
    app.command("serve")(serve)


def serve(
    data_root: DataRootOpt = None,
    profile: ProfileOpt = None,
    allow_ollama_host: Annotated[list[str] | None, typer.Option(
        help="An Ollama host a run may name besides the profile's (repeatable). It gets no token unless the "
             "profile binds one to it (ollama_auth).")] = None,
    allow_dask_address: Annotated[list[str] | None, typer.Option(
        help="A tls:// Dask scheduler a run may name (repeatable); `local` is always allowed.")] = None,
    allow_data_root: Annotated[list[Path] | None, typer.Option(
        help="Another data root a run may name (repeatable).")] = None,
) -> None:
    """Register a deployment per flow and for the pipeline with the server, and run what it schedules.
    A run may name only the data root, Dask scheduler and Ollama hosts of the profile (or --allow-*)."""
    from cli import pipeline
    from cli.common import STATE
    from deployments.serve import trust_profile

    try:  # the whole allow-list (profile + options) first: serving builds configs under it
        trust_profile(
            profile or STATE.profile,
            data_root or STATE.data_root,
            ollama_hosts=allow_ollama_host or (),
            dask_addresses=allow_dask_address or (),
            data_roots=allow_data_root or (),
        ).export()
    except (ValueError, FileNotFoundError) as exc:
        fail(str(exc))
    pipeline.serve(data_root=data_root, profile=profile)
