"""What an LLM call is: the request (and its cache key) and the result, as every stage uses them.

``LLMRequest.request_hash`` is the cache key: a hash of model, options and the full messages with
every image replaced by the SHA-256 of its bytes, so a cached re-run never reads an image.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import orjson

from schemas.reminders import options_record, prompt_records

OK, ERROR, REJECTED = "ok", "error", "rejected"  # llm_responses.status: done / retry later / do not retry


class LLMUnavailable(RuntimeError):
    """The server does not answer or lacks the model: nothing to fan out to. The message says what to run."""


class HostUnreachable(LLMUnavailable):
    """No server answers at the host (refused, timed out): one of several hosts may come back later."""


def full_name(name: str) -> str:
    """A model name with its tag (``gemma3`` -> ``gemma3:latest``), as a server lists it."""
    return name if ":" in name else f"{name}:latest"


@dataclass(frozen=True)
class ImageRef:
    """An image a message carries: read only when a call is really made."""

    path: str
    sha256: str

    def read(self) -> bytes:
        """The bytes to send (the client base64-encodes them), checked against the ingested hash."""
        data = Path(self.path).read_bytes()
        if hashlib.sha256(data).hexdigest() != self.sha256:
            raise ValueError(f"{self.path} changed since it was ingested (content hash differs)")
        return data


@dataclass(frozen=True)
class LLMRequest:
    model: str
    messages: tuple[dict, ...]  # {"role", "content", optional "images": tuple[ImageRef, ...]}
    options: dict = field(default_factory=dict)

    @cached_property
    def prompt_json(self) -> str:
        """The messages as canonical JSON (sorted keys, UTF-8), each image replaced by its content hash."""
        msgs = [{k: ([f"sha256:{i.sha256}" for i in v] if k == "images" else v) for k, v in m.items()}
                for m in self.messages]
        return orjson.dumps(msgs, option=orjson.OPT_SORT_KEYS).decode()

    @cached_property
    def request_hash(self) -> str:
        key = orjson.dumps({"model": self.model, "options": self.options}, option=orjson.OPT_SORT_KEYS)
        return hashlib.sha256(key + b"\n" + self.prompt_json.encode()).hexdigest()

    def wire_messages(self) -> list[dict]:
        return [{k: ([i.read() for i in v] if k == "images" else v) for k, v in m.items()}
                for m in self.messages]


@dataclass
class LLMResult:
    request_hash: str
    status: str
    response: str | None = None
    error: str | None = None
    attempts: int = 0
    latency_s: float = 0.0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    backend: str | None = None

    def row(self, req: LLMRequest, host: str) -> dict[str, Any]:
        """The ``llm_responses`` row of this call."""
        return {
            "request_hash": self.request_hash, "model": req.model, "host": host,
            "options": options_record(req.options), "prompt": prompt_records(orjson.loads(req.prompt_json)),
            "response": self.response, "status": self.status, "error": self.error, "attempts": self.attempts,
            "latency_s": self.latency_s, "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens, "backend": self.backend,
            "created_at": datetime.now(UTC).isoformat(),
        }
