"""The spool of the group commit: new memories whose data files are written, waiting for a commit.

A writer publishes its staged fragments here before it waits for the writers' turn; whoever holds
the turn commits every pending entry in one ``Append`` (:func:`memory.writes.commit_group`). An
entry's state is its file name's suffix, moved by atomic renames:

- ``.pending``: published, not yet taken by a committer;
- ``.claimed``: taken by a committer (in the turn) before its commit, so a committer killed between
  the two leaves a state its waiter recognises and checks against the table by ``memory_id``;
- ``.done`` (committed) or ``.dup`` (its caller-chosen id was stored already): the waiter returns.

Entries are plain JSON (fragment metadata from ``FragmentMetadata.to_json``, the memory id and
whether the caller chose it), written whole and renamed into place. A file that does not parse is
renamed ``.bad`` and reported, never used. Entries of processes that no longer run are left out of
commits and removed by upkeep (:meth:`Spool.sweep`); their data files, referenced by no version,
are never read.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

from lance.fragment import FragmentMetadata

log = logging.getLogger("mmem." + __name__)

STATES = ("pending", "claimed", "done", "dup")


@dataclass
class Entry:
    token: str
    memory_id: str
    check_id: bool
    fragments: list[FragmentMetadata]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _pid(token: str) -> int | None:
    head = token.split("-", 1)[0]
    return int(head) if head.isdigit() else None


class Spool:
    """One table's spool folder (beside the table, under the database root)."""

    def __init__(self, folder: Path) -> None:
        self.dir = folder
        self.dir.mkdir(parents=True, exist_ok=True)

    def _path(self, token: str, state: str) -> Path:
        return self.dir / f"{token}.{state}"

    def publish(self, fragments: list[FragmentMetadata], memory_id: str, check_id: bool,
                token: str | None = None) -> str:
        """Write a pending entry (whole, then renamed into place); returns its token."""
        token = token or f"{os.getpid()}-{uuid.uuid4().hex}"
        body = {"memory_id": memory_id, "check_id": bool(check_id),
                "fragments": [f.to_json() for f in fragments]}
        tmp = self._path(token, "tmp")
        tmp.write_text(json.dumps(body))
        os.replace(tmp, self._path(token, "pending"))
        return token

    def state(self, token: str) -> str | None:
        for s in STATES:
            if self._path(token, s).exists():
                return s
        return None

    def move(self, token: str, old: str, new: str) -> None:
        os.replace(self._path(token, old), self._path(token, new))

    def mark(self, token: str, state: str) -> None:
        """Mark a claimed entry ``done`` or ``dup``; one its waiter gave up on (removed) is left
        alone: a committed write never fails on its bookkeeping."""
        try:
            self.move(token, "claimed", state)
        except FileNotFoundError:
            pass

    def remove(self, token: str) -> None:
        for s in (*STATES, "tmp"):
            self._path(token, s).unlink(missing_ok=True)

    def claim(self) -> list[Entry]:
        """Claim every pending entry of a running process (call in the writers' turn)."""
        got = []
        for path in sorted(self.dir.glob("*.pending")):
            token = path.name.removesuffix(".pending")
            pid = _pid(token)
            if pid is not None and not alive(pid):
                continue  # its writer is gone: nobody waits for it (upkeep removes it)
            try:
                entry = _parse(token, path.read_text())
            except FileNotFoundError:
                continue
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("memories spool: ignoring malformed entry %s (%s)", path.name, exc)
                os.replace(path, path.with_suffix(".bad"))
                continue
            try:
                self.move(token, "pending", "claimed")
            except FileNotFoundError:
                continue
            got.append(entry)
        return got

    def sweep(self) -> int:
        """Remove the entries of processes that no longer run; returns how many."""
        gone = 0
        for path in self.dir.iterdir():
            pid = _pid(path.name)
            if pid is None or not alive(pid):
                if pid is None or path.suffix == ".bad":
                    log.warning("memories spool: removing %s", path.name)
                path.unlink(missing_ok=True)
                gone += 1
        return gone


def _parse(token: str, text: str) -> Entry:
    body = json.loads(text)
    if not isinstance(body, dict) or not isinstance(body["memory_id"], str):
        raise TypeError("not a spool entry")
    frags = [FragmentMetadata.from_json(json.dumps(f)) for f in body["fragments"]]
    if not frags:
        raise ValueError("no fragments")
    return Entry(token, body["memory_id"], bool(body["check_id"]), frags)
