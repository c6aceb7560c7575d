"""Evaluate: the ``evaluations`` table and the evaluate config."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import pyarrow as pa
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from schemas.config import StageConfig
from schemas.tables import register

EVALUATIONS = register(
    "evaluations",
    pa.schema(
        [
            pa.field("run_id", pa.string(), nullable=False),
            pa.field("variant", pa.string(), nullable=False),
            pa.field("metric", pa.string(), nullable=False),
            pa.field("value", pa.float64(), nullable=False),
            pa.field("n", pa.int64(), nullable=False),
            pa.field("model_artifact", pa.string()),
            pa.field("dataset_version", pa.string()),
            pa.field("backbone", pa.string()),
            pa.field("created_at", pa.timestamp("us", tz="UTC")),
        ]
    ),
    key=("run_id", "variant", "metric"),
    doc="One metric value of one model variant in one evaluation run.",
)


class EvaluateConfig(StageConfig):
    """Parameters of the evaluate flow (section ``[evaluate]``, env ``MMEM_EVALUATE_*``)."""

    model_config = SettingsConfigDict(env_prefix="MMEM_EVALUATE_")
    section: ClassVar[str] = "evaluate"

    variants: Path | None = Field(default=None, description="TOML file of model variants.")
    limit: int | None = Field(default=None, ge=1)
