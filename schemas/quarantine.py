"""The ``quarantine`` table and the reason codes a check may give for dropping a record.

A check returns ``None`` (keep) or a :class:`Rejection`; one writer (``storage.quarantine``)
turns rejections into rows. Nothing disappears silently.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import pyarrow as pa

from schemas.tables import register


class Reason(StrEnum):
    # ingest
    IMAGE_MISSING = "image_missing"
    IMAGE_UNREADABLE = "image_unreadable"
    IMAGE_OUTSIDE_ROOT = "image_outside_root"
    IMAGE_TOO_LARGE = "image_too_large"  # too many pixels (decompression bomb guard)
    IMAGE_FILE_TOO_LARGE = "image_file_too_large"  # more bytes than the ingest limit: never read
    IMAGE_NOT_A_FILE = "image_not_a_file"  # a FIFO, device, socket or folder where an image should be
    BAD_RECORD = "bad_record"  # wrong types / missing keys inside one record
    INDEX_OUT_OF_RANGE = "index_out_of_range"
    GT_INDEX_OUT_OF_RANGE = "gt_index_out_of_range"
    WRONG_TURN_COUNT = "wrong_turn_count"
    EMPTY_TEXT = "empty_text"
    DUPLICATE_ID = "duplicate_id"
    # reminders
    NO_REMINDER = "no_reminder"
    MULTIPLE_REMINDERS = "multiple_reminders"
    EMPTY_REMINDER = "empty_reminder"
    EMPTY_ANSWER = "empty_answer"
    TOO_LONG = "too_long"
    TOO_SHORT = "too_short"
    ECHOED_DIALOG = "echoed_dialog"
    LLM_ERROR = "llm_error"
    # evaluate
    SEEN_IN_TRAINING = "seen_in_training"  # an evaluation dialog the models were trained on
    # train
    EMBEDDING_MISSING = "embedding_missing"  # a dialog whose image or turn vector is not stored


@dataclass(frozen=True)
class Rejection:
    """A record a check refused: its natural key, the reason code, the source record, a detail."""

    key: str
    reason: Reason
    record: Any
    detail: str = ""

    def record_json(self) -> str:
        if isinstance(self.record, (bytes, bytearray)):
            return self.record.decode("utf-8", errors="replace")
        if isinstance(self.record, str):
            return self.record
        return json.dumps(self.record, default=str, ensure_ascii=False)

    def row_id(self, stage: str) -> str:
        """Deterministic id, so a re-run quarantines the same record once, not twice."""
        h = hashlib.sha256(f"{stage}\0{self.key}\0{self.reason}\0{self.record_json()}".encode())
        return h.hexdigest()[:32]


QUARANTINE = register(
    "quarantine",
    pa.schema(
        [
            pa.field("quarantine_id", pa.string(), nullable=False),
            pa.field("stage", pa.string(), nullable=False),
            pa.field("key", pa.string(), nullable=False),
            pa.field("reason", pa.string(), nullable=False),
            pa.field("detail", pa.string()),
            pa.field("record", pa.string()),
            pa.field("run_id", pa.string()),
            pa.field("created_at", pa.timestamp("us", tz="UTC")),
        ]
    ),
    key=("quarantine_id",),
    doc="Every dropped record, with the stage, the natural key, a reason code and the source record.",
)
