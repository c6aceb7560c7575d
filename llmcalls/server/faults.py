"""Seeded faults (500s, stalls, dropped connections, answers without the tag) for the retry tests
and the reliability suite."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from starlette.responses import Response


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
        rates = (self.error_rate, self.stall_rate, self.drop_rate, self.untagged_rate)
        return bool(self.poison) or any(rates)


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


class DroppedResponse(Response):
    """Starts a response, sends part of it, then aborts: the client sees a dropped connection."""

    async def __call__(self, scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", b"4096")]})
        await send({"type": "http.response.body", "body": b'{"model":"', "more_body": True})
        raise ConnectionAbortedError("fault injection: connection dropped")
