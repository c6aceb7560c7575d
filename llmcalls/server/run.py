"""Running the server: ``make_state`` over a checkpoint or the teacher, ``serve`` (the ``mmem llm
serve`` command) and ``running_server`` (in a background thread, for tests and benchmarks), on
uvicorn with a deadline and a size cap on request headers."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pydantic import SecretStr

from llmcalls.requests import full_name
from llmcalls.server.app import ServerState, build_app
from llmcalls.server.faults import Faults
from llmcalls.server.hf import HFBackend
from llmcalls.server.protocol import Backend, Limits
from llmcalls.server.teacher import TEACHER_FAMILY, TeacherBackend

log = logging.getLogger("mmem." + __name__)

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
            "it is not a language model" if state.backend.kind == "teacher"
            else f"checkpoint {state.backend.kind}")
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
