"""The Starlette app: the routes of the Ollama API over a ``ServerState`` (a backend, its served
name, latency, faults and limits), behind the guard middleware."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import Counter
from dataclasses import dataclass, field

from pydantic import SecretStr
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from llmcalls.requests import full_name
from llmcalls.server.faults import DroppedResponse, Faults, strip_reminder
from llmcalls.server.guard import Guard, ReadBody, RequireAuth
from llmcalls.server.protocol import (
    SERVER_VERSION,
    Backend,
    BadRequest,
    Generation,
    Limits,
    json_body,
    json_response,
    now,
    parse_message,
    parse_options,
    stream_answer,
)


@dataclass
class ServerState:
    backend: Backend
    name: str
    latency_s: float = 0.0
    parallel: int = 1
    faults: Faults = field(default_factory=Faults)
    seen: Counter = field(default_factory=Counter)  # sha256 of a body -> times seen (fault draws)
    requests: Counter = field(default_factory=Counter)
    # 401s by "missing" / "wrong" header; 403/408/413/503 by cause
    refused: Counter = field(default_factory=Counter)
    auth: SecretStr | None = field(default=None, repr=False)  # the Authorization header every request needs
    limits: Limits = field(default_factory=Limits)
    _slots: asyncio.Semaphore | None = None

    def slots(self) -> asyncio.Semaphore:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.parallel)
        return self._slots

    async def generate(self, messages: list[dict], options: dict) -> tuple[Generation, float]:
        """The backend's answer and its seconds. With ``latency_s`` (the benchmark's model of a
        server), each generation holds one of ``parallel`` slots for at least ``latency_s``;
        without it, the backend's own scheduling decides (``HFBackend`` takes fair turns)."""
        if not self.latency_s:
            t0 = time.perf_counter()
            gen = await self.backend.generate(messages, options)
            return gen, time.perf_counter() - t0
        async with self.slots():
            t0 = time.perf_counter()
            gen = await self.backend.generate(messages, options)
            rest = self.latency_s - (time.perf_counter() - t0)
            if rest > 0:
                await asyncio.sleep(rest)
            return gen, time.perf_counter() - t0


def details(state: ServerState) -> dict:
    return {"parent_model": "", "format": "safetensors", "family": state.backend.family,
            "families": [state.backend.family], "parameter_size": "", "quantization_level": ""}


def build_app(state: ServerState) -> Starlette:
    """The Starlette app over ``state`` (a backend, its served name, latency, faults and limits)."""

    async def tags(request: Request) -> Response:
        digest = hashlib.sha256(f"{state.name}:{state.backend.kind}".encode()).hexdigest()
        return json_response({"models": [{"name": state.name, "model": state.name, "modified_at": now(),
                                          "size": 0, "digest": digest, "details": details(state)}]})

    async def show(request: Request) -> Response:
        try:
            body = await json_body(request)
        except BadRequest as exc:
            return json_response({"error": str(exc)}, 400)
        asked = body.get("model") or body.get("name") or ""
        if not isinstance(asked, str) or full_name(asked) != state.name:
            return json_response({"error": f"model '{str(asked)[:200]}' not found"}, 404)
        caps = ["completion"] + (["vision"] if state.backend.vision else [])
        return json_response({"modelfile": f"# served by mmem llm serve ({state.backend.kind})",
                              "parameters": "", "template": "", "details": details(state),
                              "capabilities": caps, "modified_at": now(),
                              "model_info": {"general.architecture": state.backend.family,
                                             "mmem.backend": state.backend.kind}})

    async def version(request: Request) -> Response:
        return json_response({"version": SERVER_VERSION})

    async def ps(request: Request) -> Response:
        return json_response({"models": [{"name": state.name, "model": state.name, "size": 0, "digest": "",
                                          "details": details(state), "expires_at": now(), "size_vram": 0}]})

    async def chat(request: Request) -> Response:
        return await _answer(request, chat=True)

    async def generate(request: Request) -> Response:
        return await _answer(request, chat=False)

    async def _answer(request: Request, chat: bool) -> Response:
        try:
            body = await json_body(request)
            model = body.get("model") or ""
            if not isinstance(model, str):
                raise BadRequest("model must be a string")
            if full_name(model) != state.name:
                return json_response({"error": f"model '{model[:200]}' not found, try pulling it first"}, 404)
            options = parse_options(body.get("options"))
            if chat:
                messages = body.get("messages") or []
                if not isinstance(messages, list):
                    raise BadRequest("messages must be a list")
                messages = [parse_message(m) for m in messages]
            else:
                system, prompt = body.get("system") or "", body.get("prompt") or ""
                messages = ([{"role": "system", "content": system}] if system else []) + [
                    {"role": "user", "content": prompt, "images": body.get("images") or []}]
                messages = [parse_message(m) for m in messages]
        except BadRequest as exc:
            return json_response({"error": str(exc)}, 400)
        if not chat and not messages[-1]["content"]:  # Ollama's "load the model" call
            return json_response({"model": model, "created_at": now(), "response": "", "done": True,
                                  "done_reason": "load"})
        fault = None
        if state.faults.active:
            raw = await request.body()
            key = hashlib.sha256(raw).digest()
            nth = state.seen[key]
            state.seen[key] += 1
            fault = state.faults.draw(raw, nth)
        state.requests[fault or "ok"] += 1
        if fault == "error":
            return json_response({"error": "fault injection: internal server error"}, 500)
        if fault == "drop":
            return DroppedResponse()
        if fault == "stall":
            await asyncio.sleep(state.faults.stall_s)
        try:
            gen, seconds = await state.generate(messages, options)
        except BadRequest as exc:
            return json_response({"error": str(exc)}, 400)
        text = strip_reminder(gen.text) if fault == "untagged" else gen.text
        stats = {"done": True, "done_reason": "stop", "total_duration": int(seconds * 1e9),
                 "load_duration": 0, "prompt_eval_count": gen.prompt_tokens, "prompt_eval_duration": 0,
                 "eval_count": gen.completion_tokens, "eval_duration": int(seconds * 1e9)}
        if not body.get("stream", True):
            content = {"message": {"role": "assistant", "content": text}} if chat else {"response": text}
            return json_response({"model": model, "created_at": now(), **content, **stats})
        return StreamingResponse(stream_answer(model, text, stats, chat), media_type="application/x-ndjson")

    limits = state.limits
    middleware = [
        Middleware(Guard, limits=limits, refused=state.refused),
        # pages of allowed origins may read the answers (the Guard has refused every other origin)
        Middleware(CORSMiddleware, allow_origins=["*"], allow_methods=["GET", "POST", "HEAD", "OPTIONS"],
                   allow_headers=["*"]),
    ]
    if state.auth:
        middleware.append(Middleware(RequireAuth, expected=state.auth, refused=state.refused))
    middleware.append(Middleware(ReadBody, limits=limits, refused=state.refused))
    return Starlette(routes=[
        Route("/api/tags", tags, methods=["GET"]),
        Route("/api/show", show, methods=["POST"]),
        Route("/api/version", version, methods=["GET"]),
        Route("/api/ps", ps, methods=["GET"]),
        Route("/api/chat", chat, methods=["POST"]),
        Route("/api/generate", generate, methods=["POST"]),
        Route("/", lambda request: Response("Ollama is running"), methods=["GET", "HEAD"]),
    ], middleware=middleware)
