"""A computed shard, and its persisted form: JSON of one pydantic type naming an Arrow IPC file of
the rows beside it, so that reading a cached result back never runs code (``tasks.embed.ShardResults``
refuses any other JSON; the rows file is data only, checked against its SHA-256 and the table's
schema). The vectors stay binary: a text shard's rows as base64 inside the JSON cost more CPU to
write and read than computing them, in the process that feeds the GPU."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
from pydantic import BaseModel, ConfigDict

from embed.model import StreamStats
from embed.plan import OUTPUT, Kind
from schemas.embed import IMAGE_EMBEDDINGS, TEXT_EMBEDDINGS
from schemas.quarantine import Reason, Rejection


@dataclass
class ShardResult:
    kind: Kind
    index: int
    key: str
    rows: pa.Table  # conforming to the output table's schema
    rejections: list[Rejection]
    seconds: float
    stream: StreamStats = field(default_factory=StreamStats)  # input wait vs forward time
    worker: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")  # who computed it

    @property
    def table(self) -> str:
        return OUTPUT[self.kind]

    def payload(self, rows_dir: str | Path) -> ShardPayload:
        """Write the rows to ``rows_dir/<key>.arrow`` (whole or not at all) and describe them."""
        sink = pa.BufferOutputStream()
        with pa.ipc.new_file(sink, self.rows.schema) as writer:
            writer.write_table(self.rows)
        data = sink.getvalue()
        path = Path(rows_dir) / f"{self.key}.arrow"
        path.parent.mkdir(parents=True, exist_ok=True)
        part = path.with_name(f"{path.name}.{os.getpid()}.part")
        part.write_bytes(data)
        os.replace(part, path)
        return ShardPayload(
            kind=self.kind, index=self.index, key=self.key, rows_file=path.name,
            rows_sha256=hashlib.sha256(data).hexdigest(), num_rows=len(self.rows),
            rejections=[RejectionModel(key=r.key, reason=str(r.reason), record=r.record, detail=r.detail)
                        for r in self.rejections],
            seconds=self.seconds, stream=StreamModel(**dataclasses.asdict(self.stream)), worker=self.worker)

    @classmethod
    def from_payload(cls, p: ShardPayload, rows_dir: str | Path) -> ShardResult:
        """The shard back from its JSON and rows file; :class:`RowsUnreadable` if the file is gone or
        is not what the JSON describes (exactly the output table's schema, the same bytes)."""
        if p.rows_file != f"{p.key}.arrow" or not _KEY.fullmatch(p.key):
            raise RowsUnreadable(f"shard {p.key!r}: rows file {p.rows_file!r} is not the shard's")
        try:
            data = (Path(rows_dir) / p.rows_file).read_bytes()
        except OSError as exc:
            raise RowsUnreadable(f"shard {p.key}: {exc}") from None
        if hashlib.sha256(data).hexdigest() != p.rows_sha256:
            raise RowsUnreadable(f"shard {p.key}: rows file changed since its result was written")
        try:
            rows = pa.ipc.open_file(pa.py_buffer(data)).read_all()
            rows.validate(full=True)  # offsets and lengths inside their buffers before anything reads them
        except (pa.ArrowInvalid, OSError) as exc:
            raise RowsUnreadable(f"shard {p.key}: rows file is not a valid Arrow file ({exc})") from None
        expected = (IMAGE_EMBEDDINGS if p.kind == "image" else TEXT_EMBEDDINGS).schema
        if [(f.name, f.type) for f in rows.schema] != [(f.name, f.type) for f in expected] or \
                len(rows) != p.num_rows:
            raise RowsUnreadable(f"shard {p.key}: persisted rows do not have the {OUTPUT[p.kind]} schema")
        return cls(p.kind, p.index, p.key, rows,
                   [Rejection(r.key, Reason(r.reason), r.record, r.detail) for r in p.rejections], p.seconds,
                   StreamStats(**p.stream.model_dump()), p.worker)


class RowsUnreadable(ValueError):
    """A cached shard result whose rows file cannot be used: the shard must be computed again."""


_KEY = re.compile(r"embed-(image|text)-[0-9a-f]{16,64}")


class RejectionModel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    key: str
    reason: str
    record: dict[str, str | int | float | bool | None]
    detail: str = ""


class StreamModel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    samples: int = 0
    input_wait_s: float = 0.0
    forward_s: float = 0.0
    widths: dict[int, int] = {}


class ShardPayload(BaseModel):
    """A computed shard as its task's persisted result: JSON, the rows in an Arrow IPC file beside it."""

    model_config = ConfigDict(extra="forbid")

    kind: Kind
    index: int
    key: str
    rows_file: str
    rows_sha256: str
    num_rows: int
    rejections: list[RejectionModel]
    seconds: float
    stream: StreamModel
    worker: str
