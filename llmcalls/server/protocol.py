"""The wire side of the Ollama API this server speaks: its bounds (``Limits``), what a backend is,
how a request body is read and checked (400 for anything it cannot serve), and how an answer is
sent (JSON, or NDJSON chunks when streamed)."""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import orjson
from starlette.requests import Request
from starlette.responses import Response

SERVER_VERSION = "0.6.0-mmem"
MiB = 1 << 20
MAX_IMAGE_PIXELS = 5000 * 5000  # a decoded image past this is refused (a small PNG can inflate to GiBs)


@dataclass(frozen=True)
class Limits:
    """Every bound the server enforces; the defaults suit one user's machine."""

    max_body_bytes: int = 8 * MiB  # 413 past it (one chat request with one photo is well under 1 MiB)
    max_header_bytes: int = 64 * 1024  # request line + headers; 400 past it
    read_timeout_s: float = 20.0  # for the headers, then again for the body; the connection is dropped after
    max_requests: int = 64  # in flight (reading, waiting for the model or generating); 503 past it
    max_connections: int = 512  # open connections, idle keep-alive ones included; 503 past it
    default_ctx: int = 4096  # num_ctx when a request gives none (Ollama's default)
    max_ctx: int = 8192  # num_ctx is clamped to this and to the model's context length
    default_predict: int = 128  # num_predict when a request gives none
    max_predict: int = 1024  # num_predict is clamped to this (-1 / -2, "until done", mean this)
    slice_s: float = 0.05  # model time one generation holds per turn before the next one's turn
    origins: tuple[str, ...] = ()  # extra allowed Origins (patterns with *), e.g. "https://app.example.org"


class BadRequest(ValueError):
    """Something in the request the server cannot serve: answered 400 with this message."""


@dataclass(frozen=True)
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int


class Backend(Protocol):
    kind: str  # "teacher", "hf:<checkpoint>" ... : goes to the client's ``backend`` column
    family: str
    vision: bool

    async def generate(self, messages: list[dict], options: dict) -> Generation: ...


def json_response(obj: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(obj), status_code=status, media_type="application/json")


def now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


async def json_body(request: Request) -> dict:
    """The request body as a JSON object (an empty body is ``{}``), else ``BadRequest``."""
    raw = await request.body()
    try:
        body = orjson.loads(raw) if raw.strip() else {}
    except orjson.JSONDecodeError:
        raise BadRequest("invalid JSON body") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    return body


NUMBER_OPTIONS = {"num_ctx": int, "num_predict": int, "seed": int, "top_k": int, "temperature": float,
                  "top_p": float}


def parse_options(value: Any) -> dict:
    """``options`` with its numeric fields checked (400 for a string, a bool or a non-finite value)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequest("options must be a JSON object")
    out = dict(value)
    for name, kind in NUMBER_OPTIONS.items():
        v = out.get(name)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise BadRequest(f"options.{name} must be a number")
        out[name] = kind(v)
    return out


def parse_message(m: Any) -> dict:
    if not isinstance(m, dict):
        raise BadRequest("each message must be a JSON object")
    if not isinstance(m.get("content") or "", str) or not isinstance(m.get("role") or "", str):
        raise BadRequest("a message's role and content must be strings")
    images = m.get("images") or []
    if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
        raise BadRequest("a message's images must be a list of base64 strings")
    return m


async def stream_answer(model: str, text: str, stats: dict, chat: bool) -> AsyncIterator[bytes]:
    """NDJSON chunks of the answer (word by word), then the final ``done`` record with the stats.
    Every 64 chunks it lets the event loop serve others (a send does not always yield)."""
    for i, found in enumerate(re.finditer(r"\S+\s*|\s+", text)):
        piece = found.group()
        part = {"message": {"role": "assistant", "content": piece}} if chat else {"response": piece}
        yield orjson.dumps({"model": model, "created_at": now(), **part, "done": False}) + b"\n"
        if i % 64 == 63:
            await asyncio.sleep(0)
    last = {"message": {"role": "assistant", "content": ""}} if chat else {"response": ""}
    yield orjson.dumps({"model": model, "created_at": now(), **last, **stats}) + b"\n"
