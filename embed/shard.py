"""A computed shard, and its persisted form: JSON of one pydantic type with the rows as an Arrow IPC
stream, so that reading a cached result back never runs code (``tasks.embed.ShardResults`` refuses
anything else)."""

from __future__ import annotations

import base64
import dataclasses
import os
import socket
from dataclasses import dataclass, field

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

    def payload(self) -> ShardPayload:
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, self.rows.schema) as writer:
            writer.write_table(self.rows)
        return ShardPayload(
            kind=self.kind, index=self.index, key=self.key, rows=base64.b64encode(sink.getvalue()).decode(),
            rejections=[RejectionModel(key=r.key, reason=str(r.reason), record=r.record, detail=r.detail)
                        for r in self.rejections],
            seconds=self.seconds, stream=StreamModel(**dataclasses.asdict(self.stream)), worker=self.worker)

    @classmethod
    def from_payload(cls, p: ShardPayload) -> ShardResult:
        """The shard back from its JSON: the rows must be exactly the output table's schema."""
        rows = pa.ipc.open_stream(pa.py_buffer(base64.b64decode(p.rows, validate=True))).read_all()
        expected = (IMAGE_EMBEDDINGS if p.kind == "image" else TEXT_EMBEDDINGS).schema
        if [(f.name, f.type) for f in rows.schema] != [(f.name, f.type) for f in expected]:
            raise ValueError(f"shard {p.key}: persisted rows do not have the {OUTPUT[p.kind]} schema")
        return cls(p.kind, p.index, p.key, rows,
                   [Rejection(r.key, Reason(r.reason), r.record, r.detail) for r in p.rejections], p.seconds,
                   StreamStats(**p.stream.model_dump()), p.worker)


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
    """A computed shard as its task's persisted result: JSON, the rows as an Arrow IPC stream (base64)."""

    model_config = ConfigDict(extra="forbid")

    kind: Kind
    index: int
    key: str
    rows: str
    rejections: list[RejectionModel]
    seconds: float
    stream: StreamModel
    worker: str
