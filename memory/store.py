"""The memory store: remember, recall, get, list, history, update, forget over the ``memories`` table.

An agent's long-term memory, one Lance table for every owner (each call names its owner, and
nothing crosses owners). The policy, from the course notes the product follows:

- durable facts stay; a durable fact with a subject ``key`` supersedes the owner's current fact
  on that key (the old one is kept for :meth:`MemoryStore.history`, and no longer recalled);
- transient facts belong to a session: recalled only inside it, deleted when it ends
  (:meth:`MemoryStore.end_session`) or, if nobody ends it, after ``transient_ttl_hours``;
- forgetting is physical: delete, compact the fragments that held the rows, drop the tags whose
  versions still hold them, and clean up every old version, because a Lance delete only writes
  a deletion file and old versions (and tagged ones, which cleanup keeps) still reference the
  bytes.

Recall is a vector search filtered by owner, re-ranked by :mod:`memory.scoring`; it bumps the
access stats of what it returns, which the store writes in batches (:meth:`MemoryStore.flush`,
``close()``, or ``with MemoryStore(...) as store``). A store sees the table as of its own last
write; a long-lived one serving recalls while other processes write should be reopened to see
theirs. mem0 users: add -> remember, search -> recall, get_all -> list, delete/reset -> forget.
"""

from __future__ import annotations

import logging
import time
import uuid
import weakref
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from lancedb.index import FTS, Bitmap, BTree, IvfFlat, IvfHnswSq, IvfPq

from memory import scoring
from memory.columns import RecallColumns, visible_mask
from schemas.embed import EMBED_DIM, normalise_text
from schemas.memory import DURABLE, KINDS, MEMORIES, TRANSIENT, MemoryConfig
from storage.index import index_new_rows, partitions_for
from storage.lance import conform, connect, dedupe, open_table

TABLE = MEMORIES.name
log = logging.getLogger(__name__)
# Fragments under COMPACT_ROWS are merged with each other (bulk writes make bigger ones, which are
# left alone: rewriting an 827k-row fragment moves 3.4 GB); writes fold them once FOLD_AT pile up,
# because every fragment costs each search ~0.7 ms (31 one-recall fragments: 32 -> 53 ms)
COMPACT_ROWS = 16_384
FOLD_AT = 16
OVERFETCH = 1.5  # nearest rows searched per wanted candidate when the filter comes after the search
PUBLIC_COLUMNS = [c for c in MEMORIES.columns if c != "vector"]
# what the re-rank needs of a full-text hit (vector hits get theirs from memory.columns); the
# public columns are fetched for the final k only
SCORE_COLUMNS = ["memory_id", "last_accessed_at", "access_count", "saliency"]
# the columns recall's filter reads (bitmaps for the few-valued ones)
SCALAR_INDICES = {"owner": "BTREE", "memory_id": "BTREE", "superseded_by": "BTREE", "session_id": "BTREE",
                  "created_at": "BTREE", "kind": "BITMAP", "model": "BITMAP"}


class Embedder(Protocol):
    """What the store needs from the embed stage's model (``training.imagebind.Embedder``)."""

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


@dataclass
class ForgetReport:
    deleted: int = 0
    memory_ids: list[str] = field(default_factory=list)
    tags_dropped: list[str] = field(default_factory=list)
    bytes_removed: int = 0
    versions_removed: int = 0


def sql_str(value: str) -> str:
    """A SQL string literal (the filters are DataFusion SQL; owners and keys come from users)."""
    return "'" + str(value).replace("'", "''") + "'"


def sql_ts(t: datetime) -> str:
    return f"arrow_cast({sql_str(utc(t).isoformat())}, 'Timestamp(Microsecond, Some(\"UTC\"))')"


def utc(t: datetime | None) -> datetime:
    if t is None:
        return datetime.now(UTC)
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)


class MemoryStore:
    def __init__(self, config: MemoryConfig, embedder: Embedder | None = None) -> None:
        self.config = config
        self.weights = scoring.Weights.from_config(config)
        self._embedder = embedder
        self.db = connect(config.lance_uri)
        self._tbl = None
        self._ds = None  # the table as a lance dataset, kept so the vector index stays cached
        self._indexed: tuple[int, bool] | None = None  # (version, has a vector index)
        self.columns = RecallColumns()
        self._prefilter_owners: set[str] = set()  # owners too sparse in the table to post-filter
        # access stats of recalls not written yet: memory_id -> (accesses, last access); written by
        # flush() in one commit (see _touch), and at exit if nobody called close()
        self._pending: dict[str, tuple[int, datetime]] = {}
        self._pending_since = 0.0
        self._finalizer = None

    def __enter__(self) -> MemoryStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Write the access stats recalls have gathered (the store stays usable)."""
        self.flush()

    # --- plumbing ------------------------------------------------------------------------------

    @property
    def embedder(self) -> Embedder:
        """The embed stage's ImageBind, loaded on first use (listing and forgetting never load it)."""
        if self._embedder is None:
            from training.imagebind import cached_embedder

            c = self.config
            self._embedder = cached_embedder(c.checkpoint, tiny=c.tiny, device=c.device)
        return self._embedder

    @property
    def fingerprint(self) -> str:
        if self._embedder is not None:
            return self._embedder.fingerprint
        from training.imagebind import model_fingerprint

        return model_fingerprint(self.config.checkpoint, tiny=self.config.tiny)

    @property
    def table(self):
        if self._tbl is None:
            self._tbl = open_table(self.db, TABLE)
        return self._tbl

    def _dataset(self):
        """The table as a ``lance.LanceDataset`` at the table's version, with :attr:`columns` synced.
        One per store, moved along by ``checkout_version``, so the vector index stays in its cache
        (``Table.to_lance()`` opens a new dataset with a cold cache on every call)."""
        version = self.table.version
        if self._ds is None:
            self._ds = self.table.to_lance()
        if self._ds.version != version:
            self._ds = self._ds.checkout_version(version)
        self.columns.sync(self._ds)
        return self._ds

    def _scan(self, where: str, columns: list[str] | None = None) -> pa.Table:
        self.flush()
        ds = self.table.to_lance()
        t = ds.to_table(columns=columns or PUBLIC_COLUMNS, filter=where)
        return t.sort_by([("created_at", "ascending")]) if "created_at" in t.column_names else t

    def _write(self, rows: pa.Table) -> None:
        """Upsert full rows on ``memory_id`` in one commit (a new fact and the ones it supersedes)."""
        self.flush()
        rows = dedupe(conform(rows, MEMORIES), MEMORIES.key)
        (self.table.merge_insert("memory_id").when_matched_update_all().when_not_matched_insert_all()
         .execute(rows))
        self._fold_small_fragments()

    def _embed(self, text: str | None, image: Any | None) -> np.ndarray:
        if image is not None:
            vec = self.embedder.embed_images([image])
        else:
            vec = self.embedder.embed_texts([normalise_text(text)])
        return _unit(vec[0])

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
    ) -> dict[str, Any]:
        """Embed and store one memory; a durable one with ``key`` supersedes the current fact on it."""
        _check_owner(owner)
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if kind == TRANSIENT and not session:
            raise ValueError("a transient memory belongs to a session: pass session=...")
        if image is None and not (text and text.strip()):
            raise ValueError("remember needs a text or an image")
        saliency = self.config.default_saliency if saliency is None else float(saliency)
        if not 0.0 <= saliency <= 1.0:
            raise ValueError(f"saliency must be in [0, 1], got {saliency}")
        now = utc(now)
        if isinstance(image, (str, Path)):
            image_ref = image_ref or str(image)
            image = _open_image(image)
        vec = _unit(np.asarray(vector, np.float32)) if vector is not None else self._embed(text, image)
        row = {
            "memory_id": uuid.uuid4().hex, "owner": owner, "modality": "image" if image is not None else "text",
            "text": normalise_text(text) if text else None, "image_ref": image_ref, "vector": vec,
            "model": self.fingerprint, "created_at": now, "last_accessed_at": now, "access_count": 0,
            "saliency": saliency, "kind": kind, "subject_key": key, "superseded_by": None,
            "session_id": session, "source": "remember",
        }
        rows = [row]
        if key and kind == DURABLE:
            current = self._current_on_key(owner, key)
            for old in current:
                old["superseded_by"] = row["memory_id"]
            rows += current
        self._write(_rows_table(rows))
        self.expire(now, owner=owner)
        return _public(row)

    def _current_on_key(self, owner: str, key: str) -> list[dict[str, Any]]:
        where = (f"owner = {sql_str(owner)} AND subject_key = {sql_str(key)} AND superseded_by IS NULL "
                 f"AND kind = '{DURABLE}'")
        return self._scan(where, MEMORIES.columns).to_pylist()

    def add_rows(self, rows: pa.Table) -> int:
        """Insert prepared rows (seeding); rows whose ``memory_id`` exists are left alone."""
        if len(rows) == 0:
            return 0
        self.flush()
        rows = dedupe(conform(rows, MEMORIES), MEMORIES.key)
        res = self.table.merge_insert("memory_id").when_not_matched_insert_all().execute(rows)
        return res.num_inserted_rows

    def update(
        self,
        owner: str,
        memory_id: str,
        *,
        text: str | None = None,
        saliency: float | None = None,
        kind: str | None = None,
        key: str | None = None,
    ) -> dict[str, Any]:
        """Edit one memory (a new text is re-embedded). Old versions keep the old text until the
        next :meth:`purge`; to erase content, forget the memory."""
        rows = self._scan(f"owner = {sql_str(owner)} AND memory_id = {sql_str(memory_id)}", MEMORIES.columns)
        if len(rows) == 0:
            raise KeyError(f"owner {owner!r} has no memory {memory_id!r}")
        row = rows.to_pylist()[0]
        if text is not None:
            if row["modality"] != "text":
                row["text"] = normalise_text(text)  # an image's caption: the vector stays the image's
            else:
                row["text"], row["vector"] = normalise_text(text), self._embed(text, None)
                row["model"] = self.fingerprint
        if saliency is not None:
            if not 0.0 <= saliency <= 1.0:
                raise ValueError(f"saliency must be in [0, 1], got {saliency}")
            row["saliency"] = float(saliency)
        if kind is not None:
            if kind not in KINDS:
                raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
            row["kind"] = kind
        if key is not None:
            row["subject_key"] = key or None
        self._write(_rows_table([row]))
        return _public(row)

    # --- read ----------------------------------------------------------------------------------

    def get(self, owner: str, memory_id: str) -> dict[str, Any] | None:
        rows = self._scan(f"owner = {sql_str(owner)} AND memory_id = {sql_str(memory_id)}").to_pylist()
        return rows[0] if rows else None

    def list(self, owner: str, *, include_superseded: bool = False) -> list[dict[str, Any]]:
        """Every memory of ``owner``, oldest first (transient ones of open sessions included)."""
        where = f"owner = {sql_str(owner)}" + ("" if include_superseded else " AND superseded_by IS NULL")
        return self._scan(where).to_pylist()

    def history(self, owner: str, key: str) -> list[dict[str, Any]]:
        """Every fact ever stored on a subject key, oldest first; the last one is current."""
        return self._scan(f"owner = {sql_str(owner)} AND subject_key = {sql_str(key)}").to_pylist()

    def visible_filter(self, owner: str, session: str | None, now: datetime) -> str:
        """What recall may return: the owner's current durable facts and this session's transient ones."""
        where = f"owner = {sql_str(owner)} AND superseded_by IS NULL AND model = {sql_str(self.fingerprint)}"
        if session:
            cutoff = now - timedelta(hours=self.config.transient_ttl_hours)
            return (f"{where} AND (kind = '{DURABLE}' OR (session_id = {sql_str(session)} "
                    f"AND created_at >= {sql_ts(cutoff)}))")
        return f"{where} AND kind = '{DURABLE}'"

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
        cands = self._vector_candidates(q, owner, session, now, n)
        cos = 1.0 - cands.column("_distance").to_numpy().astype(np.float64)
        keyword = None
        if hybrid and text and text.strip():
            where = self.visible_filter(owner, session, now)
            cands, cos, keyword = self._add_text_candidates(cands, cos, q, text, where, n)
        if len(cands) == 0:
            return []
        last, count = self._access_stats(cands)
        terms = {
            "similarity": scoring.similarity(cos),
            "recency": scoring.recency(last, now, self.config.half_life_hours),
            "frequency": scoring.frequency(count, self.config.frequency_saturation),
            "saliency": scoring.saliency(cands.column("saliency").to_numpy()),
        }
        if keyword is not None:
            terms["cosine"] = terms["similarity"]
            terms["keyword"] = keyword
            h = self.config.keyword_weight
            terms["similarity"] = (1 - h) * terms["cosine"] + h * keyword
        scores = scoring.combine(terms, weights)
        order = np.argsort(-scores, kind="stable")[:k]
        why = scoring.breakdowns({t: v[order] for t, v in terms.items()}, scores[order], weights)
        rows = self._public_rows(cands.take(pa.array(order)))
        if touch:
            for r in rows:  # what the caller sees counts earlier recalls not written yet, and this one
                pending, _ = self._pending.get(r["memory_id"], (0, None))
                r["access_count"], r["last_accessed_at"] = r["access_count"] + pending + 1, now
            self._touch([r["memory_id"] for r in rows], now)
        return [Recalled(r, float(scores[i]), b) for r, i, b in zip(rows, order, why, strict=True)]

    def _vector_candidates(self, q: np.ndarray, owner: str, session: str | None, now: datetime,
                           n: int) -> pa.Table:
        """The ``n`` nearest visible memories: :data:`memory.columns.COLUMNS`, ``_distance``, ``_rowid``.

        The search returns row addresses and distances only; the columns come from
        :attr:`columns` (in memory). With a vector index, the filter is first applied *after* the
        search, to ``OVERFETCH`` times ``n`` nearest rows: when the owner's visible memories are
        most of the table (one agent's memory), that is the same top ``n`` without evaluating the
        filter over every row (~20 ms at 827,830 memories on 2 cores). When too few survive (an
        owner with a small share), it searches again with the filter first, and does so directly
        for that owner from then on.
        """
        ds = self._dataset()
        c = self.config

        def search(where: str | None, limit: int) -> pa.Table:
            nearest: dict[str, Any] = {"column": "vector", "q": q, "k": limit, "metric": "cosine"}
            if indexed:
                nearest.update(nprobes=c.nprobes, ef=c.ef)
                if c.refine_factor:
                    nearest["refine_factor"] = c.refine_factor
            hits = ds.to_table(columns=["_distance"], nearest=nearest, filter=where, prefilter=where is not None,
                               with_row_id=True, with_row_address=True, disable_scoring_autoprojection=True)
            rows = self.columns.take(hits.column("_rowaddr").to_numpy())
            return rows.append_column("_distance", hits.column("_distance")).append_column("_rowid", hits.column("_rowid"))

        indexed = self.has_vector_index(ds.version)
        if indexed and owner not in self._prefilter_owners:
            cutoff = now - timedelta(hours=c.transient_ttl_hours)
            got = search(None, int(n * OVERFETCH))
            got = got.filter(visible_mask(got, owner, self.fingerprint, session, cutoff))
            if len(got) >= n:
                return got.slice(0, n)
            self._prefilter_owners.add(owner)
        return search(self.visible_filter(owner, session, now), n)

    def _add_text_candidates(self, cands: pa.Table, cos: np.ndarray, q: np.ndarray, text: str, where: str, n: int):
        """Union with LanceDB full-text hits; BM25 scaled by the best hit becomes the keyword term."""
        self._ensure_fts()
        fts = (self.table.search(normalise_text(text), query_type="fts", fts_columns="text")
               .where(where, prefilter=True).select([*SCORE_COLUMNS, "vector", "_score"])
               .with_row_id(True).limit(n).to_arrow())
        bm25 = dict(zip(fts.column("memory_id").to_pylist(), fts.column("_score").to_numpy(), strict=True))
        best = max(bm25.values(), default=0.0)
        if best <= 0:  # no word in common with any memory: nothing to blend
            return cands, cos, None
        have = set(cands.column("memory_id").to_pylist())
        extra = fts.filter(pc.invert(pc.is_in(fts.column("memory_id"), pa.array(sorted(have), pa.string()))))
        if len(extra):
            vecs = np.stack(extra.column("vector").to_numpy(zero_copy_only=False)).astype(np.float32)
            cos = np.concatenate([cos, vecs @ q])
            keep = [*SCORE_COLUMNS, "_rowid"]
            cands = pa.concat_tables([cands.select(keep), extra.select(keep)])
        keyword = np.array([bm25.get(m, 0.0) / best for m in cands.column("memory_id").to_pylist()], np.float64)
        return cands, cos, keyword

    def _public_rows(self, picked: pa.Table) -> list[dict[str, Any]]:
        """The public columns of the chosen candidates, in their order: taken by row id (a few
        random reads, ~2 ms at 827,830 memories), or by ``memory_id`` (a filtered scan, ~20 ms at 827,830 memories) if
        the table changed in between and the row ids moved."""
        ids = picked.column("memory_id").to_pylist()
        rows = self._take_public(picked)
        if rows is None:
            found = self._scan(f"memory_id IN ({', '.join(sql_str(m) for m in ids)})")
            rows = found.take(pa.array([found.column("memory_id").to_pylist().index(m) for m in ids]))
        return rows.select(PUBLIC_COLUMNS).to_pylist()

    def _take_public(self, picked: pa.Table) -> pa.Table | None:
        """``picked``'s rows by row id, in ``picked``'s order (Lance returns them in row-id order);
        None when a row id no longer holds the memory it held (compaction, concurrent writes)."""
        ids = picked.column("memory_id").to_pylist()
        if not ids:
            return picked.select([])
        row_ids = ", ".join(str(r) for r in picked.column("_rowid").to_pylist())
        # a row-id filter is a take (lancedb's take_row_ids: ~1 ms more in its query layer)
        ds = self._ds if self._ds is not None else self._dataset()  # the version the search saw
        rows = ds.to_table(columns=PUBLIC_COLUMNS, filter=f"_rowid IN ({row_ids})")
        at = {m: i for i, m in enumerate(rows.column("memory_id").to_pylist())}
        if len(rows) != len(ids) or any(m not in at for m in ids):
            return None
        return rows.take(pa.array([at[m] for m in ids], pa.int64()))

    # --- access stats ----------------------------------------------------------------------------

    def _touch(self, memory_ids: list[str], now: datetime) -> None:
        """Count an access of each memory. Written by :meth:`flush` once ``touch_flush_memories``
        are pending or the oldest is ``touch_flush_seconds`` old (and before any other read or
        write of this store): a write moves the rows to a new fragment and costs ~13 ms, so a
        write per recall doubled a recall and left a fragment per recall for every search to
        visit. Recalls of this store see pending accesses at once; other processes see them once
        written."""
        if not self._pending:
            self._pending_since = time.monotonic()
        for m in memory_ids:
            count, _ = self._pending.get(m, (0, now))
            self._pending[m] = (count + 1, now)
        if self._finalizer is None:  # written at exit if nobody closes the store
            self._finalizer = weakref.finalize(self, _flush_at_exit, self.table, self._pending)
        c = self.config
        if len(self._pending) >= c.touch_flush_memories or time.monotonic() - self._pending_since >= c.touch_flush_seconds:
            self.flush()

    def _access_stats(self, cands: pa.Table) -> tuple[np.ndarray, np.ndarray]:
        """Candidates' last access (datetime64[us]) and access count, pending accesses included."""
        last = cands.column("last_accessed_at").to_numpy().astype("datetime64[us]")
        count = cands.column("access_count").to_numpy().astype(np.int64)
        if self._pending:
            for i, m in enumerate(cands.column("memory_id").to_pylist()):
                if m in self._pending:
                    n, t = self._pending[m]
                    count[i] += n
                    last[i] = np.datetime64(utc(t).replace(tzinfo=None), "us")
        return last, count

    def flush(self) -> int:
        """Write pending access stats in one commit; returns how many memories it updated."""
        if not self._pending:
            return 0
        n = _write_access_stats(self.table, self._pending)
        self._pending.clear()
        self._fold_small_fragments()
        return n

    def _fold_small_fragments(self) -> None:
        """Merge small fragments once ``FOLD_AT`` have piled up (remembers and access-stat writes
        each add one); the vector index keeps covering what it covered."""
        ds = self.table.to_lance()
        if sum(f.metadata.physical_rows < COMPACT_ROWS for f in ds.get_fragments()) >= FOLD_AT:
            ds.optimize.compact_files(target_rows_per_fragment=COMPACT_ROWS)
            self.table.checkout_latest()

    # --- forgetting ----------------------------------------------------------------------------

    def forget(self, owner: str, memory_id: str | None = None, *, everything: bool = False,
               key: str | None = None) -> ForgetReport:
        """Remove one memory, a subject's whole history (``key``), or all of ``owner``'s, from every
        file of the table: delete, compact, drop tags that pin them, clean up old versions."""
        _check_owner(owner)
        if sum(x is not None and x is not False for x in (memory_id, key, everything or None)) != 1:
            raise ValueError("forget needs exactly one of memory_id, key or everything=True")
        where = f"owner = {sql_str(owner)}"
        if memory_id is not None:
            where += f" AND memory_id = {sql_str(memory_id)}"
        elif key is not None:
            where += f" AND subject_key = {sql_str(key)}"
        return self._delete_and_purge(where)

    def end_session(self, owner: str, session: str) -> ForgetReport:
        """The session is over: its transient memories are not kept."""
        return self._delete_and_purge(
            f"owner = {sql_str(owner)} AND session_id = {sql_str(session)} AND kind = '{TRANSIENT}'")

    def expire(self, now: datetime | None = None, owner: str | None = None) -> ForgetReport:
        """Drop transient memories older than ``transient_ttl_hours`` (sessions nobody ended)."""
        cutoff = utc(now) - timedelta(hours=self.config.transient_ttl_hours)
        where = f"kind = '{TRANSIENT}' AND created_at < {sql_ts(cutoff)}"
        if owner is not None:
            where = f"owner = {sql_str(owner)} AND {where}"
        return self._delete_and_purge(where)

    def _delete_and_purge(self, where: str) -> ForgetReport:
        ids = self._scan(where, ["memory_id"]).column("memory_id").to_pylist()
        if not ids:
            return ForgetReport()
        self.table.delete(where)
        report = self.purge(ids)
        report.deleted, report.memory_ids = len(ids), ids
        return report

    def purge(self, memory_ids: Sequence[str] = ()) -> ForgetReport:
        """Make deletions physical: rewrite every fragment with deleted rows, drop tags whose
        versions hold ``memory_ids``, delete every old version's files (indices are remapped by
        the compaction, so deleted rows leave them too)."""
        self.table.to_lance().optimize.compact_files(materialize_deletions=True,
                                                     materialize_deletions_threshold=0.0)
        self.table.checkout_latest()
        dropped = self._drop_pinning_tags(memory_ids) if memory_ids else []
        stats = self.table.to_lance().cleanup_old_versions(older_than=timedelta(0), delete_unverified=True,
                                                           error_if_tagged_old_versions=False)
        self.table.checkout_latest()
        return ForgetReport(tags_dropped=dropped, bytes_removed=stats.bytes_removed,
                            versions_removed=stats.old_versions)

    def _drop_pinning_tags(self, memory_ids: Sequence[str]) -> list[str]:
        tbl = self.table
        tags = tbl.tags.list()
        if not tags:
            return []
        ids = pa.array(list(memory_ids), pa.string())
        dropped = []
        ds = tbl.to_lance()
        for name, info in tags.items():
            old = ds.checkout_version(info["version"])
            held = old.to_table(columns=["memory_id"]).column("memory_id")
            if pc.any(pc.is_in(held, ids)).as_py():
                tbl.tags.delete(name)
                dropped.append(name)
        return dropped

    # --- upkeep --------------------------------------------------------------------------------

    def has_vector_index(self, version: int | None = None) -> bool:
        version = self.table.version if version is None else version
        if self._indexed is None or self._indexed[0] != version:
            self._indexed = (version, any(i.columns == ["vector"] for i in self.table.list_indices()))
        return self._indexed[1]

    def maintain(self) -> dict[str, Any]:
        """Build the vector and scalar indices once the table is big enough, else fold new rows
        into them and compact small fragments (each recall writes one)."""
        self.flush()
        tbl, c = self.table, self.config
        rows = tbl.count_rows()
        done: dict[str, Any] = {"rows": rows}
        names = {tuple(i.columns) for i in tbl.list_indices()}
        if rows >= c.index_min_rows and ("vector",) not in names:
            tbl.create_index("vector", config=self._vector_index_config(rows))
            done["vector_index"] = c.index_type
        if rows >= c.index_min_rows:  # so recall's whole filter is answered by indices, not a scan
            for col, kind in SCALAR_INDICES.items():
                if (col,) not in names:
                    tbl.create_index(col, config=BTree() if kind == "BTREE" else Bitmap())
                    done[f"{col}_index"] = kind
        if c.hybrid:
            self._ensure_fts()
        if names:
            # Fold the small fragments recalls write (one per access-stat update) into each other,
            # leaving fragments of COMPACT_ROWS+ alone: lancedb's optimize() would rewrite the whole
            # 827k-row fragment (3.4 GB) every time, keeping the old copy until version cleanup.
            tbl.to_lance().optimize.compact_files(target_rows_per_fragment=COMPACT_ROWS)
            tbl.checkout_latest()
            done["optimized"] = True
            done["index_segments_merged"] = index_new_rows(tbl)
        return done

    def _vector_index_config(self, rows: int):
        c = self.config
        parts = c.index_partitions or partitions_for(rows)
        if c.index_type == "IVF_PQ":
            return IvfPq(distance_type="cosine", num_partitions=parts, num_sub_vectors=EMBED_DIM // 16)
        if c.index_type == "IVF_FLAT":
            return IvfFlat(distance_type="cosine", num_partitions=parts)
        return IvfHnswSq(distance_type="cosine", num_partitions=parts, m=c.index_m, ef_construction=c.index_ef_construction)

    def _ensure_fts(self) -> None:
        if not any(i.columns == ["text"] for i in self.table.list_indices()):
            self.table.create_index("text", config=FTS())


# --- helpers ---------------------------------------------------------------------------------


def _check_owner(owner: str) -> None:
    if not owner or not str(owner).strip():
        raise ValueError("an owner id is required")


def _unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, np.float32).reshape(-1)
    if v.shape != (EMBED_DIM,):
        raise ValueError(f"a memory vector has {EMBED_DIM} dimensions, got {v.shape}")
    norm = float(np.linalg.norm(v))
    if not np.isfinite(norm) or norm == 0:
        raise ValueError("a memory vector must be finite and non-zero")
    return v / norm


def _write_access_stats(table, pending: dict[str, tuple[int, datetime]]) -> int:
    """One commit for every pending access: counts added to what the table holds now, last access
    set. Lance's SQL has no ``CASE``, so per-memory values cannot go through ``update``: the rows
    are read whole and upserted, which moves them into one new fragment."""
    ids = ", ".join(sql_str(m) for m in pending)
    rows = table.to_lance().to_table(columns=MEMORIES.columns, filter=f"memory_id IN ({ids})")
    if len(rows) == 0:  # all forgotten meanwhile
        return 0
    got = rows.column("memory_id").to_pylist()
    count = pc.add(rows.column("access_count"), pa.array([pending[m][0] for m in got], pa.int64()))
    last = pa.array([utc(pending[m][1]) for m in got], pa.timestamp("us", tz="UTC"))
    rows = rows.set_column(rows.column_names.index("access_count"), "access_count", count)
    rows = rows.set_column(rows.column_names.index("last_accessed_at"), "last_accessed_at", last)
    table.merge_insert("memory_id").when_matched_update_all().execute(conform(rows, MEMORIES))
    return len(rows)


def _flush_at_exit(table, pending: dict[str, tuple[int, datetime]]) -> None:
    """A store nobody closed: write its pending access stats as it goes (or the interpreter exits)."""
    if pending:
        try:
            _write_access_stats(table, pending)
        except Exception as e:  # the table may be gone (a deleted temp dir): stats are not worth a crash
            log.warning("memory access stats of %d memories not written: %s", len(pending), e)
        pending.clear()


def _open_image(path: str | Path):
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        return im.convert("RGB")


def _rows_table(rows: list[dict[str, Any]]) -> pa.Table:
    cols = {c: [r.get(c) for r in rows] for c in MEMORIES.columns if c != "vector"}
    vecs = np.stack([np.asarray(r["vector"], np.float32) for r in rows]).reshape(-1)
    cols["vector"] = pa.FixedSizeListArray.from_arrays(pa.array(vecs, pa.float32()), EMBED_DIM)
    return conform(pa.table(cols), MEMORIES)


def _public(row: dict[str, Any]) -> dict[str, Any]:
    return {c: row.get(c) for c in PUBLIC_COLUMNS}
