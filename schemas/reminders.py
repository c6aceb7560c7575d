"""Reminders: the ``llm_responses`` cache, the ``reminders`` table, and the reminders config."""

from __future__ import annotations

from typing import ClassVar

import pyarrow as pa
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from schemas.config import StageConfig
from schemas.tables import register

LLM_RESPONSES = register(
    "llm_responses",
    pa.schema(
        [
            pa.field("request_hash", pa.string(), nullable=False),
            pa.field("model", pa.string(), nullable=False),
            pa.field("host", pa.string()),
            pa.field("options", pa.string()),  # JSON
            pa.field("prompt", pa.string()),  # the messages as JSON, images replaced by their content hash
            pa.field("response", pa.string()),
            pa.field("status", pa.string(), nullable=False),  # ok | error
            pa.field("error", pa.string()),
            pa.field("attempts", pa.int32()),
            pa.field("latency_s", pa.float64()),
            pa.field("prompt_tokens", pa.int32()),
            pa.field("completion_tokens", pa.int32()),
            pa.field("backend", pa.string()),  # what answered: ollama, hf checkpoint, teacher
            pa.field("created_at", pa.timestamp("us", tz="UTC")),
        ]
    ),
    key=("request_hash",),
    doc="Every LLM call, written through as a response cache.",
)

REMINDERS = register(
    "reminders",
    pa.schema(
        [
            pa.field("image_id", pa.int64(), nullable=False),
            pa.field("split", pa.string()),
            pa.field("image_url", pa.string()),
            pa.field("conversation", pa.string(), nullable=False),
            pa.field("response", pa.string(), nullable=False),
            pa.field("reminder", pa.string(), nullable=False),
            pa.field("final_answer", pa.string(), nullable=False),
            pa.field("target_answer", pa.string()),  # the dropped last answer of the dialog
            pa.field("request_hash", pa.string(), nullable=False),
            pa.field("model", pa.string()),
        ]
    ),
    key=("image_id",),
    doc="Valid <reminder> self-reflection samples, one per dialog.",
)


class RemindersConfig(StageConfig):
    """Parameters of the reminders flow (section ``[reminders]``, env ``MMEM_REMINDERS_*``)."""

    model_config = SettingsConfigDict(env_prefix="MMEM_REMINDERS_")
    section: ClassVar[str] = "reminders"

    ollama_host: str | None = Field(default=None, description="Ollama server; default: $OLLAMA_HOST or 127.0.0.1:11434.")
    model: str = "gemma3:27b"
    temperature: float = 0.0
    seed: int = 0
    num_predict: int = 256
    num_ctx: int = 4096
    limit: int | None = Field(default=None, ge=1, description="Only the first N dialogs.")
    shard_size: int = Field(default=256, ge=1)
    concurrency: int = Field(default=8, ge=1, description="Requests in flight per Ollama host.")
    timeout_s: float = Field(default=300.0, gt=0)
    max_attempts: int = Field(default=4, ge=1)
