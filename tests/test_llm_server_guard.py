"""The local Ollama-protocol server under attack: each attack is answered or refused within a second
while small requests keep answering (``mmem llm serve --teacher`` in a real subprocess)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

from llmcalls.server import teacher_response

CONV = ("conversation:\nQ: is the photo in color\nA: yes\nQ: how many circles are there\nA: two\n"
        "Q: what color is the circle")


ATTACK_S = 1.0  # every attack is answered or refused within this
READ_TIMEOUT_S = 0.5
MAX_BODY = 1 << 20


@pytest.fixture(scope="module")
def guarded():
    """``mmem llm serve --teacher`` in a real subprocess (so its RSS is its own), with test-sized limits,
    one allowed origin from the command line and one pattern from the environment."""
    mmem = Path(sys.executable).with_name("mmem")
    env = {**os.environ, "MMEM_LLM_ORIGINS": "http://*.trusted.test"}
    proc = subprocess.Popen(
        [str(mmem), "llm", "serve", "--teacher", "--port", "0", "--max-body-mb", str(MAX_BODY / (1 << 20)),
         "--read-timeout-s", str(READ_TIMEOUT_S), "--max-requests", "200",
         "--origin", "https://app.example.org"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        banner = proc.stdout.readline()
        assert "app.example.org" in banner, banner
        yield banner.split(" at ", 1)[1].split(" ", 1)[0], psutil.Process(proc.pid)
    finally:
        proc.terminate()
        proc.communicate(timeout=20)


class SmallRequests:
    """A small chat request every 50 ms on its own thread for as long as the block runs: the
    slowest answer it saw, and how many it got."""

    def __init__(self, url: str) -> None:
        self.url, self.worst, self.answered, self.errors = url, 0.0, 0, []
        self._stop = threading.Event()

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=10) as c:
            while not self._stop.is_set():
                self._one(c)
                self._stop.wait(0.05)

    def _one(self, c: httpx.Client) -> None:
        t0 = time.perf_counter()
        r = c.post("/api/chat", json={"model": "mmem-teacher", "stream": False,
                                      "messages": [{"role": "user", "content": CONV}]})
        self.worst = max(self.worst, time.perf_counter() - t0)
        if r.status_code == 200 and "<reminder>" in r.json()["message"]["content"]:
            self.answered += 1
        else:
            self.errors.append(r.status_code)

    def __enter__(self):
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=15)
        with httpx.Client(base_url=self.url, timeout=10) as c:  # and one more once the attack is over
            self._one(c)


def _addr(url: str) -> tuple[str, int]:
    u = httpx.URL(url)
    return u.host, u.port


def _status(sock: socket.socket, within: float) -> int | None:
    """The status code of the answer on ``sock`` (None: closed without one, or none in time)."""
    sock.settimeout(within)
    data = b""
    try:
        while b"\r\n" not in data:
            more = sock.recv(4096)
            if not more:
                break
            data += more
    except (TimeoutError, ConnectionResetError):
        pass
    return int(data.split()[1]) if data.startswith(b"HTTP/1.1 ") else None


def _head(path: str, extra: str = "") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"{extra}\r\n").encode()


def test_oversized_bodies_get_413_without_being_read(guarded):
    url, server = guarded
    rss0 = server.memory_info().rss
    with SmallRequests(url) as small:
        # a declared 1 GiB body: refused from the headers alone
        with socket.create_connection(_addr(url)) as s:
            t0 = time.perf_counter()
            s.sendall(_head("/api/chat", f"Content-Length: {1 << 30}\r\n") + b"{" * 1024)
            assert _status(s, ATTACK_S) == 413 and time.perf_counter() - t0 < ATTACK_S
        # a chunked body with no declared length: cut off as soon as it passes the cap
        with socket.create_connection(_addr(url)) as s:
            s.sendall(_head("/api/generate", "Transfer-Encoding: chunked\r\n"))
            piece = b"x" * (64 << 10)
            for _ in range(MAX_BODY // len(piece) + 1):
                s.sendall(b"%x\r\n" % len(piece) + piece + b"\r\n")
            t0 = time.perf_counter()
            assert _status(s, ATTACK_S) == 413 and time.perf_counter() - t0 < ATTACK_S
        # just under the cap is served (an answer or a clean 400, never a 5xx)
        r = httpx.post(f"{url}/api/chat", content=b"[" + b"1," * (MAX_BODY // 2 - 8) + b"1]", timeout=10)
        assert r.status_code == 400 and "JSON object" in r.json()["error"]
    assert small.answered >= 2 and not small.errors and small.worst < ATTACK_S
    assert server.memory_info().rss - rss0 < 64 << 20


def test_not_an_object_and_bad_options_get_400(guarded):
    url, _ = guarded
    not_objects = [b"[1, 2]", b'"text"', b"null", b"3", b"{nope"]
    bad_fields = [b'{"model": "mmem-teacher", "messages": "hi"}',
                  b'{"model": "mmem-teacher", "messages": [1]}',
                  b'{"model": ["mmem-teacher"]}', b'{"model": "mmem-teacher", "options": [1]}',
                  b'{"model": "mmem-teacher", "messages": [], "options": {"num_ctx": "huge"}}',
                  b'{"model": "mmem-teacher", "messages": [{"role": "user", "content": {"a": 1}}]}',
                  (b'{"model": "mmem-teacher", "messages": [{"role": "user", "content": "Q: x", '
                   b'"images": [1]}]}')]
    with httpx.Client(base_url=url, timeout=5) as c:
        for path in ("/api/chat", "/api/generate", "/api/show"):
            for body in not_objects:
                r = c.post(path, content=body)
                assert r.status_code == 400 and r.json()["error"], (path, body, r.status_code)
        for body in bad_fields:
            r = c.post("/api/chat", content=body)
            assert r.status_code == 400 and r.json()["error"], (body, r.status_code)


def test_a_40kb_pathological_prompt_is_parsed_in_linear_time(guarded):
    """Lines that made the old ``^\\s*([QA]):\\s*(.*?)\\s*$`` backtrack quadratically (a 40 KB line
    of spaces between two words; 40 K blank lines for ``^\\s*`` in multiline mode), and 40 KB of
    words the teacher would quote back in full, streamed a word at a time."""
    url, server = guarded
    spaces = "Q: a" + " " * 40_000 + "b"
    blank = "\n" * 40_000 + "Q: is it red"
    answers = "Q: what\n" + "A: x" + "\t " * 20_000 + "y"
    words = "Q: what\nA: " + "w " * 20_000 + "\nQ: " + "w " * 20_000  # quoted back, streamed word by word
    rss0 = server.memory_info().rss
    with SmallRequests(url) as small, httpx.Client(base_url=url, timeout=10) as c:
        for content in (spaces, blank, answers, spaces * 20, words):
            t0 = time.perf_counter()
            r = c.post("/api/chat", json={"model": "mmem-teacher", "stream": content is words,
                                          "messages": [{"role": "user", "content": content}]})
            assert r.status_code == 200 and time.perf_counter() - t0 < ATTACK_S
            assert b"<reminder>" in r.content and len(r.content) < 200_000
    assert small.answered >= 2 and not small.errors and small.worst < ATTACK_S
    assert server.memory_info().rss - rss0 < 64 << 20
    assert teacher_response(blank).count("is it red") == 1


def test_trickling_clients_are_dropped_and_do_not_hold_the_server(guarded):
    """25 clients trickle their headers and 25 their body, a byte every 50 ms: each is dropped
    (headers) or answered 408 (body) about ``READ_TIMEOUT_S`` after it started."""
    url, server = guarded
    rss0 = server.memory_info().rss
    socks = []
    for i in range(50):
        s = socket.create_connection(_addr(url))
        s.sendall(b"POST /api/chat HTTP/1.1\r\n" if i % 2 else _head("/api/chat", "Content-Length: 1000\r\n"))
        s.setblocking(False)
        socks.append(s)
    t0 = time.perf_counter()
    ended: dict[int, tuple[float, bytes]] = {}
    with SmallRequests(url) as small:
        while len(ended) < len(socks) and time.perf_counter() - t0 < READ_TIMEOUT_S + 2 * ATTACK_S:
            for i, s in enumerate(socks):
                if i in ended:
                    continue
                try:
                    got = s.recv(4096)
                except BlockingIOError:
                    got = None
                except ConnectionResetError:
                    got = b""
                if got is not None:
                    ended[i] = (time.perf_counter() - t0, got)
                    continue
                try:
                    s.send(b"X-A: b\r\n"[:1] if i % 2 else b"{")
                except (BlockingIOError, BrokenPipeError, ConnectionResetError):
                    pass
            time.sleep(0.05)
    for s in socks:
        s.close()
    assert len(ended) == len(socks), f"{len(socks) - len(ended)} trickling clients still connected"
    assert max(t for t, _ in ended.values()) < READ_TIMEOUT_S + ATTACK_S
    assert all(ended[i][1].startswith(b"HTTP/1.1 408") for i in range(0, 50, 2))
    assert server.memory_info().rss - rss0 < 64 << 20
    assert small.answered >= 2 and not small.errors and small.worst < ATTACK_S


def test_foreign_host_and_origin_get_403(guarded):
    url, _ = guarded
    port = httpx.URL(url).port
    cases = {  # headers -> expected status
        (("host", "evil.example"),): 403,  # DNS rebinding: the page's name resolved to 127.0.0.1
        (("host", f"evil.example:{port}"),): 403,
        (("host", "127.0.0.1.evil.example"),): 403,
        (("host", f"localhost:{port}"),): 200,
        (("host", f"[::1]:{port}"),): 200,
        (("host", f"app.example.org:{port}"),): 200,  # named by --origin
        (("origin", "https://evil.example"),): 403,
        (("origin", "http://localhost.evil.example"),): 403,
        (("origin", "null"),): 403,
        (("origin", "http://localhost:3000"),): 200,
        (("origin", "http://127.0.0.1:8080"),): 200,
        (("origin", "https://app.example.org"),): 200,
        (("origin", "http://ui.trusted.test"),): 200,  # MMEM_LLM_ORIGINS pattern
    }
    with httpx.Client(base_url=url, timeout=5) as c:
        for headers, expected in cases.items():
            t0 = time.perf_counter()
            body = {"model": "mmem-teacher", "stream": False, "messages": [{"role": "user", "content": CONV}]}
            r = c.post("/api/chat", headers=dict(headers), json=body)
            assert r.status_code == expected and time.perf_counter() - t0 < ATTACK_S, (headers, r.status_code)
            if expected == 403:
                assert "reminder" not in r.text and "evil" not in r.text
        ok = c.options("/api/chat", headers={"origin": "https://app.example.org",
                                             "access-control-request-method": "POST"})
        assert ok.headers["access-control-allow-origin"] in ("*", "https://app.example.org")
        assert c.options("/api/chat", headers={"origin": "https://evil.example",
                                               "access-control-request-method": "POST"}).status_code == 403
