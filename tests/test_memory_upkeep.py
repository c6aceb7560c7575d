"""The memory store's upkeep, forget, indexes, seeding and command line, on a real Lance table with
the tiny random-weight ImageBind.

Random weights make similarity meaningless between different texts, but identical inputs embed
identically, and vectors can be given directly: the tests use those two facts to know the
right answer.
"""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

import numpy as np
import pyarrow as pa
import pytest
from memory_support import T0, add_facts, files_containing, stored_vector, unit

from memory.store import MemoryStore
from schemas.embed import EMBED_DIM
from schemas.memory import MemoryConfig


def test_forget_removes_text_and_vector_from_every_file(store):
    secret_v, control_v = unit(11), unit(12)
    secret_text, control_text = "zq-secret-8d1f my bank pin is 4711", "zq-control-51c2 I like tea"
    tbl = store.table
    control = store.remember("ann", control_text, vector=control_v, now=T0)
    tbl.tags.create("before-secret", tbl.version)
    secret = store.remember("ann", secret_text, vector=secret_v, now=T0)
    store.recall("ann", vector=secret_v, k=2, now=T0 + timedelta(hours=1))  # access update: more copies
    store.update("ann", secret["memory_id"], saliency=0.9)
    tbl.tags.create("after-secret", tbl.version)  # a tag pins a version that holds the secret
    store.recall("ann", "zq-secret-8d1f bank pin", k=2, hybrid=True, now=T0)  # builds the full-text index
    needles = {
        "secret_text": secret_text.encode(),
        "secret_vector": stored_vector(store, secret["memory_id"]),
        "control_text": control_text.encode(),
        "control_vector": stored_vector(store, control["memory_id"]),
    }
    before = files_containing(store.config.lance_uri, needles)
    assert all(before.values()), before  # the scan does see the data where it is

    report = store.forget("ann", secret["memory_id"])
    assert report.deleted == 1 and report.tags_dropped == ["after-secret"]
    after = files_containing(store.config.lance_uri, needles)
    assert after["secret_text"] == [] and after["secret_vector"] == []
    assert after["control_text"] and after["control_vector"]  # same files, same encoding: still found
    assert sorted(store.table.tags.list()) == ["before-secret"]
    assert store.get("ann", secret["memory_id"]) is None
    assert [
        h.memory["text"] for h in store.recall("ann", "zq-secret-8d1f bank pin", k=5, hybrid=True, now=T0)
    ] == [control_text]

    everything = store.forget("ann", everything=True)
    assert everything.deleted == 1 and store.list("ann") == []
    assert files_containing(store.config.lance_uri, needles)["control_vector"] == []


def test_forget_reaches_into_the_vector_index(tmp_path, embedder):
    config = MemoryConfig(data_root=tmp_path, index_min_rows=256, index_partitions=2, candidates=16)
    store = MemoryStore(config, embedder)
    rows = 300
    vecs = add_facts(store, rows, seed=100)
    m42 = stored_vector(store, "m42")
    assert files_containing(config.lance_uri, {"v": m42})["v"]
    built = store.maintain()
    assert built["vector_index"] == config.index_type and store.has_vector_index()
    assert store.recall("ann", vector=vecs[42], k=1, now=T0, touch=False)[0].memory["memory_id"] == "m42"
    store.forget("ann", "m42")
    stats = store.table.index_stats("vector_idx")
    assert stats.num_indexed_rows + stats.num_unindexed_rows == rows - 1
    assert "m42" not in [h.memory["memory_id"] for h in store.recall("ann", vector=vecs[42], k=5, now=T0)]
    assert files_containing(config.lance_uri, {"v": m42})["v"] == []

    # access stats rewrite the rows recalls touched (flush): maintain folds them back into one index segment
    for i in (7, 8, 9):
        store.recall("ann", vector=vecs[i], k=3, now=T0)
    assert store.table.index_stats("vector_idx").num_unindexed_rows == 0  # not written yet
    assert store.flush() >= 3
    assert store.table.index_stats("vector_idx").num_unindexed_rows > 0
    assert store.maintain()["index_segments_merged"] > 1
    stats = store.table.index_stats("vector_idx")
    assert (stats.num_indices, stats.num_unindexed_rows, stats.num_indexed_rows) == (1, 0, rows - 1)
    top = store.recall("ann", vector=vecs[8], k=1, now=T0, touch=False)[0].memory
    assert top["memory_id"] == "m8" and top["access_count"] == 1


def test_an_open_store_indexes_new_rows_in_the_background(tmp_path, embedder):
    config = MemoryConfig(
        data_root=tmp_path,
        index_min_rows=256,
        index_partitions=2,
        upkeep_unindexed_rows=10,
        refresh_seconds=0,
    )
    store = MemoryStore(config, embedder)
    rows = 300
    add_facts(store, rows, seed=700)
    store.maintain()
    for i in range(12):
        store.remember("ann", f"new {i}", vector=unit(1700 + i), now=T0)
    store.background.join()
    stats = store.table.index_stats("vector_idx")
    assert stats.num_indexed_rows >= rows + 10 and stats.num_unindexed_rows < 10  # indexed past the threshold
    assert stats.num_indexed_rows + stats.num_unindexed_rows == rows + 12 and store.background.errors == 0
    assert store.recall("ann", vector=unit(1711), k=1, now=T0, touch=False)[0].memory["text"] == "new 11"


def test_indexed_recall_filters_after_the_search_only_when_that_is_exact(tmp_path, embedder):
    """ann owns almost every row (post-filtering is exact and skips the filter scan); bob owns
    ten (post-filtering would come back short: the store falls back to filtering first). Both get
    exactly the nearest visible memories, and a superseded memory of ann's never comes back."""

    config = MemoryConfig(
        data_root=tmp_path, index_min_rows=256, index_partitions=2, nprobes=2, candidates=8, refine_factor=100
    )  # every probed row re-ranked exactly: the test is about filtering
    store = MemoryStore(config, embedder)
    rows = 400
    vecs = np.stack([unit(500 + i) for i in range(rows)])
    owners = ["bob" if i % 40 == 0 else "ann" for i in range(rows)]
    store.add_rows(pa.table({
        "memory_id": [f"m{i}" for i in range(rows)], "owner": owners, "modality": ["text"] * rows,
        "text": [f"fact {i}" for i in range(rows)],
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(vecs.reshape(-1)), EMBED_DIM),
        "model": [store.fingerprint] * rows, "created_at": [T0] * rows, "last_accessed_at": [T0] * rows,
        "access_count": [0] * rows, "saliency": [0.5] * rows, "kind": ["durable"] * rows,
        "superseded_by": ["m2" if i == 1 else None for i in range(rows)],
    }))
    store.maintain()
    assert store.has_vector_index()
    for owner, probe in (("ann", 1), ("ann", 77), ("bob", 40), ("bob", 200)):
        visible = [i for i in range(rows) if owners[i] == owner and i != 1]
        exact = sorted(visible, key=lambda i: -float(vecs[i] @ vecs[probe]))[:8]
        got = store.candidates(vecs[probe], owner, None, T0, 8)
        assert [int(m[1:]) for m in got.column("memory_id").to_pylist()] == exact
    assert store.search.prefilter_owners == {"bob"}


def test_hybrid_search_blends_keyword_matches(store):
    store.remember("ann", "the wifi password is xylophone77", vector=unit(21), now=T0)
    store.remember("ann", "lunch with Sam on tuesday", vector=unit(22), now=T0)
    hits = store.recall("ann", "what was the xylophone77 thing", k=2, hybrid=True, now=T0, touch=False)
    assert hits[0].memory["text"] == "the wifi password is xylophone77"
    assert hits[0].breakdown["keyword"] == 1.0 and hits[1].breakdown["keyword"] == 0.0
    assert {"cosine", "similarity"} <= set(hits[0].breakdown)


def test_memory_upkeep_flow_purges_expired_memories_and_folds_fragments(tmp_path, embedder):
    """What open stores do in the background, as the flow the memory-upkeep deployment runs."""
    from flows.memory import memory_upkeep_flow

    config = MemoryConfig(data_root=tmp_path, upkeep_small_fragments=1000)
    store = MemoryStore(config, embedder)
    old = datetime.now(UTC) - timedelta(hours=config.transient_ttl_hours + 1)
    store.remember("ann", "buy milk", kind="transient", session="s1", vector=unit(1), now=old)
    for i in range(5):
        store.remember("ann", f"fact {i}", vector=unit(10 + i))
    assert len(store.table.to_lance().get_fragments()) == 6
    done = memory_upkeep_flow(config)
    assert done.expired_purged == 1 and done.rows == 5 and done.versions["memories"] == store.table.version
    assert len(store.table.to_lance().get_fragments()) == 1
    assert [m["text"] for m in store.list("ann")] == [f"fact {i}" for i in range(5)]


# --- seeding and the command line ----------------------------------------------------------------


def test_seed_from_ingested_visdial(data_root, demo_dir, embedder):
    from memory.seed import seed_visdial

    store = MemoryStore(MemoryConfig(data_root=data_root), embedder)
    images = demo_dir / "images" / "train2014"
    counts = seed_visdial(store, split="train", owner="agent", limit=2, images_root=images, now=T0)
    assert counts == {"dialogs": 2, "inserted": 22, "embedded": 22}
    mem = store.list("agent")
    assert len(mem) == 22 and [m["modality"] for m in mem[:2]] == ["image", "text"]
    first, second = mem[:11], mem[11:]
    assert all(
        b["created_at"] - a["created_at"] == timedelta(seconds=60) for a, b in itertools.pairwise(first)
    )
    assert second[-1]["created_at"] == T0 and second[0]["created_at"] - first[0]["created_at"] == timedelta(
        hours=24
    )
    assert first[1]["text"].startswith("Q: ") and " A: " in first[1]["text"]
    again = seed_visdial(store, split="train", owner="agent", limit=2, images_root=images, now=T0)
    assert again["inserted"] == 0  # resumable: nothing twice
    with pytest.raises(ValueError, match="image_embeddings"):
        seed_visdial(store, split="train", limit=3, now=T0)  # per-dialog owners; images not embedded


def test_cli_add_recall_list_forget(tmp_path, embedder):
    from typer.testing import CliRunner

    from cli.main import app

    run = CliRunner()
    base = ["--data-root", str(tmp_path), "memory"]
    out = run.invoke(app, [*base, "add", "--owner", "u1", "--text", "my cat is called Tom", "--key", "cat",
                           "--saliency", "0.9", "--tiny"])
    assert out.exit_code == 0, out.output
    out = run.invoke(
        app, [*base, "add", "--owner", "u1", "--text", "my cat is called Felix", "--key", "cat", "--tiny"]
    )
    assert out.exit_code == 0, out.output
    out = run.invoke(app, [*base, "recall", "--owner", "u1", "--text", "my cat is called Felix", "-k", "3",
                           "--explain", "--tiny"])
    assert (
        out.exit_code == 0
        and "Felix" in out.output
        and "Tom" not in out.output
        and "similarity=" in out.output
    )
    out = run.invoke(app, [*base, "list", "--owner", "u1", "--superseded"])
    assert "superseded" in out.output and "Tom" in out.output
    felix_line = next(line for line in out.output.splitlines() if "Felix" in line)
    assert "n=1" in felix_line  # the recall was counted (written as the command exits)
    felix = felix_line.split()[0]
    maintained = run.invoke(app, [*base, "maintain"])
    assert maintained.exit_code == 0 and '"rows": 2' in maintained.output
    out = run.invoke(app, [*base, "forget", "--owner", "u1", "--id", felix, "--dry-run"])
    assert out.exit_code == 0 and '"dry_run": true' in out.output and felix in out.output
    assert "Felix" in run.invoke(app, [*base, "list", "--owner", "u1"]).output  # nothing removed
    out = run.invoke(app, [*base, "forget", "--owner", "u1", "--id", felix])
    assert out.exit_code == 0 and '"deleted": 1' in out.output
    out = run.invoke(app, [*base, "forget", "--owner", "", "--all"])
    assert out.exit_code == 1 and "owner id is required" in out.output and "Traceback" not in out.output
    for _ in range(2):  # a retried add with the caller's id stores it once
        out = run.invoke(app, [*base, "add", "--owner", "u2", "--text", "retry me", "--id", "u2-1", "--tiny"])
        assert out.exit_code == 0, out.output
    assert run.invoke(app, [*base, "list", "--owner", "u2"]).output.count("retry me") == 1
    assert run.invoke(app, [*base, "forget", "--owner", "u1"]).exit_code != 0
    assert run.invoke(app, [*base, "add", "--owner", "u1", "--tiny"]).exit_code != 0
    out = run.invoke(app, [*base, "forget", "--owner", "u1", "--all"])
    assert '"deleted": 1' in out.output
