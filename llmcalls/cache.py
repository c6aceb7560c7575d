"""The write-through response cache: ``llm_responses`` (Lance) plus the journals not merged yet.

Each finished call is appended at once to its shard's journal (a local JSONL file, flock'd by its
writer), so a killed process loses only the calls in flight; the one writer of the table merges
journals into Lance as shards finish, and merges orphaned journals of dead runs at start. Every
journal row carries an HMAC under a key kept under the data root (mode 0600): a row that does not
verify (planted, or edited) is never merged, it is logged and dropped.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import hmac
import logging
import os
import stat
import time
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Self

import orjson
import pyarrow as pa

from llmcalls.requests import OK
from schemas.reminders import LLM_RESPONSES, options_record, prompt_records
from storage.lance import conform, connect, dedupe, open_table, table_exists

MAC = "mac"  # the journal row field holding its HMAC
log = logging.getLogger("mmem." + __name__)


def key_path(journal_dir: Path) -> Path:
    """The signing key of the journals in ``journal_dir``: beside it, under the data root's cache."""
    return journal_dir.with_name(journal_dir.name + ".key")


def journal_key(journal_dir: Path) -> bytes:
    """This data root's journal key: created once (O_EXCL, mode 0600), refused if others may read or
    write it (then anyone could sign rows) or if it is a link."""
    path = key_path(journal_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w") as fh:
            fh.write(os.urandom(32).hex())
    deadline = time.monotonic() + 5
    while True:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd) as fh:
            st = os.fstat(fh.fileno())
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
                raise PermissionError(f"{path} must be a regular file of yours with mode 0600 (it signs the "
                                      "LLM journals); remove it and re-run to create a new one")
            text = fh.read().strip()
        if len(text) == 64 or time.monotonic() > deadline:  # another process may be writing it right now
            break
        time.sleep(0.02)
    try:
        if len(text) != 64:
            raise ValueError(text)
        return bytes.fromhex(text)
    except ValueError:
        raise PermissionError(f"{path} is not a journal key; remove it and re-run to create a new one") \
            from None


@functools.lru_cache(maxsize=16)
def _keyed(key: bytes) -> hmac.HMAC:
    """The HMAC state after the key, copied for each row (not keyed again per row)."""
    return hmac.new(key, digestmod=hashlib.sha256)


def _mac(key: bytes, row: dict) -> str:
    mac = _keyed(key).copy()
    mac.update(orjson.dumps({k: v for k, v in row.items() if k != MAC}, option=orjson.OPT_SORT_KEYS))
    return mac.hexdigest()


def verified(rows: list[dict], key: bytes, path: Path) -> list[dict]:
    """The rows signed with ``key`` (without their MAC); the others are dropped, with a warning."""
    good = [{k: v for k, v in r.items() if k != MAC} for r in rows
            if isinstance(r, dict) and isinstance(r.get(MAC), str)
            and hmac.compare_digest(r[MAC], _mac(key, r))]
    if len(good) != len(rows):
        log.warning("%s: %d journal rows not signed by this data root's key were ignored", path,
                     len(rows) - len(good))
    return good


def read_journal(path: Path) -> list[dict]:
    """The verified rows of one journal file."""
    if not path.exists():
        return []
    return verified(_parse_lines(path.read_text(encoding="utf-8")), journal_key(path.parent), path)


class Journal:
    """An append-only JSONL file of finished calls, exclusively flock'd while its writer lives;
    each row signed with the data root's journal key."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._key = journal_key(path.parent)
        self._fh = path.open("a+", encoding="utf-8")
        fcntl.flock(self._fh, fcntl.LOCK_EX)

    def done(self) -> set[str]:
        """Keys this journal already holds a final answer for (a retried shard skips them)."""
        self._fh.seek(0)
        rows = verified(_parse_lines(self._fh.read()), self._key, self.path)
        return {r["request_hash"] for r in rows if r.get("status") == OK}

    def append(self, row: dict) -> None:
        signed = {**row, MAC: _mac(self._key, row)}
        self._fh.write(orjson.dumps(signed).decode() + "\n")
        self._fh.flush()  # in the OS's hands now: a killed process does not lose it

    def close(self) -> None:
        fcntl.flock(self._fh, fcntl.LOCK_UN)
        self._fh.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _parse_lines(text: str) -> list[dict]:
    rows = []
    for line in text.splitlines():
        try:
            rows.append(orjson.loads(line))
        except orjson.JSONDecodeError:
            pass  # a line cut short by a kill: that call was in flight, it is made again
    return rows


class ResponseCache:
    """``llm_responses`` (Lance) plus the journals not merged yet."""

    def __init__(self, lance_uri: str, journal_dir: Path) -> None:
        self.lance_uri, self.journal_dir = lance_uri, Path(journal_dir)

    def journal_path(self, run: str, shard: int) -> Path:
        return self.journal_dir / f"{run}-shard-{shard:05d}.jsonl"

    def lookup(self, hashes: Iterable[str]) -> dict[str, dict]:
        """Answered (status ok) rows among ``hashes``, without the prompt column."""
        wanted = set(hashes)
        db = connect(self.lance_uri)
        if not wanted or not table_exists(db, "llm_responses"):
            return {}
        cols = ["request_hash", "response", "model", "backend", "attempts", "latency_s", "prompt_tokens",
                "completion_tokens"]
        tbl = open_table(db, "llm_responses").to_lance().to_table(columns=cols, filter="status = 'ok'")
        return {r["request_hash"]: r for r in tbl.to_pylist() if r["request_hash"] in wanted}

    def merge(self, path: Path, rows: list[dict] | None = None) -> int:
        """Upsert one journal into ``llm_responses`` and delete it; returns the rows merged.
        Every journal row is a fresh call, so it replaces whatever the key held (an error row).
        ``rows``: the journal's verified rows where the caller has read them already."""
        if not path.exists():
            return 0
        rows = read_journal(path) if rows is None else rows
        if rows:
            table = dedupe(conform(pa.Table.from_pylist([{
                **r, "created_at": datetime.fromisoformat(r["created_at"]),
                "options": options_record(r.get("options")),  # the previous release's: JSON text
                "prompt": prompt_records(r.get("prompt"))} for r in rows], schema=LLM_RESPONSES.schema),
                LLM_RESPONSES), LLM_RESPONSES.key)
            tbl = open_table(connect(self.lance_uri), "llm_responses")
            (tbl.merge_insert("request_hash").when_matched_update_all().when_not_matched_insert_all()
             .execute(table))
        path.unlink()
        return len(rows)

    def recover(self) -> int:
        """Merge journals whose writer is gone (flock free): a killed run's finished calls."""
        merged = 0
        for path in sorted(self.journal_dir.glob("*.jsonl")) if self.journal_dir.is_dir() else []:
            with path.open("a") as fh:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a live writer (another run) owns it
                merged += self.merge(path)
        return merged

