"""The LLM client: the official ``ollama`` AsyncClient plus what a days-long run needs.

- ``LLMClient.check``: before fanning out, the server must answer and have the model; otherwise
  fail at once with what to run (``ollama pull gemma3:27b`` or where the server is expected, or
  which header it wants: a 401/403 says so).
- Auth: an ``Authorization`` header resolved when the client is created, from the source bound to
  the client's own host (``llmcalls.auth.HostAuth``: a request to any other host carries none); it
  lives only in the underlying HTTP client, never in a row, a log line or a message.
- ``LLMClient.chat``: a timeout per try, retries with exponential backoff and jitter (tenacity)
  on 5xx, timeouts and dropped connections; none on a 4xx or a missing model. It never raises for
  a request that merely failed: it returns an ``LLMResult`` whose status says what happened.
"""

from __future__ import annotations

import asyncio
import time
from typing import Self

import httpx
import ollama
import pydantic
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from llmcalls.auth import AUTH_ENV, HostAuth
from llmcalls.requests import (
    ERROR,
    OK,
    REJECTED,
    HostUnreachable,
    LLMRequest,
    LLMResult,
    LLMUnavailable,
    full_name,
)


def is_retryable(exc: BaseException) -> bool:
    """5xx (and 429, "come back later"), timeouts, dropped or refused connections."""
    if isinstance(exc, ollama.ResponseError):
        return exc.status_code >= 500 or exc.status_code == 429 or exc.status_code == -1
    return isinstance(exc, (httpx.TransportError, httpx.TimeoutException, TimeoutError, ConnectionError))


class LLMClient:
    """One host, one model, one retry policy. Use as ``async with LLMClient(...) as c``."""

    def __init__(self, host: str, *, timeout_s: float = 300.0, max_attempts: int = 4, backoff_s: float = 1.0,
                 backoff_max_s: float = 60.0, backend: str | None = None, auth_block: str | None = None,
                 auth: HostAuth | None = None) -> None:
        """``auth``: which header source is bound to which host; without it, ``auth_block`` (the name of
        a Prefect Secret block) or ``$MMEM_OLLAMA_AUTH`` bound to ``host``. The header is sent only if
        a source is bound to ``host`` (see ``llmcalls.auth``)."""
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
            raise HostUnreachable(
                f"no Ollama server answers at {self.host} ({type(exc).__name__}: {exc}). Start one there "
                f"(`ollama serve`, then `ollama pull {model}`), or the local stand-in "
                "(`mmem llm serve --teacher`), and point --ollama-host / OLLAMA_HOST / [reminders] "
                "ollama_host at it."
            ) from None
        try:
            names = sorted(m.model for m in listed.models if m.model)
        except (AttributeError, TypeError) as exc:
            raise self._malformed("/api/tags", exc) from None
        if full_name(model) not in {full_name(n) for n in names}:
            raise LLMUnavailable(
                f"the Ollama server at {self.host} does not have model {model!r} (it has: "
                f"{', '.join(names) or 'none'}). Run `ollama pull {model}` on that server, or pass "
                "--model NAME."
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
        return LLMUnavailable(f"the server at {self.host} gave no usable answer to {path} "
                              f"({type(exc).__name__}: {detail}); is it an Ollama server of a recent "
                              "version?")

    def _refused(self, status: int) -> None:
        """401/403: say which header is wanted and where it comes from (never its value)."""
        sent = (f"the Authorization header from {self.auth_source} was refused" if self.authenticated
                else "none was sent")
        raise LLMUnavailable(
            f"the Ollama server at {self.host} wants an Authorization header (HTTP {status}) and {sent}. "
            f"Put the header value (e.g. 'Bearer <token>') in a Prefect Secret block and name it in "
            f"[reminders] auth_secret_block, or export {AUTH_ENV}."
        ) from None

    def _retrying(self) -> AsyncRetrying:
        return AsyncRetrying(
            stop=stop_after_attempt(self.max_attempts),
            wait=wait_exponential_jitter(multiplier=self.backoff_s, max=self.backoff_max_s,
                                         jitter=self.backoff_s),
            retry=retry_if_exception(is_retryable),
            reraise=True,
        )

    async def ask(self, req: LLMRequest) -> LLMResult:
        """One try, for a caller that spreads requests over several hosts (``llmcalls.hosts``): the
        answer, or a REJECTED result (a 4xx, an unreadable image). A failure another host may not
        have (refused, dropped, timed out, 5xx, 429) raises, so that the caller can send the request
        elsewhere; a missing model or a refused token raises ``LLMUnavailable`` naming this host."""
        rh = req.request_hash
        try:
            messages = req.wire_messages()
        except (OSError, ValueError) as exc:
            return LLMResult(rh, REJECTED, error=f"image: {exc}", backend=self.backend)
        t0 = time.perf_counter()
        try:
            async with asyncio.timeout(self.timeout_s):
                resp = await self._client.chat(model=req.model, messages=messages, options=req.options,
                                               stream=False)
        except ollama.ResponseError as exc:
            if is_retryable(exc):
                raise
            self._unavailable(exc, req)
            return LLMResult(rh, REJECTED, error=f"HTTP {exc.status_code}: {exc.error}", attempts=1,
                             latency_s=time.perf_counter() - t0, backend=self.backend)
        return self._answered(rh, resp, 1, t0)

    def _unavailable(self, exc: ollama.ResponseError, req: LLMRequest) -> None:
        """A 404 (no such model here) or a 401/403 (a revoked token): stop, rather than quarantine
        every prompt."""
        if exc.status_code == 404:
            raise LLMUnavailable(f"{exc.error} at {self.host}: run `ollama pull {req.model}` there") from None
        if exc.status_code in (401, 403):
            self._refused(exc.status_code)

    def _answered(self, rh: str, resp, attempts: int, t0: float) -> LLMResult:
        return LLMResult(rh, OK, response=resp.message.content or "", attempts=attempts,
                         latency_s=time.perf_counter() - t0, prompt_tokens=resp.prompt_eval_count,
                         completion_tokens=resp.eval_count, backend=self.backend)

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
                        resp = await self._client.chat(model=req.model, messages=messages,
                                                       options=req.options, stream=False)
        except ollama.ResponseError as exc:
            self._unavailable(exc, req)
            status = ERROR if is_retryable(exc) else REJECTED
            return LLMResult(rh, status, error=f"HTTP {exc.status_code}: {exc.error}", attempts=attempts,
                             latency_s=time.perf_counter() - t0, backend=self.backend)
        except Exception as exc:
            if not is_retryable(exc):
                raise
            return LLMResult(rh, ERROR, error=f"{type(exc).__name__}: {exc}", attempts=attempts,
                             latency_s=time.perf_counter() - t0, backend=self.backend)
        return self._answered(rh, resp, attempts, t0)
