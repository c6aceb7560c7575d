"""The middleware that keeps a loopback server sturdy against any local user or web page: foreign
``Host``/``Origin`` (403), too many requests in flight (503), bodies too large (413) or too slow
(408), and a required ``Authorization`` header (401)."""

from __future__ import annotations

import asyncio
import fnmatch
import hmac
import ipaddress
from collections import Counter
from urllib.parse import urlsplit

import orjson
from pydantic import SecretStr

from llmcalls.server.protocol import Limits


async def refuse(send, status: int, message: str, extra: list[tuple[bytes, bytes]] = (),
                 close: bool = True) -> None:
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
            return await refuse(send, 403, f"forbidden: {why} (allow it with --origin / MMEM_LLM_ORIGINS)")
        if self.in_flight >= self.limits.max_requests:
            self.refused["busy"] += 1
            return await refuse(send, 503, "server busy: too many requests in flight, retry later",
                                [(b"retry-after", b"1")])
        length = headers.get("content-length", "0").strip() or "0"
        if not length.isdigit() or int(length) > self.limits.max_body_bytes:
            self.refused["too large"] += 1
            return await refuse(send, 413, f"request body larger than {self.limits.max_body_bytes} bytes")
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
            return await refuse(send, 408, f"request body not received within {self.limits.read_timeout_s} s")
        except _TooLarge:
            self.refused["too large"] += 1
            return await refuse(send, 413, f"request body larger than {self.limits.max_body_bytes} bytes")
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
                await refuse(send, 401, "unauthorized: this server requires an Authorization header",
                             [(b"www-authenticate", b"Bearer")], close=False)
                return
        await self.app(scope, receive, send)
