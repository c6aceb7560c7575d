"""Another process using the memory store (the memory concurrency tests run it as a subprocess).

    python _memory_worker.py add ROOT OWNER N LOG [START]   # remember N memories, log each committed id
    python _memory_worker.py forget ROOT OWNER             # forget every memory of OWNER
    python _memory_worker.py supersede ROOT OWNER KEY TEXT # a new fact on KEY
    python _memory_worker.py maintain ROOT                 # upkeep now

Vectors are given (no model): memory ``i`` of an owner has the unit vector of seed
``hash(owner) + i``, so every process knows every vector. Ids are ``OWNER-i``, passed by the
caller: a retried call never stores a memory twice.
"""

from __future__ import annotations

import sys
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


def add(root: str, owner: str, n: int, log: str, start: int = 0) -> None:
    s = store(root, upkeep_small_fragments=8)
    with open(log, "a") as fh:
        for i in range(start, start + n):
            s.remember(owner, f"{owner} fact {i}", vector=vector(owner, i), memory_id=f"{owner}-{i}")
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
