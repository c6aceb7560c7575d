"""Seed the memory from ingested VisDial: each dialog's image and its ten turns become memories.

A dialog is a conversation that happened: the image (with its caption as its text) is
remembered first, then each turn one ``seed_turn_spacing_s`` later. With one ``owner`` the
dialogs are that owner's history, one ``seed_dialog_gap_hours`` apart and ending at ``now``;
without one, each dialog is its own owner ``visdial:<image_id>``.

Vectors come from the embed stage's tables (``image_embeddings``, ``text_embeddings``) when they
were made by the store's model, so seeding does not embed twice; what is missing is embedded
with the store's embedder. Memory ids are a hash of owner and source, so a re-run inserts only
what is new.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from memory.store import MemoryStore, utc
from schemas.embed import EMBED_DIM, turn_text
from schemas.ingest import NUM_TURNS
from schemas.memory import DURABLE, MEMORIES
from storage.lance import open_table, read, table_exists


def memory_id(owner: str, source: str) -> str:
    return hashlib.sha256(f"{owner}\0{source}".encode()).hexdigest()[:32]


def seed_visdial(
    store: MemoryStore,
    *,
    split: str | None = None,
    owner: str | None = None,
    limit: int | None = None,
    images_root: Path | None = None,
    now: datetime | None = None,
    chunk_dialogs: int = 2000,
    progress: Callable[[int], None] | None = None,
) -> dict[str, int]:
    """Insert the memories of every ingested dialog (or the first ``limit``); returns counts."""
    db, now = store.db, utc(now)
    where = pc.field("split") == split if split else None
    dialogs = read(db, "dialogs", columns=["image_id", "caption"], where=where).sort_by("image_id")
    if limit is not None:
        dialogs = dialogs.slice(0, limit)
    existing = set(store.table.to_lance().to_table(columns=["memory_id"]).column("memory_id").to_pylist())
    turns = read(db, "turns", columns=["image_id", "turn", "question", "answer", "text_hash"], where=where)
    images = read(db, "images", columns=["image_id", "path"])
    paths = dict(zip(images.column("image_id").to_pylist(), images.column("path").to_pylist(), strict=True))
    counts = {"dialogs": len(dialogs), "inserted": 0, "embedded": 0}
    sources = {"text": _Vectors(store, "text_embeddings", "text_hash"),
               "image": _Vectors(store, "image_embeddings", "image_id")}
    for start in range(0, len(dialogs), chunk_dialogs):
        chunk = dialogs.slice(start, chunk_dialogs)
        chunk_turns = turns.filter(pc.is_in(turns.column("image_id"), chunk.column("image_id")))
        recs = _records(store, chunk, chunk_turns, paths, start, len(dialogs), owner, now)
        recs = [r for r in recs if r["memory_id"] not in existing]
        counts["inserted"] += store.add_rows(_rows(store, recs, sources, images_root, counts))
        if progress:
            progress(len(chunk))
    return counts


def _records(store, dialogs, turns, paths, offset, total, owner, now) -> list[dict]:
    """One record per image and turn, timed as the conversation went (no vectors yet)."""
    c = store.config
    spacing = timedelta(seconds=c.seed_turn_spacing_s)
    gap = timedelta(hours=c.seed_dialog_gap_hours)
    ids = dialogs.column("image_id").to_pylist()
    position = {image_id: offset + i for i, image_id in enumerate(ids)}

    def start_of(image_id: int) -> datetime:  # the last dialog ends at ``now``
        back = (total - position[image_id] - 1) * gap if owner else timedelta(0)
        return now - back - NUM_TURNS * spacing

    recs = [
        {
            "owner": owner or f"visdial:{image_id}",
            "source": f"visdial:{image_id}:0",
            "modality": "image",
            "image_id": image_id,
            "text": caption,
            "image_ref": paths.get(image_id),
            "at": start_of(image_id),
            "saliency": c.seed_image_saliency,
        }
        for image_id, caption in zip(ids, dialogs.column("caption").to_pylist(), strict=True)
    ]
    for t in turns.to_pylist():
        recs.append(
            {
                "owner": owner or f"visdial:{t['image_id']}",
                "source": f"visdial:{t['image_id']}:{t['turn']}",
                "modality": "text",
                "text": turn_text(t["question"], t["answer"]),
                "text_hash": t["text_hash"],
                "image_ref": None,
                "at": start_of(t["image_id"]) + t["turn"] * spacing,
                "saliency": c.seed_turn_saliency,
            }
        )
    for r in recs:
        r["memory_id"] = memory_id(r["owner"], r["source"])
    return recs


def _rows(store: MemoryStore, recs: list[dict], sources: dict[str, _Vectors], images_root: Path | None,
          counts: dict[str, int]) -> pa.Table:
    if not recs:
        return MEMORIES.schema.empty_table()
    vectors = _vectors(store, recs, sources, images_root, counts)
    return pa.table({
        "memory_id": [r["memory_id"] for r in recs],
        "owner": [r["owner"] for r in recs],
        "modality": [r["modality"] for r in recs],
        "text": [r["text"] for r in recs],
        "image_ref": [r["image_ref"] for r in recs],
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), EMBED_DIM),
        "model": [store.fingerprint] * len(recs),
        "created_at": pa.array([r["at"] for r in recs], pa.timestamp("us", tz="UTC")),
        "last_accessed_at": pa.array([r["at"] for r in recs], pa.timestamp("us", tz="UTC")),
        "access_count": pa.array([0] * len(recs), pa.int64()),
        "saliency": pa.array([r["saliency"] for r in recs], pa.float32()),
        "kind": [DURABLE] * len(recs),
        "source": [r["source"] for r in recs],
    })


class _Vectors:
    """Vectors of one embed-stage table made by the store's model, taken by key without reading
    the whole table (827,830 x 4 KiB) once per chunk."""

    def __init__(self, store: MemoryStore, name: str, key: str) -> None:
        self.ds = None
        self.rows: dict = {}
        if table_exists(store.db, name):
            self.ds = open_table(store.db, name).to_lance()
            keys = self.ds.to_table(columns=[key, "model"], with_row_id=False)
            mine = pc.equal(keys.column("model"), store.fingerprint).to_numpy(zero_copy_only=False)
            self.rows = {
                k: j for j, (k, m) in enumerate(zip(keys.column(key).to_pylist(), mine, strict=True)) if m
            }

    def fill(self, out: np.ndarray, have: np.ndarray, idx: list[int], keys: list) -> None:
        found = [(i, self.rows[k]) for i, k in zip(idx, keys, strict=True) if k in self.rows]
        if not found:
            return
        pos = np.array([j for _, j in found])
        order = np.argsort(pos)
        got = self.ds.take(pos[order].tolist(), columns=["vector"]).column("vector")
        vecs = got.combine_chunks().flatten().to_numpy().reshape(-1, EMBED_DIM)
        targets = np.array([i for i, _ in found])[order]
        out[targets] = vecs
        have[targets] = True


def _vectors(store: MemoryStore, recs: list[dict], sources: dict[str, _Vectors], images_root: Path | None,
             counts: dict[str, int]) -> np.ndarray:
    """Reuse the embed stage's vectors made by the store's model; embed the rest."""
    out = np.zeros((len(recs), EMBED_DIM), np.float32)
    have = np.zeros(len(recs), bool)
    text_idx = [i for i, r in enumerate(recs) if r["modality"] == "text"]
    image_idx = [i for i, r in enumerate(recs) if r["modality"] == "image"]
    sources["text"].fill(out, have, text_idx, [recs[i]["text_hash"] for i in text_idx])
    sources["image"].fill(out, have, image_idx, [recs[i]["image_id"] for i in image_idx])
    todo_t = [i for i in text_idx if not have[i]]
    if todo_t:
        out[todo_t] = store.embedder.embed_texts([recs[i]["text"] for i in todo_t])
        counts["embedded"] += len(todo_t)
    todo_i = [i for i in image_idx if not have[i]]
    if todo_i:
        if images_root is None:
            raise ValueError(
                f"{len(todo_i)} images have no embedding by {store.fingerprint} in image_embeddings: "
                "run the embed stage with the same model, or pass the image folder (--images)"
            )
        from memory.store import _open_image

        for i in todo_i:
            out[i] = store.embedder.embed_images([_open_image(Path(images_root) / recs[i]["image_ref"])])[0]
        counts["embedded"] += len(todo_i)
    return out
