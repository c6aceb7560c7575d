"""``mmem demo-data`` and ``mmem ingest``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.common import DataRootOpt, echo, load, run_flow


def register(app: typer.Typer) -> None:
    app.command("demo-data")(demo_data)
    app.command("ingest")(ingest)


def demo_data(
    out: Annotated[Path, typer.Option(help="Folder to write the dataset into.")] = Path("mmem-data/demo"),
    dialogs: Annotated[int, typer.Option(help="Train dialogs (one image each).")] = 40,
    val_dialogs: Annotated[
        int | None, typer.Option(help="Val dialogs (default: a fifth of --dialogs).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Everything is a function of the seed.")] = 0,
    workers: Annotated[int, typer.Option(help="Processes drawing images.")] = 2,
    photos: Annotated[
        bool,
        typer.Option(
            help="Photo-like JPEGs and diverse dialogs: the real data's cost "
            "shape (benchmarks), not answers true about the images."
        ),
    ] = False,
) -> None:
    """Write the deterministic demo dataset: JPEG scenes, VisDial v1.0 JSON and COCO captions."""
    from ingest.demo_data import write_demo

    paths = write_demo(out, dialogs, seed=seed, val_dialogs=val_dialogs, workers=workers, progress=True,
                       photos=photos)
    echo({s: {k: str(v) for k, v in p.items()} for s, p in paths.items()})


def ingest(
    visdial: Annotated[Path, typer.Option(help="visdial_1.0_<split>.json")],
    images: Annotated[Path, typer.Option(help="The split's image folder.")],
    coco: Annotated[Path | None, typer.Option(help="COCO annotation file (image file names).")] = None,
    workers: Annotated[int | None, typer.Option(help="Image-checking processes.")] = None,
    data_root: DataRootOpt = None,
) -> None:
    """Clean a VisDial split into the Lance tables images, dialogs, turns and quarantine."""
    from flows.ingest import ingest_flow
    from ingest.visdial import VisdialFormatError
    from schemas.validate import ValidationFailed

    config = load(_ingest_config(), data_root, visdial=visdial, images=images, coco=coco, workers=workers)
    run_flow(ingest_flow, config, errors=(VisdialFormatError, FileNotFoundError, ValidationFailed))


def _ingest_config():
    from schemas.ingest import IngestConfig

    return IngestConfig
