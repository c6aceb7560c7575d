"""Memory: the ``memories`` table and the memory config."""

from __future__ import annotations

from typing import ClassVar

import pyarrow as pa
from pydantic_settings import SettingsConfigDict

from schemas.config import StageConfig
from schemas.embed import EMBED_DIM
from schemas.tables import register

MEMORIES = register(
    "memories",
    pa.schema(
        [
            pa.field("memory_id", pa.string(), nullable=False),
            pa.field("owner", pa.string(), nullable=False),
            pa.field("modality", pa.string(), nullable=False),  # text | image
            pa.field("text", pa.string()),
            pa.field("image_ref", pa.string()),
            pa.field("vector", pa.list_(pa.float32(), EMBED_DIM), nullable=False),
            pa.field("created_at", pa.timestamp("us", tz="UTC"), nullable=False),
            pa.field("last_accessed_at", pa.timestamp("us", tz="UTC"), nullable=False),
            pa.field("access_count", pa.int64(), nullable=False),
            pa.field("saliency", pa.float32(), nullable=False),
            pa.field("kind", pa.string(), nullable=False),  # transient | durable
            pa.field("subject_key", pa.string()),
            pa.field("superseded_by", pa.string()),
            pa.field("session_id", pa.string()),
        ]
    ),
    key=("memory_id",),
    doc="An agent's long-term multimodal memories.",
)


class MemoryConfig(StageConfig):
    """Memory settings (section ``[memory]``, env ``MMEM_MEMORY_*``)."""

    model_config = SettingsConfigDict(env_prefix="MMEM_MEMORY_")
    section: ClassVar[str] = "memory"
