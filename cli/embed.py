"""``mmem embed`` and ``mmem query``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.common import DataRootOpt, echo, fail, load, run_flow

CheckpointOpt = Annotated[Path | None, typer.Option(help="Local imagebind_huge.pth (never downloaded).")]
TinyOpt = Annotated[bool | None, typer.Option("--tiny", help="Tiny random-weight ImageBind (tests, demo).",
                                               show_default=False)]
DeviceOpt = Annotated[str | None, typer.Option(help="cuda or cpu (default: cuda when available).")]


def register(app: typer.Typer) -> None:
    app.command("embed")(embed)
    app.command("query")(query)


def _config(data_root, checkpoint, tiny, device, **overrides):
    from schemas.embed import EmbedConfig

    if checkpoint is not None and tiny:
        fail("give either --checkpoint or --tiny, not both")
    if device not in (None, "cuda", "cpu"):
        fail(f"--device must be cuda or cpu, not {device!r}")
    return load(EmbedConfig, data_root, checkpoint=checkpoint, tiny=tiny, device=device, **overrides)


def embed(
    checkpoint: CheckpointOpt = None,
    tiny: TinyOpt = None,
    device: DeviceOpt = None,
    dask_address: Annotated[str | None, typer.Option(help="Run the shards on this Dask scheduler.")] = None,
    shard_rows: Annotated[int | None, typer.Option(help="Rows per shard (one Prefect task each).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Images or texts per forward pass.")] = None,
    data_root: DataRootOpt = None,
) -> None:
    """Embed every ingested image and distinct turn text / caption with ImageBind into Lance."""
    from embed.weights import CheckpointError
    from flows.embed import embed_flow

    config = _config(data_root, checkpoint, tiny, device, dask_address=dask_address, shard_rows=shard_rows,
                     batch_size=batch_size)
    run_flow(embed_flow, config, errors=(FileNotFoundError, CheckpointError, ValueError))


def query(
    text: Annotated[str | None, typer.Option(help="Find what is nearest to this text.")] = None,
    image: Annotated[Path | None, typer.Option(help="Find what is nearest to this image file.")] = None,
    k: Annotated[int, typer.Option("-k", "--k", min=1, help="Results per table.")] = 10,
    checkpoint: CheckpointOpt = None,
    tiny: TinyOpt = None,
    device: DeviceOpt = None,
    data_root: DataRootOpt = None,
) -> None:
    """The nearest images and turns/captions to a text or an image, with their dialog context."""
    from embed.query import query as run_query
    from embed.weights import CheckpointError

    if (text is None) == (image is None):
        fail("give exactly one of --text or --image")
    config = _config(data_root, checkpoint, tiny, device)
    try:
        result = run_query(config, text=text, image=image, k=k)
    except (FileNotFoundError, CheckpointError, LookupError, ValueError, OSError) as exc:
        fail(str(exc))
    echo(result)
