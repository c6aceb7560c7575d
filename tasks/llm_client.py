"""The small LLM interface: the official ``ollama`` AsyncClient plus what a days-long run needs.

- ``LLMRequest.request_hash``: the cache key, a hash of model, options and the full messages with
  every image replaced by the SHA-256 of its bytes (so a cached re-run never reads an image).
- ``LLMClient.check``: before fanning out, the server must answer and have the model; otherwise
  fail at once with what to run (``ollama pull gemma3:27b`` or where the server is expected, or
  which header it wants: a 401/403 says so).
- Auth: an ``Authorization`` header resolved when the client is created, from the source bound to
  the client's own host (``tasks.secrets.HostAuth``: a request to any other host carries none); it
  lives only in the underlying HTTP client, never in a row, a log line or a message.
- ``LLMClient.chat``: a timeout per try, retries with exponential backoff and jitter (tenacity)
  on 5xx, timeouts and dropped connections; none on a 4xx or a missing model. It never raises for
  a request that merely failed: it returns an ``LLMResult`` whose status says what happened.
- ``Journal`` / ``ResponseCache``: the write-through cache in ``llm_responses``. Each finished
  call is appended at once to its shard's journal (a local JSONL file, flock'd by its writer), so
  a killed process loses only the calls in flight; the flow, the one writer of the table, merges
  journals into Lance as shards finish, and merges orphaned journals of dead runs at start.
  Every journal row carries an HMAC under a key kept under the data root (mode 0600): a row that
  does not verify (planted, or edited) is never merged, it is logged and dropped.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import hmac
import logging
import os
import stat
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
import pydantic
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from schemas.reminders import LLM_RESPONSES, options_record, prompt_records
from storage.lance import conform, connect, dedupe, open_table, table_exists
from tasks.secrets import AUTH_ENV, HostAuth

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
            "options": options_record(req.options), "prompt": prompt_records(orjson.loads(req.prompt_json)),
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
                 backoff_max_s: float = 60.0, backend: str | None = None, auth_block: str | None = None,
                 auth: HostAuth | None = None) -> None:
        """``auth``: which header source is bound to which host; without it, ``auth_block`` (the name of
        a Prefect Secret block) or ``$MMEM_OLLAMA_AUTH`` bound to ``host``. The header is sent only if
        a source is bound to ``host`` (see ``tasks.secrets``)."""
        self.host, self.timeout_s, self.backend = host, timeout_s, backend
        self.max_attempts, self.backoff_s, self.backoff_max_s = max_attempts, backoff_s, backoff_max_s
        auth_map = auth if auth is not None else HostAuth.of(host, auth_block)
        self.auth_source = auth_map.describe(host)
        auth = auth_map.header(host)
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
        except (pydantic.ValidationError, ValueError) as exc:
            raise self._malformed("/api/tags", exc) from None
        except (ConnectionError, httpx.TransportError, TimeoutError, ollama.ResponseError) as exc:
            if isinstance(exc, ollama.ResponseError) and exc.status_code in (401, 403):
                self._refused(exc.status_code)
            raise LLMUnavailable(
                f"no Ollama server answers at {self.host} ({type(exc).__name__}: {exc}). Start one there "
                f"(`ollama serve`, then `ollama pull {model}`), or the local stand-in (`mmem llm serve --teacher`),"
                " and point --ollama-host / OLLAMA_HOST / [reminders] ollama_host at it."
            ) from None
        try:
            names = sorted(m.model for m in listed.models if m.model)
        except (AttributeError, TypeError) as exc:
            raise self._malformed("/api/tags", exc) from None
        if full_name(model) not in {full_name(n) for n in names}:
            raise LLMUnavailable(
                f"the Ollama server at {self.host} does not have model {model!r} (it has: "
                f"{', '.join(names) or 'none'}). Run `ollama pull {model}` on that server, or pass --model NAME."
            )
        try:
            info = await asyncio.wait_for(self._client.show(model), timeout=min(30.0, self.timeout_s))
            modelinfo = info.modelinfo or {}
            self.backend = str(modelinfo.get("mmem.backend") or "ollama")
        except ollama.ResponseError as exc:
            if exc.status_code in (401, 403):
                self._refused(exc.status_code)
            raise self._malformed("/api/show", exc) from None
        except (pydantic.ValidationError, AttributeError, TypeError, ValueError, KeyError, httpx.HTTPError,
                TimeoutError, ConnectionError) as exc:
            raise self._malformed("/api/show", exc) from None
        return self.backend

    def _malformed(self, path: str, exc: BaseException) -> LLMUnavailable:
        """One line naming the host, for an answer this client cannot read (not an Ollama server?)."""
        detail = " ".join(str(exc).split())[:200]
        return LLMUnavailable(f"the server at {self.host} gave no usable answer to {path} ({type(exc).__name__}: "
                              f"{detail}); is it an Ollama server of a recent version?")

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


MAC = "mac"  # the journal row field holding its HMAC
_log = logging.getLogger("mmem")


def key_path(journal_dir: Path) -> Path:
    """The signing key of the journals in ``journal_dir``: beside it, under the data root's cache."""
    return journal_dir.with_name(journal_dir.name + ".key")


def journal_key(journal_dir: Path) -> bytes:
    """This data root's journal key: created once (O_EXCL, mode 0600), refused if others may read or
    write it (then anyone could sign rows) or if it is a link."""
    path = key_path(journal_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w") as fh:
            fh.write(os.urandom(32).hex())
    deadline = time.monotonic() + 5
    while True:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd) as fh:
            st = os.fstat(fh.fileno())
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
                raise PermissionError(f"{path} must be a regular file of yours with mode 0600 (it signs the LLM "
                                      "journals); remove it and re-run to create a new one")
            text = fh.read().strip()
        if len(text) == 64 or time.monotonic() > deadline:  # another process may be writing it right now
            break
        time.sleep(0.02)
    try:
        if len(text) != 64:
            raise ValueError(text)
        return bytes.fromhex(text)
    except ValueError:
        raise PermissionError(f"{path} is not a journal key; remove it and re-run to create a new one") from None


def _mac(key: bytes, row: dict) -> str:
    body = orjson.dumps({k: v for k, v in row.items() if k != MAC}, option=orjson.OPT_SORT_KEYS)
    return hmac.new(key, body, hashlib.sha256).hexdigest()


def verified(rows: list[dict], key: bytes, path: Path) -> list[dict]:
    """The rows signed with ``key`` (without their MAC); the others are dropped, with a warning."""
    good = [{k: v for k, v in r.items() if k != MAC} for r in rows
            if isinstance(r, dict) and isinstance(r.get(MAC), str) and hmac.compare_digest(r[MAC], _mac(key, r))]
    if len(good) != len(rows):
        _log.warning("%s: %d journal rows not signed by this data root's key were ignored", path,
                     len(rows) - len(good))
    return good


def read_journal(path: Path) -> list[dict]:
    """The verified rows of one journal file."""
    if not path.exists():
        return []
    return verified(_parse_lines(path.read_text(encoding="utf-8")), journal_key(path.parent), path)


class Journal:
    """An append-only JSONL file of finished calls, exclusively flock'd while its writer lives;
    each row signed with the data root's journal key."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._key = journal_key(path.parent)
        self._fh = path.open("a+", encoding="utf-8")
        fcntl.flock(self._fh, fcntl.LOCK_EX)

    def done(self) -> set[str]:
        """Keys this journal already holds a final answer for (a retried shard skips them)."""
        self._fh.seek(0)
        rows = verified(_parse_lines(self._fh.read()), self._key, self.path)
        return {r["request_hash"] for r in rows if r.get("status") == OK}

    def append(self, row: dict) -> None:
        signed = {**row, MAC: _mac(self._key, row)}
        self._fh.write(orjson.dumps(signed).decode() + "\n")
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
        rows = read_journal(path)
        if rows:
            for r in rows:
                r["created_at"] = datetime.fromisoformat(r["created_at"])
                r["options"] = options_record(r.get("options"))  # a journal of the previous release: JSON text
                r["prompt"] = prompt_records(r.get("prompt"))
            table = dedupe(conform(pa.Table.from_pylist(rows, schema=LLM_RESPONSES.schema), LLM_RESPONSES),
                           LLM_RESPONSES.key)
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

