"""What recall reads: a snapshot kept fresh off the caller's path, the rows outside the vector index
searched exactly in memory, and access stats counted until the snapshot holds them.

Real Lance tables on disk; a second store on the same table stands for another process (each store
holds its own dataset and snapshot)."""

from __future__ import annotations

import time
from datetime import timedelta

import numpy as np
import pyarrow as pa
import pytest
from memory_support import T0, unit

from memory.store import MemoryStore
from schemas.embed import EMBED_DIM
from schemas.memory import MemoryConfig


def facts(store, ids: list[int], owner_of, seed: int, **extra) -> np.ndarray:
    """Memories ``m<i>`` (vector ``unit(seed + i)``) in one bulk insert: one fragment."""
    n = len(ids)
    vecs = np.stack([unit(seed + i) for i in ids])
    store.add_rows(pa.table({
        "memory_id": [f"m{i}" for i in ids], "owner": [owner_of(i) for i in ids], "modality": ["text"] * n,
        "text": [f"fact {i}" for i in ids],
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(vecs.reshape(-1)), EMBED_DIM),
        "model": [store.fingerprint] * n, "created_at": [T0] * n, "last_accessed_at": [T0] * n,
        "access_count": [0] * n, "saliency": [0.5] * n, "kind": ["durable"] * n, **extra,
    }))
    return vecs


def test_rows_outside_the_index_are_searched_exactly_and_deleted_ones_never_come_back(tmp_path, embedder):
    """After the index is built, new rows (two bulk fragments, one remembered row) are held in
    memory and searched exactly beside the index; a row an update deleted from a held fragment is
    not returned (its new copy is), a superseded one neither, for a dense owner (filter after the
    search) and a sparse one (filter first)."""
    config = MemoryConfig(data_root=tmp_path, index_min_rows=256, index_partitions=2, nprobes=2,
                          candidates=8, refine_factor=100, refresh_seconds=0)
    store = MemoryStore(config, embedder)

    def owner_of(i: int) -> str:
        return "bob" if i % 40 == 0 else "ann"

    old = facts(store, list(range(300)), owner_of, seed=3000)
    store.maintain()
    new_ids = list(range(300, 340))
    new = np.concatenate([
        facts(store, new_ids[:20], owner_of, seed=3000),
        facts(store, new_ids[20:], owner_of, seed=3000,
              superseded_by=["m0" if i == 321 else None for i in new_ids[20:]]),
    ])
    store.remember("ann", "fact 340", vector=unit(3340), now=T0, memory_id="m340")
    assert store.mt.synced().view.delta  # held from here on
    store.update("ann", "m305", saliency=0.9)  # a deletion file on a held fragment, the row written anew
    vecs = {i: v for i, v in zip(range(341), [*old, *new, unit(3340)], strict=True)}
    snap = store.mt.synced()
    assert snap.view.indexed and len(snap.view.delta) >= 3  # the two bulk fragments and the new rows' ones
    for owner, probe in (("ann", 305), ("ann", 321), ("ann", 340), ("ann", 7), ("bob", 320), ("bob", 40)):
        visible = [i for i in vecs if owner_of(i) == owner and i != 321]
        exact = sorted(visible, key=lambda i: -float(vecs[i] @ vecs[probe]))[:8]
        got = store.candidates(vecs[probe], owner, None, T0, 8)
        assert [int(m[1:]) for m in got.column("memory_id").to_pylist()] == exact, (owner, probe)
        cos = 1 - got.column("_distance").to_numpy()
        assert np.allclose(cos, [vecs[i] @ vecs[probe] for i in exact], atol=1e-5)
    top = store.recall("ann", vector=vecs[305], k=1, now=T0, touch=False)[0].memory
    assert top["memory_id"] == "m305" and top["saliency"] == pytest.approx(0.9)
    assert store.search.prefilter_owners == {"bob"}


def test_a_store_that_recalls_follows_other_writers_in_the_background(tmp_path, embedder):
    """Recalls start a background refresh: another process's memory is in the snapshot before the
    next recall asks, so that recall reads it without refreshing; the refresh stops when unused."""
    reader = MemoryStore(MemoryConfig(data_root=tmp_path, refresh_seconds=0.2), embedder)
    writer = MemoryStore(MemoryConfig(data_root=tmp_path), embedder)
    writer.remember("ann", "first", vector=unit(1), now=T0)
    assert reader.recall("ann", vector=unit(1), k=1, now=T0, touch=False)[0].memory["text"] == "first"
    writer.remember("ann", "second", vector=unit(2), now=T0)
    latest = writer.table.version
    deadline = time.monotonic() + 30
    while reader.mt._snapshot.ds.version < latest:  # moved by the reader's background thread alone
        assert time.monotonic() < deadline
        time.sleep(0.05)
    snap = reader.mt._snapshot
    assert reader.recall("ann", vector=unit(2), k=1, now=T0, touch=False)[0].memory["text"] == "second"
    assert reader.search.seen_version == snap.ds.version  # read from that snapshot
    reader.mt._recalled = time.monotonic() - 3600  # nobody recalls any more
    reader.mt._follower.join(timeout=30)
    assert not reader.mt._follower.is_alive()


def test_a_flush_of_access_stats_does_not_make_recall_refresh(tmp_path, embedder):
    """Access stats written in the background are counted by this store's recalls until its
    snapshot holds them (the snapshot is not refreshed for them); other reads see them at once."""
    config = MemoryConfig(data_root=tmp_path, touch_flush_memories=1, refresh_seconds=3600)
    store = MemoryStore(config, embedder)
    fact = store.remember("ann", "fact", vector=unit(5), now=T0)
    store.remember("ann", "other", vector=unit(6), now=T0)
    first = store.recall("ann", vector=unit(5), k=1, now=T0 + timedelta(hours=1))[0]
    store.background.join()  # written (touch_flush_memories=1)
    assert first.memory["access_count"] == 1 and not store.stats.pending
    seen = store.search.seen_version
    again = store.recall("ann", vector=unit(5), k=1, now=T0 + timedelta(hours=2))[0]
    assert store.search.seen_version == seen < store.table.version  # the snapshot before the flush
    assert again.memory["access_count"] == 2  # the written access counted from memory, and this one
    hours = 1 / store.config.half_life_hours  # since the written access, not since remember
    assert again.breakdown["recency"] == pytest.approx(0.5**hours, rel=1e-4)
    store.background.join()
    assert store.get("ann", fact["memory_id"])["access_count"] == 2  # a read of the latest version


def test_held_rows_are_appended_to_and_earlier_views_keep_theirs(tmp_path, embedder):
    """Each sync that only adds fragments appends their rows to the held block; a deletion in a held
    fragment starts a new block. Every view, kept after later syncs, still holds exactly the rows
    outside the index of its own version (addresses, vectors, filter columns)."""
    config = MemoryConfig(data_root=tmp_path, index_min_rows=256, index_partitions=2, refresh_seconds=0)
    store = MemoryStore(config, embedder)
    facts(store, list(range(300)), lambda i: "ann", seed=5000)
    store.maintain()
    views = []
    for i in range(300, 306):
        facts(store, [i], lambda i: "bob" if i % 2 else "ann", seed=5000)
        views.append(store.mt.synced().view)
        if i == 303:
            store.update("ann", "m302", saliency=0.9)  # a deletion file on a held fragment
            views.append(store.mt.synced().view)
    blocks = [v.stacked.block for v in views]
    for view in views:
        ds = store.mt.dataset().checkout_version(view.version)
        held = ds.scanner(columns=["vector", "owner", "saliency"], with_row_address=True,
                          fragments=[f for f in ds.get_fragments() if f.fragment_id in view.delta]).to_table()
        s = view.stacked
        at = {int(a): r for r, a in enumerate(s.addr)}
        assert sorted(at) == sorted(held.column("_rowaddr").to_pylist())
        rows = np.array([at[int(a)] for a in held.column("_rowaddr").to_pylist()])
        want = np.stack(held.column("vector").to_numpy(zero_copy_only=False))
        assert np.array_equal(s.vectors[rows], want)
        assert np.allclose(s.inv_norm[rows], 1 / np.linalg.norm(want, axis=1), rtol=1e-5)
        assert list(view.words[s.rows.gather("owner")[rows]]) == held.column("owner").to_pylist()
        assert np.allclose(s.rows.gather("saliency")[rows], held.column("saliency").to_numpy())
    assert blocks[1] is blocks[0] and blocks[-1] is blocks[-2] and blocks[-1] is not blocks[0]
