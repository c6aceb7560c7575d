"""Another process using the memory store (the memory concurrency tests run it as a subprocess).

    python _memory_worker.py add ROOT OWNER N LOG [START]   # remember N memories, log each committed id
    python _memory_worker.py forget ROOT OWNER             # forget every memory of OWNER
    python _memory_worker.py supersede ROOT OWNER KEY TEXT # a new fact on KEY
    python _memory_worker.py maintain ROOT                 # upkeep now

With ``MEMORY_WORKER_NO_IDS=1`` an ``add`` lets the store choose the ids (a retry is not safe).
With ``MEMORY_WORKER_DIE_IN_GROUP=claim`` (or ``commit``) an ``add`` SIGKILLs itself while it holds
the writers' turn with other writers' memories claimed, before (after) their commit.

Vectors are given (no model): memory ``i`` of an owner has the unit vector of seed
``hash(owner) + i``, so every process knows every vector. Ids are ``OWNER-i``, passed by the
caller: a retried call never stores a memory twice.
"""

from __future__ import annotations

import os
import signal
import sys
import time
import zlib
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from memory.store import MemoryStore
from schemas.memory import MemoryConfig


class GivenVectors:
    fingerprint = "synthetic"

    def embed_texts(self, texts):
        raise RuntimeError("vectors are given")

    embed_images = embed_texts


def vector(owner: str, i: int) -> np.ndarray:
    v = np.random.default_rng(zlib.crc32(owner.encode()) + i).standard_normal(1024).astype(np.float32)
    return v / np.linalg.norm(v)


def store(root: str, **config) -> MemoryStore:
    return MemoryStore(MemoryConfig(data_root=Path(root), **config), GivenVectors())


def die_in_group_commit(at: str) -> None:
    import memory.writes as w
    from memory.spool import Spool

    claim, append, others = Spool.claim, w._append, []

    def claiming(self):
        time.sleep(0.3)  # in the turn: let the other writers' entries pile up
        got = claim(self)
        if any(not e.token.startswith(f"{os.getpid()}-") for e in got):
            if at == "claim":
                os.kill(os.getpid(), signal.SIGKILL)
            others.append(True)
        return got

    def appending(*args, **kw):
        append(*args, **kw)
        if others:
            os.kill(os.getpid(), signal.SIGKILL)

    Spool.claim, w._append = claiming, appending


def add(root: str, owner: str, n: int, log: str, start: int = 0) -> None:
    if at := os.environ.get("MEMORY_WORKER_DIE_IN_GROUP"):
        die_in_group_commit(at)
    s = store(root, upkeep_small_fragments=8)
    with open(log, "a") as fh:
        for i in range(start, start + n):
            mid = None if os.environ.get("MEMORY_WORKER_NO_IDS") else f"{owner}-{i}"
            s.remember(owner, f"{owner} fact {i}", vector=vector(owner, i), memory_id=mid)
            fh.write(f"{owner}-{i}\n")
            fh.flush()
    s.close()


def main(argv: list[str]) -> None:
    role, root, *rest = argv
    if role == "add":
        owner, n, log, *start = rest
        add(root, owner, int(n), log, int(start[0]) if start else 0)
    elif role == "forget":
        print(store(root).forget(rest[0], everything=True).deleted)
    elif role == "supersede":
        owner, key, text = rest
        print(store(root).remember(owner, text, key=key, vector=vector(owner, 10_000))["memory_id"])
    elif role == "maintain":
        s = store(root)
        print("ready", flush=True)
        print(s.maintain())
    else:
        raise SystemExit(f"unknown role {role}")


if __name__ == "__main__":
    main(sys.argv[1:])
