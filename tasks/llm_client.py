"""The small LLM interface: the official ``ollama`` AsyncClient plus what a days-long run needs.

- ``LLMRequest.request_hash``: the cache key, a hash of model, options and the full messages with
  every image replaced by the SHA-256 of its bytes (so a cached re-run never reads an image).
- ``LLMClient.check``: before fanning out, the server must answer and have the model; otherwise
  fail at once with what to run (``ollama pull gemma3:27b`` or where the server is expected, or
  which header it wants: a 401/403 says so).
- Auth: an ``Authorization`` header resolved when the client is created (``tasks.secrets``: a
  Prefect Secret block named by the config, else ``$MMEM_OLLAMA_AUTH``); it lives only in the
  underlying HTTP client, never in a row, a log line or a message.
- ``LLMClient.chat``: a timeout per try, retries with exponential backoff and jitter (tenacity)
  on 5xx, timeouts and dropped connections; none on a 4xx or a missing model. It never raises for
  a request that merely failed: it returns an ``LLMResult`` whose status says what happened.
- ``Journal`` / ``ResponseCache``: the write-through cache in ``llm_responses``. Each finished
  call is appended at once to its shard's journal (a local JSONL file, flock'd by its writer), so
  a killed process loses only the calls in flight; the flow, the one writer of the table, merges
  journals into Lance as shards finish, and merges orphaned journals of dead runs at start.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import Any, Self

import httpx
import ollama
import orjson
import pyarrow as pa
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from schemas.reminders import LLM_RESPONSES
from storage.lance import conform, connect, dedupe, open_table, table_exists
from tasks.secrets import AUTH_ENV, ollama_auth

OK, ERROR, REJECTED = "ok", "error", "rejected"  # llm_responses.status: done / retry later / do not retry


class LLMUnavailable(RuntimeError):
    """The server does not answer or lacks the model: nothing to fan out to. The message says what to run."""


# --- requests and their cache key ----------------------------------------------------------


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
        return [{k: ([i.read() for i in v] if k == "images" else v) for k, v in m.items()} for m in self.messages]


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
            "options": json.dumps(req.options, sort_keys=True), "prompt": req.prompt_json,
            "response": self.response, "status": self.status, "error": self.error, "attempts": self.attempts,
            "latency_s": self.latency_s, "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens, "backend": self.backend,
            "created_at": datetime.now(UTC).isoformat(),
        }


# --- the client -----------------------------------------------------------------------------


def is_retryable(exc: BaseException) -> bool:
    """5xx (and 429, "come back later"), timeouts, dropped or refused connections."""
    if isinstance(exc, ollama.ResponseError):
        return exc.status_code >= 500 or exc.status_code == 429 or exc.status_code == -1
    return isinstance(exc, (httpx.TransportError, httpx.TimeoutException, TimeoutError, ConnectionError))


def full_name(name: str) -> str:
    return name if ":" in name else f"{name}:latest"


class LLMClient:
    """One host, one model, one retry policy. Use as ``async with LLMClient(...) as c``."""

    def __init__(self, host: str, *, timeout_s: float = 300.0, max_attempts: int = 4, backoff_s: float = 1.0,
                 backoff_max_s: float = 60.0, backend: str | None = None, auth_block: str | None = None) -> None:
        """``auth_block``: the name of a Prefect Secret block holding the ``Authorization`` header
        value; without one, ``$MMEM_OLLAMA_AUTH``; without that, no header (see ``tasks.secrets``)."""
        self.host, self.timeout_s, self.backend = host, timeout_s, backend
        self.max_attempts, self.backoff_s, self.backoff_max_s = max_attempts, backoff_s, backoff_max_s
        self.auth_source = f"Prefect Secret block {auth_block!r}" if auth_block else f"${AUTH_ENV}"
        auth = ollama_auth(auth_block)
        self.authenticated = auth is not None
        # the header goes straight into the HTTP client; this object keeps no copy of it
        headers = {"Authorization": auth.get_secret_value()} if auth is not None else None
        limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
        self._client = ollama.AsyncClient(host=host, timeout=timeout_s, limits=limits, headers=headers)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._client.close()

    async def check(self, model: str) -> str:
        """Fail fast, with the command to run, unless the server answers and has ``model``.
        Returns the backend that will answer (``ollama``, or what ``mmem llm serve`` reports)."""
        try:
            listed = await asyncio.wait_for(self._client.list(), timeout=min(30.0, self.timeout_s))
        except (ConnectionError, httpx.TransportError, TimeoutError, ollama.ResponseError) as exc:
            if isinstance(exc, ollama.ResponseError) and exc.status_code in (401, 403):
                self._refused(exc.status_code)
            raise LLMUnavailable(
                f"no Ollama server answers at {self.host} ({type(exc).__name__}: {exc}). Start one there "
                f"(`ollama serve`, then `ollama pull {model}`), or the local stand-in (`mmem llm serve --teacher`),"
                " and point --ollama-host / OLLAMA_HOST / [reminders] ollama_host at it."
            ) from None
        names = sorted(m.model for m in listed.models if m.model)
        if full_name(model) not in {full_name(n) for n in names}:
            raise LLMUnavailable(
                f"the Ollama server at {self.host} does not have model {model!r} (it has: "
                f"{', '.join(names) or 'none'}). Run `ollama pull {model}` on that server, or pass --model NAME."
            )
        info = await self._client.show(model)
        self.backend = str((info.modelinfo or {}).get("mmem.backend") or "ollama")
        return self.backend

    def _refused(self, status: int) -> None:
        """401/403: say which header is wanted and where it comes from (never its value)."""
        sent = (f"the Authorization header from {self.auth_source} was refused" if self.authenticated
                else "none was sent")
        raise LLMUnavailable(
            f"the Ollama server at {self.host} wants an Authorization header (HTTP {status}) and {sent}. Put the "
            f"header value (e.g. 'Bearer <token>') in a Prefect Secret block and name it in [reminders] "
            f"auth_secret_block, or export {AUTH_ENV}."
        ) from None

    def _retrying(self) -> AsyncRetrying:
        return AsyncRetrying(
            stop=stop_after_attempt(self.max_attempts),
            wait=wait_exponential_jitter(multiplier=self.backoff_s, max=self.backoff_max_s, jitter=self.backoff_s),
            retry=retry_if_exception(is_retryable),
            reraise=True,
        )

    async def chat(self, req: LLMRequest, on_retry=None) -> LLMResult:
        """One request, retried as the policy says. A missing model raises ``LLMUnavailable``."""
        rh = req.request_hash
        try:
            messages = req.wire_messages()
        except (OSError, ValueError) as exc:
            return LLMResult(rh, REJECTED, error=f"image: {exc}", backend=self.backend)
        attempts, t0 = 0, time.perf_counter()
        try:
            async for attempt in self._retrying():
                with attempt:
                    attempts += 1
                    if attempts > 1 and on_retry is not None:
                        on_retry()
                    async with asyncio.timeout(self.timeout_s):
                        resp = await self._client.chat(model=req.model, messages=messages, options=req.options,
                                                       stream=False)
        except ollama.ResponseError as exc:
            if exc.status_code == 404:
                raise LLMUnavailable(f"{exc.error} at {self.host}: run `ollama pull {req.model}` there") from None
            if exc.status_code in (401, 403):  # a revoked token: stop, rather than quarantine every prompt
                self._refused(exc.status_code)
            status = ERROR if is_retryable(exc) else REJECTED
            return LLMResult(rh, status, error=f"HTTP {exc.status_code}: {exc.error}", attempts=attempts,
                             latency_s=time.perf_counter() - t0, backend=self.backend)
        except Exception as exc:
            if not is_retryable(exc):
                raise
            return LLMResult(rh, ERROR, error=f"{type(exc).__name__}: {exc}", attempts=attempts,
                             latency_s=time.perf_counter() - t0, backend=self.backend)
        return LLMResult(rh, OK, response=resp.message.content or "", attempts=attempts,
                         latency_s=time.perf_counter() - t0, prompt_tokens=resp.prompt_eval_count,
                         completion_tokens=resp.eval_count, backend=self.backend)


# --- the write-through cache ----------------------------------------------------------------


class Journal:
    """An append-only JSONL file of finished calls, exclusively flock'd while its writer lives."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = path.open("a+", encoding="utf-8")
        fcntl.flock(self._fh, fcntl.LOCK_EX)

    def done(self) -> set[str]:
        """Keys this journal already holds a final answer for (a retried shard skips them)."""
        self._fh.seek(0)
        return {r["request_hash"] for r in _parse_lines(self._fh.read()) if r["status"] == OK}

    def append(self, row: dict) -> None:
        self._fh.write(orjson.dumps(row).decode() + "\n")
        self._fh.flush()  # in the OS's hands now: a killed process does not lose it

    def close(self) -> None:
        fcntl.flock(self._fh, fcntl.LOCK_UN)
        self._fh.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _parse_lines(text: str) -> list[dict]:
    rows = []
    for line in text.splitlines():
        try:
            rows.append(orjson.loads(line))
        except orjson.JSONDecodeError:
            pass  # a line cut short by a kill: that call was in flight, it is made again
    return rows


class ResponseCache:
    """``llm_responses`` (Lance) plus the journals not merged yet."""

    def __init__(self, lance_uri: str, journal_dir: Path) -> None:
        self.lance_uri, self.journal_dir = lance_uri, Path(journal_dir)

    def journal_path(self, run: str, shard: int) -> Path:
        return self.journal_dir / f"{run}-shard-{shard:05d}.jsonl"

    def lookup(self, hashes: Iterable[str]) -> dict[str, dict]:
        """Answered (status ok) rows among ``hashes``, without the prompt column."""
        wanted = set(hashes)
        db = connect(self.lance_uri)
        if not wanted or not table_exists(db, "llm_responses"):
            return {}
        cols = ["request_hash", "response", "model", "backend", "attempts", "latency_s", "prompt_tokens",
                "completion_tokens"]
        tbl = open_table(db, "llm_responses").to_lance().to_table(columns=cols, filter="status = 'ok'")
        return {r["request_hash"]: r for r in tbl.to_pylist() if r["request_hash"] in wanted}

    def merge(self, path: Path) -> int:
        """Upsert one journal into ``llm_responses`` and delete it; returns the rows merged.
        Every journal row is a fresh call, so it replaces whatever the key held (an error row)."""
        if not path.exists():
            return 0
        rows = _parse_lines(path.read_text(encoding="utf-8"))
        if rows:
            for r in rows:
                r["created_at"] = datetime.fromisoformat(r["created_at"])
            table = dedupe(conform(pa.Table.from_pylist(rows), LLM_RESPONSES), LLM_RESPONSES.key)
            tbl = open_table(connect(self.lance_uri), "llm_responses")
            (tbl.merge_insert("request_hash").when_matched_update_all().when_not_matched_insert_all()
             .execute(table))
        path.unlink()
        return len(rows)

    def recover(self) -> int:
        """Merge journals whose writer is gone (flock free): a killed run's finished calls."""
        merged = 0
        for path in sorted(self.journal_dir.glob("*.jsonl")) if self.journal_dir.is_dir() else []:
            with path.open("a") as fh:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a live writer (another run) owns it
                merged += self.merge(path)
        return merged

