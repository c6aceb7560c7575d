"""Ingest: the ``images``, ``dialogs`` and ``turns`` tables and the ingest flow's config."""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar

import pyarrow as pa
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from schemas.config import StageConfig
from schemas.results import StageResult
from schemas.tables import register

NUM_TURNS = 10
NUM_OPTIONS = 100

# Upper bounds of the ingest parameters: a run's parameters (anyone who reaches the Prefect API
# can set them) must not be able to ask for a million processes or gigabytes per image.
MAX_WORKERS = max(64, 4 * (os.cpu_count() or 1))  # a profile from a bigger machine still loads
MAX_IMAGE_PIXELS = 1_000_000_000
MAX_IMAGE_BYTES = 1_000_000_000

IMAGES = register(
    "images",
    pa.schema(
        [
            pa.field("image_id", pa.int64(), nullable=False),
            pa.field("split", pa.string(), nullable=False),
            pa.field("path", pa.string(), nullable=False),  # relative to the image root
            pa.field("width", pa.int32(), nullable=False),
            pa.field("height", pa.int32(), nullable=False),
            pa.field("mode", pa.string()),
            pa.field("num_bytes", pa.int64()),
            pa.field("sha256", pa.string(), nullable=False),
            pa.field("root", pa.string()),  # the folder ``path`` is in: relative to the data root if under it
        ]
    ),
    key=("image_id",),
    doc="One row per usable image: where it is, its size and its content hash.",
)

DIALOGS = register(
    "dialogs",
    pa.schema(
        [
            pa.field("image_id", pa.int64(), nullable=False),
            pa.field("split", pa.string(), nullable=False),
            pa.field("caption", pa.string(), nullable=False),
            pa.field("caption_hash", pa.string(), nullable=False),  # key into text_embeddings
            pa.field("source", pa.string()),
        ]
    ),
    key=("image_id",),
    doc="One dialog per image (VisDial): its caption.",
)

TURNS = register(
    "turns",
    pa.schema(
        [
            pa.field("image_id", pa.int64(), nullable=False),
            pa.field("turn", pa.int8(), nullable=False),  # 1..10
            pa.field("split", pa.string(), nullable=False),
            pa.field("question", pa.string(), nullable=False),
            pa.field("answer", pa.string(), nullable=False),
            pa.field("gt_index", pa.int16(), nullable=False),
            # 100 option strings; a variable list because Lance panics on fixed-size lists of strings
            pa.field("answer_options", pa.list_(pa.string())),
            pa.field("text_hash", pa.string(), nullable=False),  # key into text_embeddings
        ]
    ),
    key=("image_id", "turn"),
    doc="Ten question/answer turns per dialog, with the 100 answer options and the ground-truth index.",
)


class IngestConfig(StageConfig):
    """Parameters of the ingest flow (section ``[ingest]``, env ``MMEM_INGEST_*``)."""

    model_config = SettingsConfigDict(env_prefix="MMEM_INGEST_")
    section: ClassVar[str] = "ingest"

    visdial: Path = Field(description="A VisDial v1.0 JSON file (visdial_1.0_<split>.json).")
    images: Path = Field(description="The folder holding that split's images.")
    coco: Path | None = Field(default=None, description="Optional COCO annotation file (file names by id).")
    workers: int = Field(
        default=2, ge=1, le=MAX_WORKERS, description="Processes that decode and hash images."
    )
    max_image_pixels: int = Field(
        default=50_000_000, ge=1, le=MAX_IMAGE_PIXELS,
        description="Decompression-bomb guard: larger images are quarantined.",
    )
    max_image_bytes: int = Field(
        default=50_000_000, ge=1, le=MAX_IMAGE_BYTES,
        description="Image files larger than this are quarantined unread (a COCO JPEG is well under 1 MB).",
    )


class IngestResult(StageResult):
    """What an ingest run did: the versions it wrote (``images``, ``dialogs``, ``turns``,
    ``quarantine``) and the rows kept and dropped, per reason. Ingest reads no table."""

    counts: dict[str, int] = Field(default_factory=dict, description="Rows in, kept, and dropped per reason.")
