"""A local server that speaks the part of the Ollama HTTP API the official ``ollama`` client uses.

Why: no Ollama and no Gemma3 weights exist on these machines, yet the reminders stage must run
its real client path end to end (health check, chat with images, retries), and evaluation must
query local checkpoints through the same client. So this serves ``/api/chat``, ``/api/generate``
(streaming and not), ``/api/tags``, ``/api/show``, ``/api/ps`` and ``/api/version`` from one of:

- ``HFBackend``: a local Hugging Face checkpoint (a tiny random Gemma3 in the tests, a fine-tuned
  LoRA adapter later), through transformers' processor and ``generate``;
- ``TeacherBackend``: a deterministic stand-in, NOT a language model, that composes a valid
  ``<reminder>...</reminder>`` plus an answer sentence from the conversation it is sent, so the
  demo has real rows for every stage downstream. It says so in its banner, in ``/api/show``
  (``details.family = "mmem-teacher"``, ``model_info["mmem.backend"] = "teacher"``), which the
  client copies into the ``backend`` column of every row it writes.

Around any backend: ``latency_s`` and ``parallel`` model a server that serves N generations at
once with a fixed latency (the client benchmark), and ``Faults`` injects 500s, stalls, dropped
connections and answers without the tag at seeded rates (the retry tests, the reliability suite).
``auth`` makes every route require one exact ``Authorization`` header (what an Ollama behind an
auth proxy wants), answering 401 otherwise without echoing what was sent.
Binds 127.0.0.1 unless told otherwise. No Prefect here.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import io
import json
import logging
import random
import re
import socket
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import orjson
from pydantic import SecretStr
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

log = logging.getLogger("mmem.llm_server")

SERVER_VERSION = "0.6.0-mmem"
TEACHER_FAMILY = "mmem-teacher"


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


def full_name(name: str) -> str:
    """Ollama's naming: a model without a tag means ``:latest``."""
    return name if ":" in name else f"{name}:latest"


# --- the teacher ---------------------------------------------------------------------------

QA_RE = re.compile(r"^\s*([QA]):\s*(.*?)\s*$")
QA_LINE_RE = re.compile(r"^\s*[QA]:", re.MULTILINE)
STOP_WORDS = frozenset({
    "a", "an", "the", "is", "are", "was", "were", "be", "of", "in", "on", "at", "to", "it", "its",
    "this", "that", "there", "what", "which", "who", "how", "many", "much", "do", "does", "did", "any",
    "some", "can", "you", "see", "they", "he", "she", "them", "his", "her", "or", "and",
})


def parse_conversation(text: str) -> tuple[list[tuple[str, str]], str | None]:
    """``Q:``/``A:`` lines -> answered turns and the open (unanswered) last question, if any."""
    turns, question = [], None
    for line in text.splitlines():
        m = QA_RE.match(line)
        if not m:
            continue
        role, content = m.groups()
        if role == "Q":
            question = content
        elif question is not None:
            turns.append((question, content))
            question = None
    return turns, question


def _words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z0-9]+", text.lower()) if w not in STOP_WORDS}


def teacher_response(conversation: str) -> str:
    """A valid reminder answer built only from the conversation: deterministic, and honest about
    what it knows (it never sees the image, so its answer leans on what was already said)."""
    turns, question = parse_conversation(conversation)
    question = question or (turns[-1][0] if turns else "what the image shows")
    said = "; ".join(f'asked "{q}", heard "{a}"' for q, a in turns[-6:]) or "nothing has been said yet"
    reminder = (
        f"One image, {len(turns)} answered question{'s' if len(turns) != 1 else ''} so far: {said}. "
        f'The open question is "{question}", so I look again at the part of the image it is about.'
    )
    best = max(turns, key=lambda t: len(_words(t[0]) & _words(question)), default=None)
    if best is not None and _words(best[0]) & _words(question):
        answer = f"Going by the earlier answer, {best[1].rstrip('.')}."
    else:
        answer = "I cannot tell that from the conversation alone."
    return f"<reminder>{reminder}</reminder>\n{answer}"


def conversation_of(messages: list[dict]) -> str:
    """The latest user message that holds dialog lines (a repair re-ask comes after it)."""
    for m in reversed(messages):
        if m.get("role") == "user" and QA_LINE_RE.search(m.get("content") or ""):
            return m["content"]
    return next((m.get("content") or "" for m in reversed(messages) if m.get("role") == "user"), "")


class TeacherBackend:
    kind = "teacher"
    family = TEACHER_FAMILY
    vision = True

    async def generate(self, messages: list[dict], options: dict) -> Generation:
        prompt = "\n".join(m.get("content") or "" for m in messages)
        text = teacher_response(conversation_of(messages))
        return Generation(text, len(prompt.split()), len(text.split()))


# --- a Hugging Face checkpoint -------------------------------------------------------------


class HFBackend:
    """A local checkpoint (full model or PEFT adapter) through transformers; one generation at a
    time in a worker thread, because a model's forward pass is not re-entrant."""

    family = "gemma3"

    def __init__(self, path: str | Path, device: str = "cpu") -> None:
        path = Path(path)
        if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
            raise FileNotFoundError(
                f"no Hugging Face checkpoint at {path} (expected config.json or adapter_config.json); "
                "build a tiny one with training.tiny_models.tiny_gemma3(path) or point --model at a saved model"
            )
        self.kind = f"hf:{path.name}"
        self.device = device
        self._lock = asyncio.Lock()
        self.model, self.processor, self.vision = _load_checkpoint(path, device)

    async def generate(self, messages: list[dict], options: dict) -> Generation:
        async with self._lock:
            return await asyncio.to_thread(self._generate, messages, options)

    def _generate(self, messages: list[dict], options: dict) -> Generation:
        import torch
        from PIL import Image

        images, hf_messages = [], []
        for m in messages:
            parts = []
            for img in (m.get("images") or []) if self.vision else []:
                images.append(Image.open(io.BytesIO(base64.b64decode(img))).convert("RGB"))
                parts.append({"type": "image"})
            parts.append({"type": "text", "text": m.get("content") or ""})
            hf_messages.append({"role": m.get("role", "user"), "content": parts})
        text = self.processor.apply_chat_template(hf_messages, add_generation_prompt=True, tokenize=False)
        kwargs = {"images": [images]} if images else {}
        inputs = self.processor(text=[text], return_tensors="pt", **kwargs).to(self.device)
        temperature = float(options.get("temperature", 0.8))
        if options.get("seed") is not None:
            torch.manual_seed(int(options["seed"]))
        num_predict = int(options.get("num_predict", 128))
        with torch.inference_mode():
            out = self.model.generate(
                **inputs,
                max_new_tokens=num_predict if num_predict > 0 else 512,
                do_sample=temperature > 0,
                **({"temperature": temperature, "top_p": float(options.get("top_p", 0.9)),
                    "top_k": int(options.get("top_k", 40))} if temperature > 0 else {}),
            )
        new = out[0][inputs["input_ids"].shape[1]:]
        tok = getattr(self.processor, "tokenizer", self.processor)
        return Generation(tok.decode(new, skip_special_tokens=True), int(inputs["input_ids"].shape[1]), len(new))


def _load_checkpoint(path: Path, device: str):
    """(model, processor, has_vision) for a full checkpoint or a PEFT adapter over one."""
    import transformers

    base = path
    adapter = path / "adapter_config.json"
    if adapter.is_file():
        base = Path(json.loads(adapter.read_text())["base_model_name_or_path"])
    config = transformers.AutoConfig.from_pretrained(base)
    vision = hasattr(config, "vision_config")
    auto = transformers.AutoModelForImageTextToText if vision else transformers.AutoModelForCausalLM
    model = auto.from_pretrained(base)
    if adapter.is_file():
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, path)
    try:
        processor = (transformers.AutoProcessor if vision else transformers.AutoTokenizer).from_pretrained(path)
    except (OSError, ValueError):
        processor = (transformers.AutoProcessor if vision else transformers.AutoTokenizer).from_pretrained(base)
    return model.to(device).eval(), processor, vision


# --- faults --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Faults:
    """Seeded fault rates. A request's fate is a function of (seed, request body, how many times
    that body was seen), so it does not depend on arrival order and a retry draws again."""

    error_rate: float = 0.0  # answer HTTP 500
    stall_rate: float = 0.0  # wait ``stall_s`` before answering (past the client's timeout)
    drop_rate: float = 0.0  # start the answer, then close the connection
    untagged_rate: float = 0.0  # answer without the <reminder> tag
    stall_s: float = 30.0
    seed: int = 0
    poison: str | None = None  # every request whose body contains this text fails with 500, always

    def draw(self, body: bytes, nth: int) -> str | None:
        if self.poison and self.poison.encode() in body:
            return "error"
        u = random.Random(f"{self.seed}:{hashlib.sha256(body).hexdigest()}:{nth}").random()
        for fault, rate in (("error", self.error_rate), ("stall", self.stall_rate), ("drop", self.drop_rate),
                            ("untagged", self.untagged_rate)):
            if u < rate:
                return fault
            u -= rate
        return None

    @property
    def active(self) -> bool:
        return bool(self.poison) or any((self.error_rate, self.stall_rate, self.drop_rate, self.untagged_rate))


def strip_reminder(text: str) -> str:
    return re.sub(r"<reminder>.*?</reminder>\s*", "", text, flags=re.DOTALL).strip() or "no idea"


class _DroppedResponse(Response):
    """Starts a response, sends part of it, then aborts: the client sees a dropped connection."""

    async def __call__(self, scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", b"4096")]})
        await send({"type": "http.response.body", "body": b'{"model":"', "more_body": True})
        raise ConnectionAbortedError("fault injection: connection dropped")


# --- the HTTP app --------------------------------------------------------------------------


@dataclass
class ServerState:
    backend: Backend
    name: str
    latency_s: float = 0.0
    parallel: int = 1
    faults: Faults = field(default_factory=Faults)
    seen: Counter = field(default_factory=Counter)
    requests: Counter = field(default_factory=Counter)
    refused: Counter = field(default_factory=Counter)  # 401s: "missing" / "wrong" header
    auth: SecretStr | None = field(default=None, repr=False)  # the Authorization header every request needs
    _slots: asyncio.Semaphore | None = None

    def slots(self) -> asyncio.Semaphore:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.parallel)
        return self._slots

    async def generate(self, messages: list[dict], options: dict) -> tuple[Generation, float]:
        """Hold one of ``parallel`` slots for at least ``latency_s``; returns (generation, seconds)."""
        async with self.slots():
            t0 = time.perf_counter()
            gen = await self.backend.generate(messages, options)
            rest = self.latency_s - (time.perf_counter() - t0)
            if rest > 0:
                await asyncio.sleep(rest)
            return gen, time.perf_counter() - t0


def _json(obj: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(obj), status_code=status, media_type="application/json")


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _details(state: ServerState) -> dict:
    return {"parent_model": "", "format": "safetensors", "family": state.backend.family,
            "families": [state.backend.family], "parameter_size": "", "quantization_level": ""}


class RequireAuth:
    """ASGI middleware: a request without exactly the expected ``Authorization`` header gets a 401
    (compared in constant time; the answer never repeats what was sent)."""

    def __init__(self, app, expected: SecretStr, refused: Counter) -> None:
        self.app, self._expected, self.refused = app, expected.get_secret_value().encode(), refused

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            sent = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(sent, self._expected):
                self.refused["missing" if not sent else "wrong"] += 1
                body = orjson.dumps({"error": "unauthorized: this server requires an Authorization header"})
                await send({"type": "http.response.start", "status": 401,
                            "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer"),
                                        (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


def build_app(state: ServerState) -> Starlette:
    """The Starlette app over ``state`` (a backend, its served name, latency and faults)."""

    async def tags(request: Request) -> Response:
        digest = hashlib.sha256(f"{state.name}:{state.backend.kind}".encode()).hexdigest()
        return _json({"models": [{"name": state.name, "model": state.name, "modified_at": _now(), "size": 0,
                                  "digest": digest, "details": _details(state)}]})

    async def show(request: Request) -> Response:
        body = orjson.loads(await request.body() or b"{}")
        if full_name(body.get("model") or body.get("name") or "") != state.name:
            return _json({"error": f"model '{body.get('model')}' not found"}, 404)
        caps = ["completion"] + (["vision"] if state.backend.vision else [])
        return _json({"modelfile": f"# served by mmem llm serve ({state.backend.kind})", "parameters": "",
                      "template": "", "details": _details(state), "capabilities": caps, "modified_at": _now(),
                      "model_info": {"general.architecture": state.backend.family,
                                     "mmem.backend": state.backend.kind}})

    async def version(request: Request) -> Response:
        return _json({"version": SERVER_VERSION})

    async def ps(request: Request) -> Response:
        return _json({"models": [{"name": state.name, "model": state.name, "size": 0, "digest": "",
                                  "details": _details(state), "expires_at": _now(), "size_vram": 0}]})

    async def chat(request: Request) -> Response:
        return await _answer(request, chat=True)

    async def generate(request: Request) -> Response:
        return await _answer(request, chat=False)

    async def _answer(request: Request, chat: bool) -> Response:
        raw = await request.body()
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return _json({"error": "invalid JSON body"}, 400)
        model = body.get("model") or ""
        if full_name(model) != state.name:
            return _json({"error": f"model '{model}' not found, try pulling it first"}, 404)
        if chat:
            messages = body.get("messages") or []
        else:
            messages = ([{"role": "system", "content": body["system"]}] if body.get("system") else []) + [
                {"role": "user", "content": body.get("prompt") or "", "images": body.get("images") or []}]
        if not chat and not messages[-1]["content"]:  # Ollama's "load the model" call
            return _json({"model": model, "created_at": _now(), "response": "", "done": True, "done_reason": "load"})
        fault = None
        if state.faults.active:
            nth = state.seen[raw]
            state.seen[raw] += 1
            fault = state.faults.draw(raw, nth)
        state.requests[fault or "ok"] += 1
        if fault == "error":
            return _json({"error": "fault injection: internal server error"}, 500)
        if fault == "drop":
            return _DroppedResponse()
        if fault == "stall":
            await asyncio.sleep(state.faults.stall_s)
        gen, seconds = await state.generate(messages, body.get("options") or {})
        text = strip_reminder(gen.text) if fault == "untagged" else gen.text
        stats = {"done": True, "done_reason": "stop", "total_duration": int(seconds * 1e9), "load_duration": 0,
                 "prompt_eval_count": gen.prompt_tokens, "prompt_eval_duration": 0,
                 "eval_count": gen.completion_tokens, "eval_duration": int(seconds * 1e9)}
        if not body.get("stream", True):
            content = {"message": {"role": "assistant", "content": text}} if chat else {"response": text}
            return _json({"model": model, "created_at": _now(), **content, **stats})
        return StreamingResponse(_stream(model, text, stats, chat), media_type="application/x-ndjson")

    return Starlette(routes=[
        Route("/api/tags", tags, methods=["GET"]),
        Route("/api/show", show, methods=["POST"]),
        Route("/api/version", version, methods=["GET"]),
        Route("/api/ps", ps, methods=["GET"]),
        Route("/api/chat", chat, methods=["POST"]),
        Route("/api/generate", generate, methods=["POST"]),
        Route("/", lambda request: Response("Ollama is running"), methods=["GET", "HEAD"]),
    ], middleware=[Middleware(RequireAuth, expected=state.auth, refused=state.refused)] if state.auth else [])


async def _stream(model: str, text: str, stats: dict, chat: bool) -> AsyncIterator[bytes]:
    """NDJSON chunks of the answer (word by word), then the final ``done`` record with the stats."""
    for piece in re.findall(r"\S+\s*|\s+", text):
        part = {"message": {"role": "assistant", "content": piece}} if chat else {"response": piece}
        yield orjson.dumps({"model": model, "created_at": _now(), **part, "done": False}) + b"\n"
    last = {"message": {"role": "assistant", "content": ""}} if chat else {"response": ""}
    yield orjson.dumps({"model": model, "created_at": _now(), **last, **stats}) + b"\n"


# --- running it ----------------------------------------------------------------------------


def make_state(
    model: str | Path | None = None,
    *,
    teacher: bool = False,
    name: str | None = None,
    device: str = "cpu",
    latency_s: float = 0.0,
    parallel: int = 1,
    faults: Faults | None = None,
    auth: str | SecretStr | None = None,
) -> ServerState:
    """A server over a checkpoint (``model``) or the teacher; ``name`` is the served model name;
    ``auth``: the ``Authorization`` header value (e.g. ``"Bearer <token>"``) every request must carry."""
    if teacher:
        backend: Backend = TeacherBackend()
        served = name or TEACHER_FAMILY
    elif model is None:
        raise ValueError("give a checkpoint path (--model PATH) or --teacher")
    else:
        backend = HFBackend(model, device=device)
        served = name or Path(model).name
    return ServerState(backend, full_name(served), latency_s=latency_s, parallel=max(1, parallel),
                       faults=faults or Faults(), auth=SecretStr(auth) if isinstance(auth, str) else auth)


def banner(state: ServerState, url: str) -> str:
    what = ("TEACHER MODE: a deterministic stand-in that composes <reminder> answers from the conversation; "
            "it is not a language model" if state.backend.kind == "teacher" else f"checkpoint {state.backend.kind}")
    extra = f"; latency {state.latency_s * 1000:.0f} ms x {state.parallel} at once" if state.latency_s else ""
    faults = f"; FAULTS {state.faults}" if state.faults.active else ""
    auth = "; requires an Authorization header" if state.auth else ""
    return f"serving '{state.name}' at {url} ({what}{extra}{faults}{auth})"


def _uvicorn(state: ServerState, log_level: str):
    import uvicorn

    config = uvicorn.Config(build_app(state), log_level=log_level, lifespan="off", access_log=False,
                            timeout_graceful_shutdown=1, timeout_keep_alive=30)
    return uvicorn.Server(config)


def _url(sock: socket.socket) -> str:
    """The base URL of what ``sock`` is really bound to (not what was asked for)."""
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    return sock


def serve(state: ServerState, host: str = "127.0.0.1", port: int = 11434, log_level: str = "info") -> None:
    """Serve until interrupted (the ``mmem llm serve`` command)."""
    sock = _bind(host, port)
    print(banner(state, _url(sock)), flush=True)
    _uvicorn(state, log_level).run(sockets=[sock])


@contextmanager
def running_server(state: ServerState, host: str = "127.0.0.1", port: int = 0,
                   log_level: str = "critical") -> Iterator[str]:
    """Serve in a background thread (tests, benchmarks); yields the base URL."""
    sock = _bind(host, port)
    server = _uvicorn(state, log_level)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="llm-server")
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the LLM server did not start")
        time.sleep(0.01)
    url = _url(sock)
    log.info(banner(state, url))
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
