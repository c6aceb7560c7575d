"""Vector indexes on Lance tables, nearest-neighbour search over them, and the dialog context
of what a search found.

Small tables are searched exactly (a flat scan of 100k x 1024 float32 is fast enough and exact);
past ``min_rows`` a table gets an IVF_HNSW_SQ index (cosine: the vectors are L2-normalised),
which kept recall@10 high at VisDial scale where IVF_PQ alone lost accuracy (DESIGN.md has the
figures). Rows added later are folded into the index by ``optimize``;
the index is rebuilt only when most of the table is outside it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import lancedb
import numpy as np
import pyarrow as pa
from lancedb.index import BTree, IvfHnswSq

from storage.lance import open_table, sql_in, table_lock

# index_stats would otherwise warn on every call that it returns the centroids too; we never read them
os.environ.setdefault("LANCE_INCLUDE_VECTOR_CENTROIDS", "false")

INDEX_TYPE = "IVF_HNSW_SQ"
METRIC = "cosine"


@dataclass(frozen=True)
class IndexState:
    table: str
    rows: int
    action: str  # "none" (too small), "created", "updated", "current"
    index_type: str | None = None


def vector_index(tbl: lancedb.table.Table, column: str = "vector"):
    """The table's index on ``column``, or None."""
    for idx in tbl.list_indices():
        if column in idx.columns:
            return idx
    return None


def ensure_vector_index(db: lancedb.DBConnection, name: str, *, min_rows: int = 100_000,
                        column: str = "vector", accelerator: str | None = None) -> IndexState:
    """Create the vector index once the table is large enough; keep it covering new rows.
    ``accelerator`` (a torch device such as ``"cuda"``) trains a new index's partitions there."""
    tbl = open_table(db, name)
    rows = tbl.count_rows()
    idx = vector_index(tbl, column)
    if idx is None:
        if rows < min_rows:
            return IndexState(name, rows, "none")
        _create(tbl, column, rows, accelerator)
        return IndexState(name, rows, "created", INDEX_TYPE)
    stats = tbl.index_stats(idx.name)
    if stats is None or stats.num_unindexed_rows == 0:
        return IndexState(name, rows, "current", str(idx.index_type))
    if stats.num_unindexed_rows > stats.num_indexed_rows:  # partitions trained on too little: retrain
        _create(tbl, column, rows, accelerator)
        return IndexState(name, rows, "created", INDEX_TYPE)
    index_new_rows(tbl, column)
    return IndexState(name, rows, "updated", str(idx.index_type))


# The keys other tables join on: turns -> images/dialogs by image_id, turns -> text_embeddings by
# text_hash, dialogs -> text_embeddings by caption_hash. Below ``SCALAR_MIN_ROWS`` a scan costs a few
# milliseconds anyway and each build is one more commit per ingest; past it, lookups by key are
# several times faster with the index (README, "Querying the tables").
JOIN_KEYS: dict[str, tuple[str, ...]] = {"turns": ("image_id", "text_hash"), "dialogs": ("caption_hash",)}
SCALAR_MIN_ROWS = 100_000


def ensure_scalar_indexes(db: lancedb.DBConnection, name: str, columns: tuple[str, ...] | None = None, *,
                          min_rows: int = SCALAR_MIN_ROWS) -> dict[str, str]:
    """A BTREE index on each join key of ``name`` once the table has ``min_rows``, with the rows
    written since folded in; per column: "none" (too small), "created", "updated" or "current"."""
    columns = JOIN_KEYS.get(name, ()) if columns is None else columns
    tbl = open_table(db, name)
    rows = tbl.count_rows()
    have = {i.columns[0]: i for i in tbl.list_indices() if len(i.columns) == 1}
    out, stale = {}, []
    if rows < min_rows and not any(c in have for c in columns):
        return dict.fromkeys(columns, "none")
    with table_lock(db, name):  # one writer per table: an index build is a commit too
        for col in columns:
            idx = have.get(col)
            if idx is None:
                tbl.create_index(col, config=BTree(), replace=True)
                out[col] = "created"
                continue
            stats = tbl.index_stats(idx.name)
            out[col] = "updated" if stats is not None and stats.num_unindexed_rows else "current"
            if out[col] == "updated":
                stale.append(idx.name)
        if stale:
            tbl.to_lance().optimize.optimize_indices(index_names=stale)
            tbl.checkout_latest()
    return out


def index_new_rows(tbl: lancedb.table.Table, column: str = "vector") -> int:
    """Add the rows written since the indices were built to them, keeping the vector index's
    trained partitions; returns how many vector index segments were merged into one.

    lance's default ``optimize_indices()`` (which lancedb's ``Table.optimize()`` runs) re-partitions
    an IVF index by its own target partition size when it folds new rows in: a large index falls to
    a few dozen partitions, and a search with a few probes then scans a large share of the table.
    New rows are indexed as a delta segment instead, and segments are merged, which keeps the
    partitions (tests/test_memory_upkeep.py)."""
    ds = tbl.to_lance()
    idx = vector_index(tbl, column)
    others = [i.name for i in tbl.list_indices() if idx is None or i.name != idx.name]
    if others:  # scalar indices have no partitions to lose
        ds.optimize.optimize_indices(index_names=others)
    if idx is not None:
        ds.optimize.optimize_indices(num_indices_to_merge=0, index_names=[idx.name])
    tbl.checkout_latest()
    return merge_index_deltas(tbl, column)


def merge_index_deltas(tbl: lancedb.table.Table, column: str = "vector") -> int:
    """Fold the vector index's delta segments into one; returns how many there were.

    ``optimize()`` indexes new rows as a separate delta segment each time, and a query probes
    ``nprobes`` partitions of every segment, so every extra segment makes each search dearer.
    Merging keeps the trained partitions (no retraining)."""
    idx = vector_index(tbl, column)
    stats = tbl.index_stats(idx.name) if idx is not None else None
    segments = getattr(stats, "num_indices", None) or 1
    if segments > 1:
        tbl.to_lance().optimize.optimize_indices(num_indices_to_merge=segments, index_names=[idx.name])
        tbl.checkout_latest()
    return segments


def _create(tbl: lancedb.table.Table, column: str, rows: int, accelerator: str | None = None) -> None:
    partitions = partitions_for(rows)
    if accelerator is None:
        tbl.create_index(column, config=IvfHnswSq(distance_type=METRIC, num_partitions=partitions),
                         replace=True)
        return
    # Lance trains IVF_HNSW_SQ's partitions on the CPU only (its accelerator covers IVF_PQ): the
    # k-means, most of the build (benchmarks/index_bench.py), runs on the device and the build takes
    # its centroids
    centroids = train_centroids(tbl.to_lance(), column, partitions, accelerator)
    tbl.to_lance().create_index(column, index_type=INDEX_TYPE, metric=METRIC, num_partitions=partitions,
                                ivf_centroids=centroids, name=f"{column}_idx", replace=True)
    tbl.checkout_latest()


def train_centroids(ds, column: str, partitions: int, device: str, *, sample_rate: int = 256,
                    max_iters: int = 50, seed: int = 0) -> np.ndarray:
    """IVF centroids, (partitions, dim) float32, from k-means on ``device`` (lance's torch k-means)
    over a random sample of ``sample_rate`` rows per partition, as Lance's own training samples."""
    import torch
    from lance.torch.kmeans import KMeans

    sample = ds.sample(min(ds.count_rows(), partitions * sample_rate), columns=[column]).column(column)
    flat = sample.combine_chunks()
    data = np.array(flat.values, dtype=np.float32).reshape(len(flat), -1)  # a writable copy for torch
    start = data[np.random.default_rng(seed).choice(len(data), partitions, replace=False)]
    km = KMeans(partitions, metric=METRIC, max_iters=max_iters, centroids=torch.from_numpy(start.copy()),
                device=device)
    with torch.compiler.set_stance("force_eager"):  # its distances are torch.compile'd: ~20 s to compile
        km.fit(data)
    return km.centroids.float().cpu().numpy()


def partitions_for(rows: int) -> int:
    """About sqrt(n) partitions (a few thousand rows each), the usual IVF rule of thumb."""
    return max(1, min(4096, int(np.sqrt(rows))))


def search(
    db: lancedb.DBConnection, name: str, vector: np.ndarray, k: int = 10, *, where: str | None = None,
    columns: list[str] | None = None, exact: bool = False, nprobes: int = 20, refine_factor: int | None = 5,
) -> pa.Table:
    """The ``k`` rows nearest to ``vector`` by cosine distance (``_distance``), nearest first.

    Uses the index if there is one (``exact=True`` bypasses it, e.g. to measure its recall);
    ``refine_factor`` re-ranks the index's candidates by exact distance.
    """
    tbl = open_table(db, name)
    q = (
        tbl.search(np.asarray(vector, dtype=np.float32), vector_column_name="vector")
        .distance_type(METRIC)
        .limit(k)
    )
    if where:
        q = q.where(where, prefilter=True)
    if columns:  # asked for by name: Lance warns that it will stop adding the distance by itself
        q = q.select([*columns, "_distance"] if "_distance" not in columns else columns)
    if exact:
        q = q.bypass_vector_index()
    elif vector_index(tbl) is not None:
        q = q.nprobes(nprobes)
        if refine_factor:
            q = q.refine_factor(refine_factor)
    return q.to_arrow()


# --- what a hit means: its dialog context ----------------------------------------------------


def _rows(db: lancedb.DBConnection, name: str, columns: list[str], column: str, values: list) -> pa.Table:
    if not values:
        return pa.table({c: [] for c in columns})
    return open_table(db, name).to_lance().to_table(columns=columns, filter=sql_in(column, values))


def _captions(db: lancedb.DBConnection, image_ids: list[int]) -> dict[int, str]:
    t = _rows(db, "dialogs", ["image_id", "caption"], "image_id", image_ids)
    return dict(zip(t.column("image_id").to_pylist(), t.column("caption").to_pylist(), strict=True))


def image_context(db: lancedb.DBConnection, hits: pa.Table) -> list[dict]:
    """Per image hit (``image_id``, ``_distance``): where the image is, its caption, its ten turns."""
    ids = hits.column("image_id").to_pylist()
    info = {
        r["image_id"]: r
        for r in _rows(db, "images", ["image_id", "split", "path"], "image_id", ids).to_pylist()
    }
    caps = _captions(db, ids)
    turns: dict[int, list[dict]] = {}
    rows = _rows(db, "turns", ["image_id", "turn", "question", "answer"], "image_id", ids)
    for r in rows.sort_by([("image_id", "ascending"), ("turn", "ascending")]).to_pylist():
        turns.setdefault(r.pop("image_id"), []).append(r)
    return [
        {"image_id": i, "distance": round(float(d), 6), "split": info.get(i, {}).get("split"),
         "path": info.get(i, {}).get("path"), "caption": caps.get(i), "turns": turns.get(i, [])}
        for i, d in zip(ids, hits.column("_distance").to_pylist(), strict=True)
    ]


def text_context(db: lancedb.DBConnection, hits: pa.Table, examples: int = 3) -> list[dict]:
    """Per text hit (``text_hash``, ``text``, ``_distance``): how many turns and captions say it,
    and the first ``examples`` of each with their dialog's caption. A short answer may be shared
    by thousands of turns, so only keys are read for all of them."""
    hashes = hits.column("text_hash").to_pylist()
    keys = _rows(db, "turns", ["text_hash", "image_id", "turn"], "text_hash", hashes)
    capt = _rows(db, "dialogs", ["caption_hash", "image_id"], "caption_hash", hashes)
    by_hash: dict[str, list[tuple[int, int]]] = {}
    for h, i, t in zip(*(keys.column(c).to_pylist() for c in ("text_hash", "image_id", "turn")), strict=True):
        by_hash.setdefault(h, []).append((i, t))
    cap_of: dict[str, list[int]] = {}
    for h, i in zip(
        capt.column("caption_hash").to_pylist(), capt.column("image_id").to_pylist(), strict=True
    ):
        cap_of.setdefault(h, []).append(i)
    shown = {h: sorted(v)[:examples] for h, v in by_hash.items()}
    ids = sorted({i for v in shown.values() for i, _ in v})
    qa = {(r["image_id"], r["turn"]): r for r in _rows(
        db, "turns", ["image_id", "turn", "question", "answer"], "image_id", ids).to_pylist()}
    captions = _captions(db, ids)
    out = []
    for h, text, d in zip(
        hashes, hits.column("text").to_pylist(), hits.column("_distance").to_pylist(), strict=True
    ):
        out.append(
            {
                "text_hash": h,
                "text": text,
                "distance": round(float(d), 6),
                "turn_count": len(by_hash.get(h, [])),
                "caption_count": len(cap_of.get(h, [])),
                "caption_of": sorted(cap_of.get(h, []))[:examples],
                "turns": [
                    {**qa[(i, t)], "caption": captions.get(i)} for i, t in shown.get(h, []) if (i, t) in qa
                ],
            }
        )
    return out
