"""What the memory tests share (their fixtures ``embedder`` and ``store`` are in conftest.py): unit
vectors by seed, a bulk insert of facts, and readers of what the table's files hold."""

from __future__ import annotations

import os
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa

from schemas.embed import EMBED_DIM
from storage.lance import sql_literal

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def unit(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(EMBED_DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def stored_vector(store, memory_id: str) -> bytes:
    """The vector's bytes as the table holds them (the store re-normalises what it is given)."""
    t = store.table.to_lance().to_table(columns=["vector"], filter=f"memory_id = {sql_literal(memory_id)}")
    return np.asarray(t.column("vector")[0].values, np.float32).tobytes()


def add_facts(store, rows: int, seed: int) -> np.ndarray:
    """``rows`` durable facts of ann (ids m0.., vectors ``unit(seed + i)``) in one bulk insert."""
    vecs = np.stack([unit(seed + i) for i in range(rows)])
    store.add_rows(pa.table({
        "memory_id": [f"m{i}" for i in range(rows)], "owner": ["ann"] * rows, "modality": ["text"] * rows,
        "text": [f"fact {i}" for i in range(rows)],
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(vecs.reshape(-1)), EMBED_DIM),
        "model": [store.fingerprint] * rows, "created_at": [T0] * rows, "last_accessed_at": [T0] * rows,
        "access_count": [0] * rows, "saliency": [0.5] * rows, "kind": ["durable"] * rows,
    }))
    return vecs


def files_containing(root, needles: dict[str, bytes]) -> dict[str, list[str]]:
    """Which files under ``root`` hold each needle's bytes (data, deletion, index, manifest: all)."""
    found: dict[str, list[str]] = {name: [] for name in needles}
    for dirpath, _, files in os.walk(root):
        for f in files:
            path = os.path.join(dirpath, f)
            with open(path, "rb") as fh:
                data = fh.read()
            for name, needle in needles.items():
                if needle in data:
                    found[name].append(os.path.relpath(path, root))
    return found
