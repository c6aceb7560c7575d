"""A local server that speaks the part of the Ollama HTTP API the official ``ollama`` client uses.

Why: no Ollama and no Gemma3 weights exist on these machines, yet the reminders stage must run
its real client path end to end (health check, chat with images, retries), and evaluation must
query local checkpoints through the same client. So this serves ``/api/chat``, ``/api/generate``
(streaming and not), ``/api/tags``, ``/api/show``, ``/api/ps`` and ``/api/version`` from one of:

- ``HFBackend``: a local Hugging Face checkpoint (a tiny random Gemma3 in the tests, a fine-tuned
  LoRA adapter later), through transformers' processor and the model's forward pass;
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

Sturdy by default, because any local user or any web page open in the user's browser can reach a
loopback port (``Limits`` holds every bound):

- a request naming a foreign ``Host`` (DNS rebinding; checked on connections that arrive over
  loopback) or sent by a foreign ``Origin`` gets 403: loopback names and addresses pass, plus
  configured origins and their host names (as Ollama's ``OLLAMA_ORIGINS``);
- headers and body must arrive within ``read_timeout_s`` each (slow clients are dropped, 408), a
  body past ``max_body_bytes`` gets 413 without being held in memory, headers are capped in size,
  and past ``max_requests`` requests in flight the answer is 503 (the client retries it);
- a body that is not a JSON object, or options of the wrong type, get 400;
- the prompt is fitted to ``num_ctx`` (the start is cut, the end kept, see ``HFBackend``) and
  ``num_predict`` is capped, so a big request cannot become a long forward pass;
- CPU work (tokenizing, parsing, the teacher) runs in worker threads, not on the event loop, and
  the parsing is linear in the text;
- generations take turns on the model in short time slices, first come first served, so a short
  request waits for at most one slice of each request ahead of it per token slice, never for a
  whole long generation.

Binds 127.0.0.1 unless told otherwise. No Prefect here.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import fnmatch
import hashlib
import hmac
import io
import ipaddress
import json
import logging
import math
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
from urllib.parse import urlsplit

import orjson
from pydantic import SecretStr
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

log = logging.getLogger("mmem.llm_server")

SERVER_VERSION = "0.6.0-mmem"
TEACHER_FAMILY = "mmem-teacher"
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


def full_name(name: str) -> str:
    """Ollama's naming: a model without a tag means ``:latest``."""
    return name if ":" in name else f"{name}:latest"


# --- the teacher ---------------------------------------------------------------------------

STOP_WORDS = frozenset({
    "a", "an", "the", "is", "are", "was", "were", "be", "of", "in", "on", "at", "to", "it", "its",
    "this", "that", "there", "what", "which", "who", "how", "many", "much", "do", "does", "did", "any",
    "some", "can", "you", "see", "they", "he", "she", "them", "his", "her", "or", "and",
})
WORD_RE = re.compile(r"[a-z0-9]+")


def dialog_line(line: str) -> tuple[str, str] | None:
    """``("Q"|"A", text)`` for a ``Q:``/``A:`` line, else None. String methods, not a regex with
    backtracking, so a line of any length costs time linear in its length."""
    s = line.lstrip()
    if s[:2] in ("Q:", "A:"):
        return s[0], s[2:].strip()
    return None


def parse_conversation(text: str) -> tuple[list[tuple[str, str]], str | None]:
    """``Q:``/``A:`` lines -> answered turns and the open (unanswered) last question, if any."""
    turns, question = [], None
    for line in text.splitlines():
        qa = dialog_line(line)
        if qa is None:
            continue
        role, content = qa
        if role == "Q":
            question = content
        elif question is not None:
            turns.append((question, content))
            question = None
    return turns, question


def _words(text: str) -> set[str]:
    return {w for w in WORD_RE.findall(text.lower()) if w not in STOP_WORDS}


def _clip(text: str, limit: int = 500) -> str:
    """A quote of at most ``limit`` characters: a huge question must not become a huge answer."""
    return text if len(text) <= limit else text[:limit] + "..."


def teacher_response(conversation: str) -> str:
    """A valid reminder answer built only from the conversation: deterministic, and honest about
    what it knows (it never sees the image, so its answer leans on what was already said)."""
    turns, question = parse_conversation(conversation)
    question = question or (turns[-1][0] if turns else "what the image shows")
    said = "; ".join(f'asked "{_clip(q)}", heard "{_clip(a)}"' for q, a in turns[-6:]) or "nothing has been said yet"
    reminder = (
        f"One image, {len(turns)} answered question{'s' if len(turns) != 1 else ''} so far: {said}. "
        f'The open question is "{_clip(question)}", so I look again at the part of the image it is about.'
    )
    asked = _words(question)  # once: per turn it would cost (turns x question length)
    best = max(turns, key=lambda t: len(_words(t[0]) & asked), default=None)
    if best is not None and _words(best[0]) & asked:
        answer = f"Going by the earlier answer, {_clip(best[1]).rstrip('.')}."
    else:
        answer = "I cannot tell that from the conversation alone."
    return f"<reminder>{reminder}</reminder>\n{answer}"


def conversation_of(messages: list[dict]) -> str:
    """The latest user message that holds dialog lines (a repair re-ask comes after it)."""
    for m in reversed(messages):
        content = m.get("content") or ""
        if m.get("role") == "user" and any(dialog_line(line) for line in content.splitlines()):
            return content
    return next((m.get("content") or "" for m in reversed(messages) if m.get("role") == "user"), "")


class TeacherBackend:
    kind = "teacher"
    family = TEACHER_FAMILY
    vision = True

    async def generate(self, messages: list[dict], options: dict) -> Generation:
        return await asyncio.to_thread(self._generate, messages)

    @staticmethod
    def _generate(messages: list[dict]) -> Generation:
        prompt_tokens = sum(len((m.get("content") or "").split()) for m in messages)
        text = teacher_response(conversation_of(messages))
        return Generation(text, prompt_tokens, len(text.split()))


# --- a Hugging Face checkpoint -------------------------------------------------------------


class HFBackend:
    """A local checkpoint (full model or PEFT adapter) through transformers.

    Fitting a request to the model: ``num_predict`` is clamped to ``limits.max_predict`` and
    ``num_ctx`` to ``limits.max_ctx`` and the model's context length. The prompt keeps at most
    ``max(num_ctx - num_predict, num_ctx // 2)`` tokens: a longer one is TRUNCATED, keeping its end
    (the open question and the generation prompt) and its first token (BOS), as Ollama does; it is
    refused (400) only when the cut would split an image's tokens. Generation stops at
    ``num_predict`` tokens or when prompt + answer fill ``num_ctx``. Message texts are cut to what
    can still reach the kept end before tokenizing, so a big body never becomes a big tokenization.

    Fairness: a forward pass is not re-entrant, so generations take turns on the model. Each turn
    runs one generation for ``limits.slice_s`` (at least one step: a prefill chunk or one token) in
    a worker thread, and turns are granted first come first served (an asyncio lock wakes its
    waiters in order; a generation that used its slice queues again behind the others). So every
    request in flight gets an equal share of the model, and a short request is never queued behind
    the whole of a long one. Each request keeps its own KV cache and random generator, so its
    answer does not depend on what else is running."""

    family = "gemma3"
    PREFILL_CHUNK = 256  # prompt tokens per step of a text-only prefill (an image prompt goes in one)

    def __init__(self, path: str | Path, device: str = "cpu", limits: Limits | None = None) -> None:
        path = Path(path)
        if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
            raise FileNotFoundError(
                f"no Hugging Face checkpoint at {path} (expected config.json or adapter_config.json); "
                "build a tiny one with training.tiny_models.tiny_gemma3(path) or point --model at a saved model"
            )
        self.kind = f"hf:{path.name}"
        self.device = device
        self.limits = limits or Limits()
        self._turns = asyncio.Lock()  # the order of turns (FIFO)
        self._model_lock = threading.Lock()  # the mutual exclusion itself (a cancelled turn's thread runs on)
        self.model, self.processor, self.vision = _load_checkpoint(path, device)
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        config = getattr(self.model.config, "text_config", self.model.config)
        self.context_length = int(getattr(config, "max_position_embeddings", 0) or self.limits.max_ctx)
        self.max_token_chars = max((len(t) for t in self.tokenizer.get_vocab()), default=64)
        eos = self.model.generation_config.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            self.eos.add(self.tokenizer.eos_token_id)
        self.image_token_id = getattr(self.processor, "image_token_id", None)

    async def generate(self, messages: list[dict], options: dict) -> Generation:
        job = await self._turn(_Decoding, self, messages, options)
        while not await self._turn(job.advance, self.limits.slice_s):
            pass
        return job.result()

    async def _turn(self, fn, *args):
        async with self._turns:
            return await asyncio.to_thread(self._locked, fn, *args)

    def _locked(self, fn, *args):
        with self._model_lock:
            return fn(*args)


def _int_option(options: dict, name: str, default: int) -> int:
    value = options.get(name)
    return default if value is None else int(value)


class _Decoding:
    """One request's generation, advanced a time slice at a time by ``HFBackend``."""

    def __init__(self, backend: HFBackend, messages: list[dict], options: dict) -> None:
        import torch

        self.b, self.torch = backend, torch
        limits = backend.limits
        ctx = max(16, min(_int_option(options, "num_ctx", limits.default_ctx), limits.max_ctx,
                          backend.context_length))
        predict = _int_option(options, "num_predict", limits.default_predict)
        predict = limits.max_predict if predict <= 0 else min(predict, limits.max_predict)
        keep = max(ctx - predict, ctx // 2)
        self.ctx, self.predict = ctx, predict

        inputs = self._encode(messages, keep_chars=(keep + 1) * backend.max_token_chars)
        ids = inputs["input_ids"]
        if ids.shape[1] > keep:
            inputs = self._truncate(inputs, keep)
        self.inputs = {k: v.to(backend.device) if hasattr(v, "to") else v for k, v in inputs.items()}
        self.prompt = self.inputs["input_ids"]
        self.fed = 0  # prompt tokens already in the cache
        self.cache = None
        self.logits = None
        self.new: list[int] = []
        self.text = ""
        self.done = False
        temperature = float(options.get("temperature", 0.8))
        self.sample = temperature > 0
        self.generator = torch.Generator(device=backend.device)
        self.generator.manual_seed(int(options["seed"]) if options.get("seed") is not None else random.getrandbits(63))
        if self.sample:
            from transformers.generation.logits_process import (
                LogitsProcessorList,
                TemperatureLogitsWarper,
                TopKLogitsWarper,
                TopPLogitsWarper,
            )

            top_k = int(options.get("top_k", 40))  # 0 or less: no top-k cut (as Ollama)
            self.warpers = LogitsProcessorList([
                TemperatureLogitsWarper(temperature),
                *([TopKLogitsWarper(top_k)] if top_k > 0 else []),
                TopPLogitsWarper(min(1.0, max(1e-6, float(options.get("top_p", 0.9))))),
            ])

    def _encode(self, messages: list[dict], keep_chars: int) -> dict:
        """The chat-templated, tokenized prompt; texts longer than ``keep_chars`` lose their start
        first (those characters could not reach the kept end of the prompt anyway)."""
        from PIL import Image

        b = self.b
        images, hf_messages = [], []
        for m in messages:
            parts = []
            for img in (m.get("images") or []) if b.vision else []:
                try:
                    im = Image.open(io.BytesIO(base64.b64decode(img, validate=True)))
                    if im.width * im.height > MAX_IMAGE_PIXELS:
                        raise BadRequest(f"an image of {im.width}x{im.height} pixels is larger than this server takes")
                    images.append(im.convert("RGB"))
                except (binascii.Error, OSError, ValueError, Image.DecompressionBombError) as exc:
                    if isinstance(exc, BadRequest):
                        raise
                    raise BadRequest("an image is not base64 of a PNG/JPEG/... file") from None
                parts.append({"type": "image"})
            text = m.get("content") or ""
            parts.append({"type": "text", "text": text[-keep_chars:]})
            hf_messages.append({"role": m.get("role") or "user", "content": parts})
        text = b.processor.apply_chat_template(hf_messages, add_generation_prompt=True, tokenize=False)
        kwargs = {"images": [images]} if images else {}
        return dict(b.processor(text=[text], return_tensors="pt", **kwargs))

    def _truncate(self, inputs: dict, keep: int) -> dict:
        ids = inputs["input_ids"]
        n = ids.shape[1]
        head = 1 if self.b.tokenizer.bos_token_id is not None and int(ids[0, 0]) == self.b.tokenizer.bos_token_id else 0
        cut = slice(head, n - keep + head)  # the tokens dropped
        if "pixel_values" in inputs and self.b.image_token_id is not None and \
                bool((ids[:, cut] == self.b.image_token_id).any()):
            raise BadRequest(f"the prompt ({n} tokens) does not fit num_ctx={self.ctx} with num_predict="
                             f"{self.predict} without cutting an image: raise num_ctx or send less")
        out = {}
        for k, v in inputs.items():
            if hasattr(v, "shape") and v.ndim == 2 and v.shape[1] == n:
                v = self.torch.cat([v[:, :head], v[:, cut.stop:]], dim=1)
            out[k] = v
        return out

    def advance(self, budget_s: float) -> bool:
        """Run prefill chunks or decoding steps for about ``budget_s`` (at least one); True when done."""
        torch = self.torch
        t_end = time.perf_counter() + budget_s
        with torch.inference_mode():
            while not self.done:
                if self.fed < self.prompt.shape[1]:
                    self._prefill()
                else:
                    self._step()
                if time.perf_counter() >= t_end:
                    break
        if self.done:  # decoded here, under the model lock: a fast tokenizer is not safe across threads
            self.text = self.b.tokenizer.decode(self.new, skip_special_tokens=True)
            self.cache = self.logits = None  # free the KV cache as soon as the answer is complete
        return self.done

    def _prefill(self) -> None:
        n = self.prompt.shape[1]
        if "pixel_values" in self.inputs or self.b.PREFILL_CHUNK >= n:
            out = self.b.model(**self.inputs, use_cache=True)
            self.fed = n
        else:
            end = min(n, self.fed + self.b.PREFILL_CHUNK)
            out = self.b.model(input_ids=self.prompt[:, self.fed:end], past_key_values=self.cache,
                               attention_mask=self._mask(end), use_cache=True)
            self.fed = end
        self.cache, self.logits = out.past_key_values, out.logits[:, -1]

    def _step(self) -> None:
        torch = self.torch
        scores = self.logits.float()
        if self.sample:
            scores = self.warpers(self.prompt, scores)
            token = torch.multinomial(scores.softmax(-1), 1, generator=self.generator)
        else:
            token = scores.argmax(-1, keepdim=True)
        tid = int(token)
        if tid in self.b.eos:
            self.done = True
            return
        self.new.append(tid)
        length = self.prompt.shape[1] + len(self.new)
        if len(self.new) >= self.predict or length >= self.ctx:
            self.done = True
            return
        out = self.b.model(input_ids=token, past_key_values=self.cache, attention_mask=self._mask(length),
                           use_cache=True)
        self.cache, self.logits = out.past_key_values, out.logits[:, -1]

    def _mask(self, length: int):
        return self.torch.ones(1, length, dtype=self.torch.long, device=self.prompt.device)

    def result(self) -> Generation:
        return Generation(self.text, int(self.prompt.shape[1]), len(self.new))


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
    """``text`` without its ``<reminder>...</reminder>`` blocks (a find loop: linear in the text)."""
    out, i = [], 0
    while (start := text.find("<reminder>", i)) >= 0 and (end := text.find("</reminder>", start)) >= 0:
        out.append(text[i:start])
        i = end + len("</reminder>")
        while i < len(text) and text[i].isspace():
            i += 1
    out.append(text[i:])
    return "".join(out).strip() or "no idea"


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
    seen: Counter = field(default_factory=Counter)  # sha256 of a body -> times seen (fault draws)
    requests: Counter = field(default_factory=Counter)
    refused: Counter = field(default_factory=Counter)  # 401s: "missing" / "wrong" header; 403/408/413/503 by cause
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


def _json(obj: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(obj), status_code=status, media_type="application/json")


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _details(state: ServerState) -> dict:
    return {"parent_model": "", "format": "safetensors", "family": state.backend.family,
            "families": [state.backend.family], "parameter_size": "", "quantization_level": ""}


async def _refuse(send, status: int, message: str, extra: list[tuple[bytes, bytes]] = (), close: bool = True) -> None:
    """A JSON error answer sent straight from middleware; ``close`` ends the connection after it
    (what is left of the request is never read)."""
    body = orjson.dumps({"error": message})
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *extra]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _hostname(value: str) -> str:
    """The name in a ``Host`` header value (``name``, ``name:port``, ``[v6]:port``), lower case."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def is_loopback_name(name: str) -> bool:
    """localhost, ``*.localhost`` (RFC 6761 keeps them on this machine), 127.0.0.0/8 and ::1."""
    name = name.lower().rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def origin_allowed(origin: str, allowed: tuple[str, ...]) -> bool:
    """A page's ``Origin`` may call the API when it is served from this machine (http(s) on a
    loopback name, any port) or matches one of ``allowed`` (case-insensitive, ``*`` wildcards)."""
    origin = origin.strip().lower()
    try:
        parts = urlsplit(origin)
        if parts.scheme in ("http", "https") and parts.hostname and is_loopback_name(parts.hostname):
            return True
    except ValueError:  # e.g. "http://[nonsense": judged by the patterns alone
        pass
    return any(fnmatch.fnmatchcase(origin, pattern.strip().lower().rstrip("/")) for pattern in allowed)


def _origin_host(origin: str) -> str | None:
    """The host name in an origin or origin pattern (``https://*.example.org`` -> ``*.example.org``)."""
    try:
        return urlsplit(origin.strip().lower()).hostname
    except ValueError:
        return None


class Guard:
    """ASGI middleware in front of everything: a foreign ``Host`` or ``Origin`` -> 403; more than
    ``max_requests`` in flight -> 503; a declared ``Content-Length`` past the cap -> 413, before
    any body is read. The Host check applies to connections that arrive on a loopback address
    (where DNS rebinding leads a browser); a team server reached over the network relies on
    ``--require-auth`` instead, as Ollama bound to a public address does."""

    def __init__(self, app, limits: Limits, refused: Counter) -> None:
        self.app, self.limits, self.refused = app, limits, refused
        self.hosts = tuple(h for h in map(_origin_host, limits.origins) if h)
        self.in_flight = 0

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        why = self._foreign(scope, headers)
        if why:
            self.refused[why] += 1
            return await _refuse(send, 403, f"forbidden: {why} (allow it with --origin / MMEM_LLM_ORIGINS)")
        if self.in_flight >= self.limits.max_requests:
            self.refused["busy"] += 1
            return await _refuse(send, 503, "server busy: too many requests in flight, retry later",
                                 [(b"retry-after", b"1")])
        length = headers.get("content-length", "0").strip() or "0"
        if not length.isdigit() or int(length) > self.limits.max_body_bytes:
            self.refused["too large"] += 1
            return await _refuse(send, 413, f"request body larger than {self.limits.max_body_bytes} bytes")
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1

    def _foreign(self, scope, headers: dict[str, str]) -> str | None:
        server = scope.get("server") or ("", 0)
        if "host" in headers and server[0] and is_loopback_name(server[0]):
            name = _hostname(headers["host"])
            if not is_loopback_name(name) and not any(fnmatch.fnmatchcase(name, h) for h in self.hosts):
                return "foreign Host header"
        if "origin" in headers and not origin_allowed(headers["origin"], self.limits.origins):
            return "foreign Origin"
        return None


class _TooLarge(Exception):
    pass


class ReadBody:
    """ASGI middleware: reads the whole body before the route runs, within ``read_timeout_s``
    (else 408) and up to ``max_body_bytes`` (else 413, counted as it arrives, so a chunked or
    lying body is cut off too); both refusals close the connection. The route then gets the body
    from memory, and a route that ignores its body cannot leave a trickling client connected."""

    def __init__(self, app, limits: Limits, refused: Counter) -> None:
        self.app, self.limits, self.refused = app, limits, refused

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        try:
            async with asyncio.timeout(self.limits.read_timeout_s):
                body = await self._read(receive)
        except TimeoutError:
            self.refused["slow body"] += 1
            return await _refuse(send, 408, f"request body not received within {self.limits.read_timeout_s} s")
        except _TooLarge:
            self.refused["too large"] += 1
            return await _refuse(send, 413, f"request body larger than {self.limits.max_body_bytes} bytes")
        if body is None:  # the client went away
            return
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _read(self, receive) -> bytes | None:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limits.max_body_bytes:
                raise _TooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


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
                await _refuse(send, 401, "unauthorized: this server requires an Authorization header",
                              [(b"www-authenticate", b"Bearer")], close=False)
                return
        await self.app(scope, receive, send)


async def _json_body(request: Request) -> dict:
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


def _options(value: Any) -> dict:
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


def _message(m: Any) -> dict:
    if not isinstance(m, dict):
        raise BadRequest("each message must be a JSON object")
    if not isinstance(m.get("content") or "", str) or not isinstance(m.get("role") or "", str):
        raise BadRequest("a message's role and content must be strings")
    images = m.get("images") or []
    if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
        raise BadRequest("a message's images must be a list of base64 strings")
    return m


def build_app(state: ServerState) -> Starlette:
    """The Starlette app over ``state`` (a backend, its served name, latency, faults and limits)."""

    async def tags(request: Request) -> Response:
        digest = hashlib.sha256(f"{state.name}:{state.backend.kind}".encode()).hexdigest()
        return _json({"models": [{"name": state.name, "model": state.name, "modified_at": _now(), "size": 0,
                                  "digest": digest, "details": _details(state)}]})

    async def show(request: Request) -> Response:
        try:
            body = await _json_body(request)
        except BadRequest as exc:
            return _json({"error": str(exc)}, 400)
        asked = body.get("model") or body.get("name") or ""
        if not isinstance(asked, str) or full_name(asked) != state.name:
            return _json({"error": f"model '{str(asked)[:200]}' not found"}, 404)
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
        try:
            body = await _json_body(request)
            model = body.get("model") or ""
            if not isinstance(model, str):
                raise BadRequest("model must be a string")
            if full_name(model) != state.name:
                return _json({"error": f"model '{model[:200]}' not found, try pulling it first"}, 404)
            options = _options(body.get("options"))
            if chat:
                messages = body.get("messages") or []
                if not isinstance(messages, list):
                    raise BadRequest("messages must be a list")
                messages = [_message(m) for m in messages]
            else:
                system, prompt = body.get("system") or "", body.get("prompt") or ""
                messages = ([{"role": "system", "content": system}] if system else []) + [
                    {"role": "user", "content": prompt, "images": body.get("images") or []}]
                messages = [_message(m) for m in messages]
        except BadRequest as exc:
            return _json({"error": str(exc)}, 400)
        if not chat and not messages[-1]["content"]:  # Ollama's "load the model" call
            return _json({"model": model, "created_at": _now(), "response": "", "done": True, "done_reason": "load"})
        fault = None
        if state.faults.active:
            raw = await request.body()
            key = hashlib.sha256(raw).digest()
            nth = state.seen[key]
            state.seen[key] += 1
            fault = state.faults.draw(raw, nth)
        state.requests[fault or "ok"] += 1
        if fault == "error":
            return _json({"error": "fault injection: internal server error"}, 500)
        if fault == "drop":
            return _DroppedResponse()
        if fault == "stall":
            await asyncio.sleep(state.faults.stall_s)
        try:
            gen, seconds = await state.generate(messages, options)
        except BadRequest as exc:
            return _json({"error": str(exc)}, 400)
        text = strip_reminder(gen.text) if fault == "untagged" else gen.text
        stats = {"done": True, "done_reason": "stop", "total_duration": int(seconds * 1e9), "load_duration": 0,
                 "prompt_eval_count": gen.prompt_tokens, "prompt_eval_duration": 0,
                 "eval_count": gen.completion_tokens, "eval_duration": int(seconds * 1e9)}
        if not body.get("stream", True):
            content = {"message": {"role": "assistant", "content": text}} if chat else {"response": text}
            return _json({"model": model, "created_at": _now(), **content, **stats})
        return StreamingResponse(_stream(model, text, stats, chat), media_type="application/x-ndjson")

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


async def _stream(model: str, text: str, stats: dict, chat: bool) -> AsyncIterator[bytes]:
    """NDJSON chunks of the answer (word by word), then the final ``done`` record with the stats.
    Every 64 chunks it lets the event loop serve others (a send does not always yield)."""
    for i, found in enumerate(re.finditer(r"\S+\s*|\s+", text)):
        piece = found.group()
        part = {"message": {"role": "assistant", "content": piece}} if chat else {"response": piece}
        yield orjson.dumps({"model": model, "created_at": _now(), **part, "done": False}) + b"\n"
        if i % 64 == 63:
            await asyncio.sleep(0)
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
    limits: Limits | None = None,
) -> ServerState:
    """A server over a checkpoint (``model``) or the teacher; ``name`` is the served model name;
    ``auth``: the ``Authorization`` header value (e.g. ``"Bearer <token>"``) every request must carry."""
    limits = limits or Limits()
    if teacher:
        backend: Backend = TeacherBackend()
        served = name or TEACHER_FAMILY
    elif model is None:
        raise ValueError("give a checkpoint path (--model PATH) or --teacher")
    else:
        backend = HFBackend(model, device=device, limits=limits)
        served = name or Path(model).name
    return ServerState(backend, full_name(served), latency_s=latency_s, parallel=max(1, parallel),
                       faults=faults or Faults(), auth=SecretStr(auth) if isinstance(auth, str) else auth,
                       limits=limits)


def banner(state: ServerState, url: str) -> str:
    what = ("TEACHER MODE: a deterministic stand-in that composes <reminder> answers from the conversation; "
            "it is not a language model" if state.backend.kind == "teacher" else f"checkpoint {state.backend.kind}")
    extra = f"; latency {state.latency_s * 1000:.0f} ms x {state.parallel} at once" if state.latency_s else ""
    faults = f"; FAULTS {state.faults}" if state.faults.active else ""
    auth = "; requires an Authorization header" if state.auth else ""
    origins = f"; also allows origins {', '.join(state.limits.origins)}" if state.limits.origins else ""
    return f"serving '{state.name}' at {url} ({what}{extra}{faults}{auth}{origins})"


def _protocol(limits: Limits):
    """uvicorn's httptools protocol with a deadline and a size cap on the request line + headers:
    uvicorn has neither (its keep-alive timer stops at the first byte), so a client that trickles
    its headers would hold a connection forever."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class GuardedHttp(HttpToolsProtocol):
        _head_timer: asyncio.TimerHandle | None = None
        _head_bytes = 0

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._head_bytes = 0
            if self._head_timer is None:
                self._arm()

        def on_url(self, url: bytes) -> None:
            self._count(len(url))
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._count(len(name) + len(value))
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def _count(self, n: int) -> None:
            self._head_bytes += n
            if self._head_bytes > limits.max_header_bytes:
                raise ValueError("request headers too large")  # the parser answers 400 and closes

        def _arm(self) -> None:
            self._head_timer = self.loop.call_later(limits.read_timeout_s, self._too_slow)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _too_slow(self) -> None:
            self._head_timer = None
            if not self.transport.is_closing():
                self.transport.close()

    return GuardedHttp


def _uvicorn(state: ServerState, log_level: str):
    import uvicorn

    config = uvicorn.Config(build_app(state), log_level=log_level, lifespan="off", access_log=False,
                            timeout_graceful_shutdown=1, timeout_keep_alive=30, http=_protocol(state.limits),
                            limit_concurrency=state.limits.max_connections)
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
