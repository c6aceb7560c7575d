"""The memory store on a real Lance table with the tiny random-weight ImageBind.

Random weights make similarity meaningless between different texts, but identical inputs embed
identically, and vectors can be given directly: the tests use those two facts to know the
right answer.
"""

from __future__ import annotations

import itertools
from datetime import timedelta

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from memory_support import T0, files_containing, stored_vector, unit

from memory import scoring
from memory.store import MemoryStore
from schemas.embed import EMBED_DIM
from schemas.memory import MemoryConfig

# --- scoring -----------------------------------------------------------------------------------


def test_recency_decays_by_time_newest_first():
    last = np.array(["2026-03-01T12:00", "2026-03-01T00:00", "2026-02-01T12:00"], dtype="datetime64[us]")
    r = scoring.recency(last, T0, half_life_hours=12)
    assert r[0] == pytest.approx(1.0) and r[1] == pytest.approx(0.5)
    assert r[0] > r[1] > r[2] > 0  # the newest memory scores highest (not Generative Agents' oldest-first)
    assert scoring.recency(np.array(["2026-03-02T00:00"], "datetime64[us]"), T0, 12)[0] == 1.0  # future = now


def test_frequency_is_log_scaled_and_capped():
    f = scoring.frequency(np.array([0, 1, 2, 31, 500]), saturation=31)
    assert f[0] == 0 and f[3] == pytest.approx(1.0) and f[4] == 1.0
    assert f[1] - f[0] > f[2] - f[1] > 0  # the first recall counts most


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=4, max_size=4), st.lists(st.floats(0, 5), min_size=4, max_size=4))
def test_score_is_a_weighted_mean_in_unit_interval(terms, w):
    if sum(w) == 0:
        with pytest.raises(ValueError):
            scoring.Weights(*w)
        return
    weights = scoring.Weights(*w)
    t = {name: np.array([v]) for name, v in zip(scoring.TERMS, terms, strict=True)}
    s = scoring.combine(t, weights)[0]
    assert -1e-12 <= s <= 1 + 1e-12
    assert s == pytest.approx(sum(a * b for a, b in zip(terms, w, strict=True)) / sum(w))


# --- remember / recall -------------------------------------------------------------------------


def test_recall_ranks_explains_and_updates_access_stats(store):
    a = store.remember("ann", "my sister lives in Lisbon", now=T0)
    store.remember("ann", "the dentist appointment is on friday", now=T0)
    store.remember("bob", "my sister lives in Lisbon", now=T0)  # another owner's identical fact
    later = T0 + timedelta(hours=30)
    hits = store.recall("ann", "my sister lives in Lisbon", k=5, now=later)
    assert [h.memory["owner"] for h in hits] == ["ann", "ann"]
    top = hits[0]
    assert top.memory["memory_id"] == a["memory_id"] and "vector" not in top.memory
    b = top.breakdown
    assert b["similarity"] == pytest.approx(1.0, abs=1e-4)
    assert b["recency"] == pytest.approx(0.5 ** (30 / store.config.half_life_hours), rel=1e-4)
    assert b["frequency"] == 0.0 and b["saliency"] == pytest.approx(0.5)
    w = store.weights
    expected = (w.similarity * b["similarity"] + w.recency * b["recency"] + w.frequency * b["frequency"]
                + w.saliency * b["saliency"]) / (w.similarity + w.recency + w.frequency + w.saliency)
    assert top.score == pytest.approx(expected, abs=1e-5) and b["score"] == pytest.approx(top.score, abs=1e-5)

    got = store.get("ann", a["memory_id"])
    assert got["access_count"] == 1 and got["last_accessed_at"] == later
    again = store.recall("ann", "my sister lives in Lisbon", k=1, now=later)[0]
    assert again.breakdown["frequency"] > 0 and again.breakdown["recency"] == pytest.approx(1.0)
    assert store.get("bob", a["memory_id"]) is None  # owners are isolated


def test_access_stats_are_pending_until_flushed_and_never_lost(tmp_path, embedder):
    """A recall counts its accesses at once for this store, and writes them in one commit later
    (a flush: threshold, close, any other read or write, or the store going away unclosed)."""
    store = MemoryStore(MemoryConfig(data_root=tmp_path, touch_flush_memories=3), embedder)
    facts = [store.remember("ann", f"fact {i}", vector=unit(40 + i), now=T0) for i in range(4)]
    version = store.table.version
    first = store.recall("ann", vector=unit(40), k=1, now=T0 + timedelta(hours=1))[0]
    assert first.memory["access_count"] == 1  # what the caller sees counts this recall
    assert store.table.version == version  # nothing written yet
    again = store.recall("ann", vector=unit(40), k=1, now=T0 + timedelta(hours=2), touch=False)[0]
    hours = 1 / store.config.half_life_hours  # since the pending access, not since remember
    assert again.breakdown["frequency"] > 0 and again.breakdown["recency"] == pytest.approx(
        0.5**hours, rel=1e-4
    )
    store.recall("ann", vector=unit(41), k=1, now=T0 + timedelta(hours=3))
    assert store.table.version == version
    store.recall("ann", vector=unit(42), k=1, now=T0 + timedelta(hours=4))  # the third memory: written,
    store.background.join()  # by the store's background thread, off the caller's path
    assert store.table.version == version + 1 and not store.stats.pending
    stats = {m["memory_id"]: (m["access_count"], m["last_accessed_at"]) for m in store.list("ann")}
    assert stats[facts[0]["memory_id"]] == (1, T0 + timedelta(hours=1))
    assert stats[facts[2]["memory_id"]] == (1, T0 + timedelta(hours=4))
    assert stats[facts[3]["memory_id"]] == (0, T0)

    store.recall("ann", vector=unit(43), k=1, now=T0 + timedelta(hours=5))
    del store, first, again
    import gc

    gc.collect()  # an unclosed store writes what it holds as it goes
    fresh = MemoryStore(MemoryConfig(data_root=tmp_path), embedder)
    assert fresh.get("ann", facts[3]["memory_id"])["access_count"] == 1
    with fresh:
        fresh.recall("ann", vector=unit(43), k=1, now=T0 + timedelta(hours=6))
    assert (
        MemoryStore(MemoryConfig(data_root=tmp_path), embedder).get("ann", facts[3]["memory_id"])[
            "access_count"
        ]
        == 2
    )


def test_recall_reads_each_fragment_once_and_folds_small_ones(tmp_path, embedder):
    """Recall's filter and score columns are read into memory once per fragment; writes add small
    fragments, which the store's background upkeep folds once ``upkeep_small_fragments`` pile up."""
    fold_at = 8
    store = MemoryStore(
        MemoryConfig(
            data_root=tmp_path, touch_flush_memories=1, upkeep_small_fragments=fold_at, refresh_seconds=0
        ),
        embedder,
    )
    for i in range(5):
        store.remember("ann", f"fact {i}", vector=unit(60 + i), now=T0)
    store.recall("ann", vector=unit(60), k=2, now=T0, touch=False)
    assert store.columns.rows_read == 5
    store.recall("ann", vector=unit(61), k=2, now=T0, touch=False)
    assert store.columns.rows_read == 5  # same version: nothing read
    store.remember("ann", "fact 5", vector=unit(65), now=T0)
    hits = store.recall("ann", vector=unit(65), k=1, now=T0)  # touch_flush_memories=1: written at once
    store.background.join()
    assert hits[0].memory["text"] == "fact 5" and store.columns.rows_read == 6
    store.recall("ann", vector=unit(65), k=1, now=T0, touch=False)
    assert store.columns.rows_read == 7  # the touched row, in its new fragment
    for i in range(fold_at):
        store.remember("ann", f"more {i}", vector=unit(70 + i), now=T0)
    store.background.join()
    assert store.background.runs >= 1 and store.background.errors == 0
    frags = store.table.to_lance().get_fragments()
    assert len(frags) < fold_at and sum(f.count_rows() for f in frags) == 6 + fold_at
    top = store.recall("ann", vector=unit(70 + fold_at - 1), k=1, now=T0, touch=False)[0]
    assert top.memory["text"] == f"more {fold_at - 1}"


def test_in_memory_visibility_matches_the_sql_filter(store):
    """Recall filters its candidates in memory (the rule evaluated on the view's numpy columns) and,
    for sparse owners, has Lance filter first: the one visibility rule must pick the same rows every
    way (SQL, Arrow expression, numpy), for every mix of columns."""
    from memory.columns import COLUMNS

    now = T0 + timedelta(days=2)
    cutoff = now - timedelta(hours=store.config.transient_ttl_hours)
    combos = list(itertools.product(["ann", "bob"], [None, "mX"], [store.fingerprint, "other-model"],
                                    ["durable", "transient"], [None, "s1", "s2"],
                                    [cutoff - timedelta(seconds=1), cutoff, now]))
    n = len(combos)
    vecs = np.stack([unit(900 + i) for i in range(n)])
    table = pa.table(
        {
            "memory_id": [f"m{i}" for i in range(n)],
            "owner": [c[0] for c in combos],
            "modality": ["text"] * n,
            "text": [f"fact {i}" for i in range(n)],
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(vecs.reshape(-1)), EMBED_DIM),
            "superseded_by": [c[1] for c in combos],
            "model": [c[2] for c in combos],
            "kind": [c[3] for c in combos],
            "session_id": [c[4] for c in combos],
            "created_at": [c[5] for c in combos],
            "last_accessed_at": [c[5] for c in combos],
            "access_count": [0] * n,
            "saliency": [0.5] * n,
        }
    )
    for start in range(0, n, 50):  # a few fragments
        store.add_rows(table.slice(start, 50))
    snap = store.mt.synced()
    direct = snap.ds.to_table(columns=COLUMNS, with_row_address=True)
    addrs = direct.column("_rowaddr").to_numpy()[::-1]
    rows = snap.view.take(addrs)  # any order, any fragment
    assert rows.to_pylist() == direct.select(COLUMNS).to_pylist()[::-1]  # the cache holds what Lance does
    for owner, session in itertools.product(["ann", "bob", "carl"], [None, "s1", "s2"]):
        rule = store.visible(owner, session, now)
        by_sql = set(store._scan(rule, ["memory_id"]).column("memory_id").to_pylist())
        in_memory = set(rows.filter(rule).column("memory_id").to_pylist())
        kept = snap.view.select(addrs, store.rule(owner, session, now))
        in_numpy = set(rows.column("memory_id").filter(pa.array(kept)).to_pylist())
        assert by_sql == in_memory == in_numpy
        assert (len(by_sql) > 0) == (owner != "carl")


def test_recency_and_saliency_break_similarity_ties(store):
    v = unit(1)
    old = store.remember("ann", "parked on level 2", vector=v, now=T0)
    new = store.remember("ann", "parked on level 5", vector=v, now=T0 + timedelta(days=3))
    hits = store.recall("ann", vector=v, k=2, now=T0 + timedelta(days=3), touch=False)
    assert [h.memory["memory_id"] for h in hits] == [new["memory_id"], old["memory_id"]]
    store.update("ann", old["memory_id"], saliency=1.0)
    no_recency = scoring.Weights(3, 0, 0, 1)
    hits = store.recall("ann", vector=v, k=2, now=T0 + timedelta(days=3), weights=no_recency, touch=False)
    assert hits[0].memory["memory_id"] == old["memory_id"]


def test_recall_returns_full_rows_even_when_row_ids_moved(store):
    """Recall reads only the scoring columns of its candidates and fetches the public columns of
    the k it returns by row id; rows written since (row ids reused by a compaction) are caught."""
    facts = [store.remember("ann", f"fact {i}", vector=unit(i), now=T0, saliency=i / 10) for i in range(6)]
    hits = store.recall("ann", vector=unit(3), k=3, now=T0, touch=False)
    assert hits[0].memory == store.get("ann", facts[3]["memory_id"])  # every public column, exact
    every = store.candidates(unit(3), "ann", None, T0, 6)
    cands = every.slice(0, 4)
    want = [store.get("ann", m) for m in cands.column("memory_id").to_pylist()]
    for order in ([0, 1, 2, 3], [3, 1, 0, 2]):  # the fast path keeps the candidates' order, whatever it is
        picked = cands.take(order)
        assert store.search._take(picked).to_pylist() == [want[i] for i in order]
    rowid = cands.column_names.index("_rowid")
    moved = pa.array(
        [every.column("_rowid")[5].as_py()] + cands.column("_rowid").to_pylist()[1:], pa.uint64()
    )
    stale = cands.set_column(rowid, "_rowid", moved)
    assert store.search._take(stale) is None  # a row id now holds another memory
    assert store.search.public_rows(stale) == want  # found by memory_id instead


def test_a_new_fact_on_a_key_supersedes_the_old_one(store):
    berlin = store.remember("ann", "I live in Berlin", key="home", now=T0)
    paris = store.remember("ann", "I live in Paris", key="home", now=T0 + timedelta(days=1))
    store.remember("ann", "maybe I live in Rome this week", key="home", kind="transient", session="s1",
                   now=T0 + timedelta(days=2))  # transient: does not replace the durable fact
    hits = store.recall("ann", "I live in Berlin", k=10, now=T0 + timedelta(days=2))
    ids = [h.memory["memory_id"] for h in hits]
    assert berlin["memory_id"] not in ids and paris["memory_id"] in ids
    history = store.history("ann", "home", now=T0 + timedelta(days=2))
    assert [m["text"] for m in history] == [
        "I live in Berlin",
        "I live in Paris",
        "maybe I live in Rome this week",
    ]
    assert history[0]["superseded_by"] == paris["memory_id"] and history[1]["superseded_by"] is None
    assert [m["text"] for m in store.list("ann", now=T0 + timedelta(days=2))] == [
        "I live in Paris", "maybe I live in Rome this week"]
    # the next durable fact flags only the current durable one: not the superseded, not the transient
    oslo = store.remember("ann", "I live in Oslo", key="home", now=T0 + timedelta(days=2, hours=1))
    flags = {m["text"]: m["superseded_by"] for m in store.history("ann", "home", now=T0 + timedelta(days=2))}
    assert flags == {"I live in Berlin": paris["memory_id"], "I live in Paris": oslo["memory_id"],
                     "maybe I live in Rome this week": None, "I live in Oslo": None}


def test_transient_memories_are_not_kept_past_their_session(store):
    v = unit(7)
    milk = store.remember("ann", "remind me to buy milk", kind="transient", session="s1", vector=v, now=T0)
    keep = store.remember("ann", "I am allergic to peanuts", vector=unit(8), now=T0)
    milk_bytes = stored_vector(store, milk["memory_id"])
    assert files_containing(store.config.lance_uri, {"milk": milk_bytes})["milk"]
    assert [h.memory["memory_id"] for h in store.recall("ann", vector=v, k=1, session="s1", now=T0)] == [
        milk["memory_id"]
    ]
    assert milk["memory_id"] not in [
        h.memory["memory_id"] for h in store.recall("ann", vector=v, k=5, now=T0)
    ]
    assert milk["memory_id"] not in [
        h.memory["memory_id"] for h in store.recall("ann", vector=v, k=5, session="s2", now=T0)
    ]
    report = store.end_session("ann", "s1")
    assert report.memory_ids == [milk["memory_id"]]
    assert [m["memory_id"] for m in store.list("ann", now=T0)] == [keep["memory_id"]]
    assert files_containing(store.config.lance_uri, {"milk": milk_bytes})["milk"] == []
    with pytest.raises(ValueError, match="session"):
        store.remember("ann", "no session", kind="transient")

    # a session nobody ended: never returned once older than the TTL; upkeep removes its bytes
    call = store.remember(
        "ann", "call back in an hour", kind="transient", session="s3", vector=unit(9), now=T0
    )
    call_bytes = stored_vector(store, call["memory_id"])
    assert "call back in an hour" in [m["text"] for m in store.list("ann", now=T0)]
    late = T0 + timedelta(hours=store.config.transient_ttl_hours + 1)
    assert "call back in an hour" not in [m["text"] for m in store.list("ann", now=late)]
    assert store.get("ann", call["memory_id"], now=late) is None
    assert store.recall("ann", vector=unit(9), k=5, session="s3", now=late, touch=False)[0].memory[
        "text"
    ] != ("call back in an hour")
    assert files_containing(store.config.lance_uri, {"call": call_bytes})["call"]  # not purged yet
    assert store.expire(late).memory_ids == [call["memory_id"]]
    assert files_containing(store.config.lance_uri, {"call": call_bytes})["call"] == []
