"""The memory store: remember, recall, get, list, history, update, forget over the ``memories`` table.

An agent's long-term memory, one Lance table for every owner (each call names its owner, and
nothing crosses owners). The policy, from the course notes the product follows:

- durable facts stay; a durable fact with a subject ``key`` supersedes the owner's current fact
  on that key in the same commit (the old one is kept for :meth:`MemoryStore.history`, and no
  longer recalled);
- transient facts belong to a session: recalled only inside it, deleted when it ends
  (:meth:`MemoryStore.end_session`) and never returned after ``transient_ttl_hours`` (upkeep
  purges them);
- forgetting is physical (:mod:`memory.upkeep`).

This module is the facade; the parts: :mod:`memory.table` (the cached dataset, the writers' turn),
:mod:`memory.writes`, :mod:`memory.recall`, :mod:`memory.upkeep`, :mod:`memory.visibility` (the
one rule of what a read may return), :mod:`memory.scoring`. A store sees other processes' writes
within ``refresh_seconds`` and its own at once; it starts upkeep in the background when the table
needs it. mem0 users: add -> remember, search -> recall, get_all -> list, delete/reset -> forget.
"""

from __future__ import annotations

import logging
import uuid
import weakref
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, Protocol, Self

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from memory import scoring, upkeep, writes
from memory import visibility as vis
from memory.recall import Searcher
from memory.table import MemoryTable
from memory.upkeep import ForgetReport
from schemas.embed import EMBED_DIM, normalise_text
from schemas.memory import DURABLE, KINDS, MEMORIES, TRANSIENT, MemoryConfig
from storage.lance import conform, dedupe

log = logging.getLogger(__name__)
PUBLIC_COLUMNS = writes.PUBLIC_COLUMNS
__all__ = ["ForgetReport", "MemoryStore", "Recalled"]


class Embedder(Protocol):
    """What the store needs from the embed stage's model (``embed.model.Embedder``)."""

    fingerprint: str

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray: ...

    def embed_images(self, images: Sequence[Any]) -> np.ndarray: ...


@dataclass(frozen=True)
class Recalled:
    """A recalled memory (its columns, without the vector), its score and why."""

    memory: dict[str, Any]
    score: float
    breakdown: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def utc(t: datetime | None) -> datetime:
    if t is None:
        return datetime.now(UTC)
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)


class MemoryStore:
    def __init__(self, config: MemoryConfig, embedder: Embedder | None = None) -> None:
        self.config = config
        self.weights = scoring.Weights.from_config(config)
        self._embedder = embedder
        self.mt = MemoryTable(config)
        self.db = self.mt.db
        self.columns = self.mt.columns
        self.search = Searcher(self.mt, config)
        self.stats = writes.AccessStats(config.touch_flush_memories, config.touch_flush_seconds)
        self.background = upkeep.Background(self.mt, config)
        # pending access stats are written at exit if nobody closes the store
        self._finalizer = weakref.finalize(self, _flush_at_exit, self.mt, self.stats, self.background)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Write the access stats recalls have gathered (the store stays usable)."""
        self.flush()
        self.background.join()

    @property
    def table(self):
        return self.mt.table

    @property
    def embedder(self) -> Embedder:
        """The embed stage's ImageBind, loaded on first use (listing and forgetting never load it)."""
        if self._embedder is None:
            from embed.model import cached_embedder

            c = self.config
            self._embedder = cached_embedder(c.checkpoint, tiny=c.tiny, device=c.device)
        return self._embedder

    @property
    def fingerprint(self) -> str:
        if self._embedder is not None:
            return self._embedder.fingerprint
        from embed.weights import model_fingerprint

        return model_fingerprint(self.config.checkpoint, tiny=self.config.tiny)

    def _embed(self, text: str | None, image: Any | None) -> np.ndarray:
        if image is not None:
            vec = self.embedder.embed_images([image])
        else:
            vec = self.embedder.embed_texts([normalise_text(text)])
        return _unit(vec[0])

    def _scan(self, where: pc.Expression, columns: list[str] | None = None) -> pa.Table:
        self.flush()  # this store's reads see its own recalls' accesses
        t = self.mt.read(lambda ds: ds.to_table(columns=columns or PUBLIC_COLUMNS, filter=where))
        return t.sort_by([("created_at", "ascending")]) if "created_at" in t.column_names else t

    # --- write ---------------------------------------------------------------------------------

    def remember(
        self,
        owner: str,
        text: str | None = None,
        image: str | Path | Any | None = None,
        *,
        saliency: float | None = None,
        kind: str = DURABLE,
        key: str | None = None,
        session: str | None = None,
        image_ref: str | None = None,
        vector: np.ndarray | None = None,
        now: datetime | None = None,
        memory_id: str | None = None,
    ) -> dict[str, Any]:
        """Embed and store one memory; a durable one with ``key`` supersedes the current fact on it.

        Returns once the row is committed. Pass your own ``memory_id`` to make a retry safe: a call
        whose id is already stored returns the stored memory and writes nothing."""
        _check_owner(owner)
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if kind == TRANSIENT and not session:
            raise ValueError("a transient memory belongs to a session: pass session=...")
        if image is None and not (text and text.strip()):
            raise ValueError("remember needs a text or an image")
        if memory_id is not None and not (isinstance(memory_id, str) and 0 < len(memory_id) <= 128):
            raise ValueError("memory_id must be a non-empty string of at most 128 characters")
        saliency = self.config.default_saliency if saliency is None else float(saliency)
        if not 0.0 <= saliency <= 1.0:
            raise ValueError(f"saliency must be in [0, 1], got {saliency}")
        now = utc(now)
        if isinstance(image, (str, Path)):
            image_ref = image_ref or str(image)
            image = _open_image(image)
        vec = _unit(np.asarray(vector, np.float32)) if vector is not None else self._embed(text, image)
        row = {
            "memory_id": memory_id or uuid.uuid4().hex, "owner": owner,
            "modality": "image" if image is not None else "text",
            "text": normalise_text(text) if text else None, "image_ref": image_ref, "vector": vec,
            "model": self.fingerprint, "created_at": now, "last_accessed_at": now, "access_count": 0,
            "saliency": saliency, "kind": kind, "subject_key": key, "superseded_by": None,
            "session_id": session, "source": "remember",
        }
        stored = writes.add(self.mt, row, check_id=memory_id is not None)
        self._after_write()
        return stored

    def _after_write(self) -> None:
        try:
            self.background.poke()
        except Exception as exc:  # noqa: BLE001 -- upkeep never fails a committed write
            log.warning("memories upkeep not started: %s", exc)

    def add_rows(self, rows: pa.Table) -> int:
        """Insert prepared rows (seeding); rows whose ``memory_id`` exists are left alone."""
        if len(rows) == 0:
            return 0
        self.flush()
        n = writes.insert_new(self.mt, dedupe(conform(rows, MEMORIES), MEMORIES.key))
        self._after_write()
        return n

    def update(self, owner: str, memory_id: str, *, text: str | None = None, saliency: float | None = None,
               kind: str | None = None, key: str | None = None) -> dict[str, Any]:
        """Edit one memory (a new text is re-embedded). Old versions keep the old text until
        upkeep removes them; to erase content, forget the memory."""
        if saliency is not None and not 0.0 <= saliency <= 1.0:
            raise ValueError(f"saliency must be in [0, 1], got {saliency}")
        if kind is not None and kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self.flush()

        def edit(row: dict[str, Any]) -> dict[str, Any]:
            if text is not None:
                row["text"] = normalise_text(text)
                if row["modality"] == "text":  # an image's caption: the vector stays the image's
                    row["vector"], row["model"] = self._embed(text, None), self.fingerprint
            if saliency is not None:
                row["saliency"] = float(saliency)
            if kind is not None:
                row["kind"] = kind
            if key is not None:
                row["subject_key"] = key or None
            return row

        return writes.replace(self.mt, owner, memory_id, edit)

    # --- read ----------------------------------------------------------------------------------

    def _live(self, owner: str, now: datetime | None) -> pc.Expression:
        return vis.owned(owner) & vis.live(utc(now), self.config.transient_ttl_hours)

    def get(self, owner: str, memory_id: str, *, now: datetime | None = None) -> dict[str, Any] | None:
        rows = self._scan(self._live(owner, now) & vis.ids([memory_id])).to_pylist()
        return rows[0] if rows else None

    def list(self, owner: str, *, include_superseded: bool = False,
             now: datetime | None = None) -> list[dict[str, Any]]:
        """Every memory of ``owner``, oldest first (transient ones of live sessions included)."""
        where = self._live(owner, now) if include_superseded else self._live(owner, now) & vis.current()
        return self._scan(where).to_pylist()

    def history(self, owner: str, key: str, *, now: datetime | None = None) -> list[dict[str, Any]]:
        """Every fact ever stored on a subject key, oldest first; the last one is current."""
        return self._scan(self._live(owner, now) & (pc.field("subject_key") == key)).to_pylist()

    def visible(self, owner: str, session: str | None, now: datetime) -> pc.Expression:
        """What recall may return (:func:`memory.visibility.visible` for this store's model)."""
        return self.rule(owner, session, now)()

    def rule(self, owner: str, session: str | None, now: datetime) -> Callable:
        """:meth:`visible` for any builder of its terms (``rule(on)``, :mod:`memory.visibility`)."""
        ttl = self.config.transient_ttl_hours
        return partial(vis.visible, owner, self.fingerprint, session, utc(now), ttl)

    def candidates(self, q: np.ndarray, owner: str, session: str | None = None, now: datetime | None = None,
                   n: int | None = None) -> pa.Table:
        """The ``n`` (default ``candidates``) nearest visible memories of a query vector, before
        the re-rank: the scoring columns, ``_distance`` and ``_rowid``."""
        rule = self.rule(owner, session, now)
        return self.search.vector(_unit(q), owner, rule, n or self.config.candidates)

    def has_vector_index(self) -> bool:
        return self.search.has_vector_index(self.mt.dataset(fresh=True))

    def recall(
        self,
        owner: str,
        text: str | None = None,
        image: str | Path | Any | None = None,
        *,
        k: int = 5,
        now: datetime | None = None,
        session: str | None = None,
        hybrid: bool | None = None,
        weights: scoring.Weights | None = None,
        vector: np.ndarray | None = None,
        touch: bool = True,
    ) -> list[Recalled]:
        """The ``k`` best memories for a text or image query, each with its score breakdown.

        The ``candidates`` nearest (by the vector index once there is one) are re-ranked by
        similarity, recency, frequency and saliency; the ones returned get their access stats
        bumped (``touch``), which is what frequency and recency learn from.
        """
        _check_owner(owner)
        if k < 1:
            raise ValueError("k must be >= 1")
        now = utc(now)
        weights = weights or self.weights
        hybrid = self.config.hybrid if hybrid is None else hybrid
        if isinstance(image, (str, Path)):
            image = _open_image(image)
        if vector is not None:
            q = _unit(np.asarray(vector, np.float32))
        elif image is not None or (text and text.strip()):
            q = self._embed(text, image)
        else:
            raise ValueError("recall needs a text, an image or a vector")
        n = max(self.config.candidates, k)
        cands = self.candidates(q, owner, session, now, n)
        cos = 1.0 - cands.column("_distance").to_numpy().astype(np.float64)
        keyword = None
        if hybrid and text and text.strip():
            self._ensure_fts()
            cands, cos, keyword = self.search.text(cands, cos, q, text, self.visible(owner, session, now), n)
        if len(cands) == 0:
            return []
        seen = self.search.seen_version
        last, count = self.stats.adjust(cands, seen)
        c = self.config
        terms = {
            "similarity": scoring.similarity(cos),
            "recency": scoring.recency(last, now, c.half_life_hours),
            "frequency": scoring.frequency(count, c.frequency_saturation),
            "saliency": scoring.saliency(cands.column("saliency").to_numpy()),
        }
        if keyword is not None:
            terms["cosine"] = terms["similarity"]
            terms["keyword"] = keyword
            terms["similarity"] = (1 - c.keyword_weight) * terms["cosine"] + c.keyword_weight * keyword
        scores = scoring.combine(terms, weights)
        order = np.argsort(-scores, kind="stable")[:k]
        why = scoring.breakdowns({t: v[order] for t, v in terms.items()}, scores[order], weights)
        rows = self.search.public_rows(cands.take(pa.array(order)))
        if touch:
            unseen = self.stats.unseen(seen, [r["memory_id"] for r in rows])
            for r in rows:  # what the caller sees counts earlier recalls the rows read miss, and this one
                earlier, _ = unseen.get(r["memory_id"], (0, None))
                r["access_count"], r["last_accessed_at"] = r["access_count"] + earlier + 1, now
            if self.stats.touch([r["memory_id"] for r in rows], now):
                self.background.submit("access stats", self.flush)  # written off the caller's path
        return [Recalled(r, float(scores[i]), b) for r, i, b in zip(rows, order, why, strict=True)]

    def _ensure_fts(self) -> None:
        if not any(i.columns == ["text"] for i in self.table.list_indices()):
            with self.mt.writing() as tbl:
                upkeep.ensure_fts(tbl)

    def flush(self) -> int:
        """Write pending access stats in one commit; returns how many memories it updated."""
        n = self.stats.flush(self.mt)
        if n:
            self._after_write()
        return n

    # --- forgetting and upkeep -----------------------------------------------------------------

    def forget(self, owner: str, memory_id: str | None = None, *, everything: bool = False,
               key: str | None = None, dry_run: bool = False) -> ForgetReport:
        """Remove one memory, a subject's whole history (``key``), or all of ``owner``'s, from every
        file of the table (``dry_run``: only say what would go)."""
        _check_owner(owner)
        if sum(x is not None and x is not False for x in (memory_id, key, everything or None)) != 1:
            raise ValueError("forget needs exactly one of memory_id, key or everything=True")
        where = vis.owned(owner)
        if memory_id is not None:
            where = where & vis.ids([memory_id])
        elif key is not None:
            where = where & (pc.field("subject_key") == key)
        self.flush()
        return upkeep.purge(self.mt, where, dry_run=dry_run)

    def end_session(self, owner: str, session: str) -> ForgetReport:
        """The session is over: its transient memories are not kept."""
        _check_owner(owner)
        self.flush()
        where = vis.owned(owner) & (pc.field("session_id") == session) & (pc.field("kind") == TRANSIENT)
        return upkeep.purge(self.mt, where)

    def expire(self, now: datetime | None = None) -> ForgetReport:
        """Purge transient memories past ``transient_ttl_hours`` (reads stopped returning them when
        they expired; this removes their bytes)."""
        return upkeep.purge(self.mt, vis.expired(utc(now), self.config.transient_ttl_hours))

    def maintain(self) -> dict[str, Any]:
        """Purge expired memories, build the indexes once the table is big enough, fold small
        fragments, index new rows (the vector index keeps its partitions), drop old versions."""
        self.flush()
        return upkeep.maintain(self.mt, self.config)


# --- helpers ---------------------------------------------------------------------------------


def _check_owner(owner: str) -> None:
    if not isinstance(owner, str) or not owner.strip():
        raise ValueError("an owner id is required")


def _unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, np.float32).reshape(-1)
    if v.shape != (EMBED_DIM,):
        raise ValueError(f"a memory vector has {EMBED_DIM} dimensions, got {v.shape}")
    norm = float(np.linalg.norm(v))
    if not np.isfinite(norm) or norm == 0:
        raise ValueError("a memory vector must be finite and non-zero")
    return v / norm


def _flush_at_exit(mt: MemoryTable, stats: writes.AccessStats, background: upkeep.Background) -> None:
    """A store nobody closed: write its pending access stats as it goes (or the interpreter exits)."""
    background.join()
    if stats.pending:
        try:
            stats.flush(mt)
        except Exception as e:  # noqa: BLE001 -- the table may be gone (a deleted temp dir)
            log.warning("memory access stats not written: %s", e)


def _open_image(path: str | Path):
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        return im.convert("RGB")
