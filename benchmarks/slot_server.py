"""A stand-in Ollama host with a known capacity: ``slots`` generations at once, each ``latency``
seconds, the rest queued (as ``OLLAMA_NUM_PARALLEL`` does), so a client's throughput can be put
against what the host can give (``slots / latency`` requests per second).

It speaks just enough of Ollama's API for the official client and the host pool: ``/api/chat``
and ``/api/generate`` (non-streaming; the answer echoes the last message, so each request's answer
is its own), ``/api/tags``, ``/api/show``, ``/api/version``. ``max_queue``: like
``OLLAMA_MAX_QUEUE``, more requests waiting than that get a 503 at once. Plain asyncio, no web
framework, so that the server costs little CPU next to the client being measured.

In a test: ``url = await SlotServer(4, 0.05).start()`` ... ``await server.stop()`` (a crash: every
connection is cut, requests in a slot are never answered); ``start(port=...)`` again revives it.
As a process (the benchmarks): ``python benchmarks/slot_server.py --slots 8 --latency-ms 50``
prints its URL, then serves until killed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
from collections import Counter

REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 503: "Service Unavailable"}


class SlotServer:
    def __init__(self, slots: int, latency_s: float, model: str = "gemma3:27b", max_queue: int | None = None):
        self.slots, self.latency_s, self.model, self.max_queue = slots, latency_s, model, max_queue
        self.answered: Counter[str] = Counter()  # answer text -> times sent
        self.busy = 0  # 503s sent
        self.peak = 0  # most generations at once
        self.port: int | None = None
        self._sem = asyncio.Semaphore(slots)
        self._waiting = self._running = 0
        self._server: asyncio.base_events.Server | None = None
        self._conns: set[asyncio.Task] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, port: int = 0, host: str = "127.0.0.1") -> str:
        self._server = await asyncio.start_server(self._connection, host, port or self.port or 0,
                                                  reuse_address=True, backlog=1024)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.url

    async def stop(self) -> None:
        """Die: stop listening and cut every connection (nothing in a slot gets its answer)."""
        if self._server is not None:
            self._server.close()
        for task in list(self._conns):
            task.cancel()
        await asyncio.gather(*self._conns, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        self._sem = asyncio.Semaphore(self.slots)
        self._waiting = self._running = 0

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._conns.add(task)
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
                method, path = head[0].split(" ")[:2]
                headers = {
                    k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in head[1:] if h)
                }
                size = int(headers.get("content-length") or 0)
                body = await reader.readexactly(size) if size else b""
                status, answer = await self._route(method, path, body)
                data = json.dumps(answer).encode()
                writer.write(
                    f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\ncontent-type: application/json"
                    f"\r\ncontent-length: {len(data)}\r\n\r\n".encode()
                    + data
                )
                await writer.drain()
                if headers.get("connection", "").lower() == "close":
                    break
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, ValueError):
            pass
        except asyncio.CancelledError:  # stop(): a crash, so the connection is reset, not closed
            writer.transport.abort()
        finally:
            self._conns.discard(task)
            with contextlib.suppress(Exception):
                writer.close()

    async def _route(self, method: str, path: str, body: bytes) -> tuple[int, dict]:
        path = path.split("?")[0]
        if path == "/api/version":
            return 200, {"version": "0.0.0-slots"}
        if path == "/api/tags":
            return 200, {"models": [{"name": self.model, "model": self.model, "size": 0, "digest": "0" * 64,
                                     "details": {"family": "slots"}}]}
        try:
            req = json.loads(body or b"{}")
        except ValueError:
            return 400, {"error": "body is not JSON"}
        if path == "/api/show":
            if req.get("model") != self.model:
                return 404, {"error": f"model '{req.get('model')}' not found"}
            return 200, {"modelfile": "", "parameters": "", "template": "", "details": {"family": "slots"},
                         "model_info": {"general.architecture": "slots", "mmem.backend": "slots"},
                         "capabilities": ["completion"]}
        if method != "POST" or path not in ("/api/chat", "/api/generate"):
            return 404, {"error": f"no route {method} {path}"}
        if req.get("model") != self.model:
            return 404, {"error": f"model '{req.get('model')}' not found, try pulling it first"}
        if self.max_queue is not None and self._waiting >= self.max_queue and self._sem.locked():
            self.busy += 1
            return 503, {"error": "server busy, please try again.  maximum pending requests exceeded"}
        prompt = (
            (req.get("messages") or [{}])[-1].get("content", "") if path == "/api/chat" else req.get("prompt")
        )
        text = f"answer to: {prompt}"
        self._waiting += 1
        queued = True
        try:
            async with self._sem:
                self._waiting -= 1
                queued = False
                self._running += 1
                self.peak = max(self.peak, self._running)
                try:
                    await asyncio.sleep(self.latency_s)
                finally:
                    self._running -= 1
        finally:
            if queued:
                self._waiting -= 1
        self.answered[text] += 1
        stats = {
            "model": self.model,
            "created_at": "2026-01-01T00:00:00Z",
            "done": True,
            "done_reason": "stop",
            "total_duration": int(self.latency_s * 1e9),
            "prompt_eval_count": len(str(prompt).split()),
            "eval_count": len(text.split()),
        }
        if path == "/api/chat":
            return 200, {**stats, "message": {"role": "assistant", "content": text}}
        return 200, {**stats, "response": text}


async def _serve(args: argparse.Namespace) -> None:
    server = SlotServer(args.slots, args.latency_ms / 1000, args.model, args.max_queue)
    print(await server.start(args.port, args.host), flush=True)
    await asyncio.Event().wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slots", type=int, default=4)
    ap.add_argument("--latency-ms", type=float, default=50.0)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--model", default="gemma3:27b")
    ap.add_argument("--max-queue", type=int, default=None)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(ap.parse_args()))


if __name__ == "__main__":
    main()
