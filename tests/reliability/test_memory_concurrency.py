"""The memory store beside other processes: forget while others write, stale access stats, stores
kept open across another process's upkeep, retried and killed writers, killed upkeep.

Every "other process" is a real subprocess (``_memory_worker.py``) on the same Lance table."""

from __future__ import annotations

import collections
import os
import random
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from lance.file import LanceFileReader

sys.path.insert(0, str(Path(__file__).parent))
from _memory_worker import GivenVectors, store, vector

from memory.store import MemoryStore
from schemas.memory import MemoryConfig

WORKER = Path(__file__).with_name("_memory_worker.py")


def spawn(*args, env=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(WORKER), *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})})


def run(*args, env=None) -> str:
    proc = spawn(*args, env=env)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    return out


def logged(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def all_ids(root: Path) -> collections.Counter:
    s = store(root)
    return collections.Counter(
        s.mt.dataset(fresh=True).to_table(columns=["memory_id"]).column("memory_id").to_pylist()
    )


def files_holding(root: Path, needles: list[bytes]) -> list[str]:
    hits = []
    for dirpath, _, files in os.walk(root):
        for f in files:
            data = Path(dirpath, f).read_bytes()
            hits += [f"{f}: {n[:20]!r}" for n in needles if n in data]
    return hits


def bulk(owner: str, n: int, word: str = "fact") -> pa.Table:
    """``n`` prepared memories of ``owner`` (ids ``OWNER-i``), added in one fragment by ``add_rows``."""
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    vecs = np.stack([vector(owner, i) for i in range(n)])
    return pa.table({
        "memory_id": [f"{owner}-{i}" for i in range(n)], "owner": [owner] * n, "modality": ["text"] * n,
        "text": [f"{word}{i} about {word}" for i in range(n)],
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(vecs.reshape(-1)), 1024),
        "model": ["synthetic"] * n, "created_at": [t0] * n, "last_accessed_at": [t0] * n,
        "access_count": [0] * n, "saliency": [0.5] * n, "kind": ["durable"] * n, "subject_key": [word] * n,
    })


def test_forget_beside_writers_in_other_processes(tmp_path):
    """Three processes add memories of their own owners while this one forgets another owner, again
    and again: the table stays readable, every committed memory of the writers is there exactly
    once, and the forgotten owner's rows are in no file."""
    root = tmp_path
    main = store(root)
    rounds, per_round = 2, 40
    forgets = 0
    for r in range(rounds):
        for i in range(15):
            main.remember("victim", f"zqvictim{r}x{i} my secret", vector=vector("victim", 100 * r + i),
                          memory_id=f"victim-{r}-{i}")
        procs = [
            spawn("add", root, f"w{w}", per_round, tmp_path / f"w{w}.log", r * per_round) for w in range(3)
        ]
        while any(p.poll() is None for p in procs):
            main.forget("victim", everything=True)
            forgets += 1
            main.remember("victim", f"zqvictim{r}again my secret", vector=vector("victim", 999),
                          memory_id=f"victim-{r}-again")
            time.sleep(random.uniform(0.05, 0.3))
        outs = [p.communicate()[0] for p in procs]
        assert [p.returncode for p in procs] == [0, 0, 0], outs
        main.forget("victim", everything=True)
    assert forgets >= 3
    ids = all_ids(root)
    for w in range(3):
        committed = logged(tmp_path / f"w{w}.log")
        assert len(committed) == rounds * per_round
        assert all(ids[m] == 1 for m in committed), {m: ids[m] for m in committed if ids[m] != 1}
    assert sum(ids.values()) == 3 * rounds * per_round and not any(m.startswith("victim") for m in ids)
    assert files_holding(root / "lance", [b"zqvictim", vector("victim", 999).tobytes()]) == []
    assert len(store(root).recall("w0", vector=vector("w0", 5), k=3, touch=False)) == 3


def _index_contents(table_dir: Path) -> tuple[set[int], list[str]]:
    """Every row id and every string value the index files hold, decoded through Lance's reader."""
    row_ids: set[int] = set()
    strings: list[str] = []
    for path in (table_dir / "_indices").rglob("*"):
        if not path.is_file():
            continue
        try:
            t = LanceFileReader(str(path)).read_all().to_table()
        except Exception:  # noqa: BLE001, S112 -- not a Lance file (a raw index blob): grepped instead
            continue
        for name in t.column_names:
            col = t.column(name)
            if name in ("_rowid", "ids", "row_id") and pa.types.is_integer(col.type):
                row_ids |= set(col.to_pylist())
            elif pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
                strings += [v for v in col.to_pylist() if v]
    return row_ids, strings


def test_forget_purges_every_index_even_when_the_rows_fill_whole_fragments(tmp_path):
    """With the vector (IVF_FLAT: it keeps the float32 vectors), full-text and every scalar index
    built, forgetting an owner whose rows are whole fragments leaves none of its row ids, ids,
    owner name, tokens or vectors in any index or data file."""
    config = MemoryConfig(data_root=tmp_path, index_min_rows=200, index_partitions=2, index_type="IVF_FLAT",
                          hybrid=True, compact_rows=100)  # the bulk fragments stay as written
    s = MemoryStore(config, GivenVectors())

    s.add_rows(bulk("keeper", 150, "teapot"))
    s.add_rows(bulk("zqvictimowner", 120, "zqvictimword"))  # a fragment of its own
    s.add_rows(bulk("other", 150, "lantern"))
    built = s.maintain()
    assert built["vector_index"] == "IVF_FLAT" and built["owner_index"] == "BTREE"
    s.recall("keeper", "teapot3", vector=vector("keeper", 3), k=2, hybrid=True, touch=False)  # builds FTS
    ds = s.mt.dataset(fresh=True)
    assert {i.field_names[0] for i in ds.describe_indices()} >= {
        "vector",
        "text",
        "owner",
        "memory_id",
        "kind",
    }
    victim = ds.to_table(columns=["memory_id"], filter="owner = 'zqvictimowner'", with_row_id=True)
    victim_rows = set(victim.column("_rowid").to_pylist())
    table_dir = Path(config.lance_uri) / "memories.lance"
    before_ids, before_strings = _index_contents(table_dir)
    assert victim_rows <= before_ids and any("zqvictim" in v for v in before_strings)  # the check sees them

    report = s.forget("zqvictimowner", everything=True)
    assert report.deleted == 120 and report.indexes_rebuilt  # whole fragment: indexes rewritten
    after_ids, after_strings = _index_contents(table_dir)
    assert not victim_rows & after_ids
    assert not [v for v in after_strings if "zqvictim" in v]
    needles = [b"zqvictim", *(vector("zqvictimowner", i).tobytes()[:256] for i in (0, 7, 119))]
    assert files_holding(table_dir, needles) == []
    keep = [vector("keeper", 5).tobytes()[:256]]
    assert files_holding(table_dir, keep)  # the same scan finds what is kept
    assert [
        h.memory["memory_id"] for h in s.recall("keeper", vector=vector("keeper", 5), k=1, touch=False)
    ] == ["keeper-5"]
    hits = s.recall("other", "lantern7", vector=vector("other", 7), k=1, hybrid=True, touch=False)
    assert hits[0].memory["memory_id"] == "other-7"


def test_a_stale_access_flush_never_undoes_another_process_supersede_or_forget(tmp_path):
    s = store(tmp_path, touch_flush_memories=1000)
    s.remember("ann", "I live in Berlin", key="home", vector=vector("ann", 1), memory_id="ann-berlin")
    s.remember("ann", "I like tea", vector=vector("ann", 2), memory_id="ann-tea")
    assert s.recall("ann", vector=vector("ann", 1), k=1)[0].memory["memory_id"] == "ann-berlin"  # pending
    assert s.recall("ann", vector=vector("ann", 2), k=1)[0].memory["memory_id"] == "ann-tea"
    paris = run("supersede", tmp_path, "ann", "home", "I live in Paris").split()[-1]
    run("forget", tmp_path, "ann")  # forgets everything of ann, in another process...
    s2 = store(tmp_path)
    assert s2.list("ann", include_superseded=True) == []
    assert s.flush() == 0  # ...so the pending accesses find nothing to update, and resurrect nothing
    assert all_ids(tmp_path) == collections.Counter()

    s.remember("bob", "I live in Rome", key="home", vector=vector("bob", 1), memory_id="bob-rome")
    assert s.recall("bob", vector=vector("bob", 1), k=1)[0].memory["memory_id"] == "bob-rome"
    newer = run("supersede", tmp_path, "bob", "home", "I live in Oslo").split()[-1]
    assert s.flush() == 1
    hist = {m["memory_id"]: m for m in store(tmp_path).history("bob", "home")}
    assert hist["bob-rome"]["superseded_by"] == newer and hist["bob-rome"]["access_count"] == 1
    assert hist[newer]["superseded_by"] is None
    assert [h.memory["memory_id"] for h in store(tmp_path).recall("bob", vector=vector("bob", 1), k=5)] == [
        newer
    ]
    assert paris  # the first supersede did commit before the forget


def test_a_store_kept_open_survives_another_process_forget_and_sees_new_memories(tmp_path):
    s = store(tmp_path)  # refresh_seconds: 1
    for i in range(5):
        s.remember("ann", f"fact {i}", vector=vector("ann", i), memory_id=f"ann-{i}")
    assert s.recall("ann", vector=vector("ann", 3), k=1)[0].memory["memory_id"] == "ann-3"
    run("add", tmp_path, "bob", 30, tmp_path / "bob.log")
    run("forget", tmp_path, "bob")  # compaction + cleanup of every old version, in another process
    s.remember("ann", "fact 5", vector=vector("ann", 5), memory_id="ann-5")  # the open store still writes
    assert s.recall("ann", vector=vector("ann", 5), k=1)[0].memory["memory_id"] == "ann-5"
    run("add", tmp_path, "carl", 1, tmp_path / "carl.log")
    written = time.monotonic()
    time.sleep(max(0.0, 1.05 - (time.monotonic() - written)))
    hits = s.recall("carl", vector=vector("carl", 0), k=1, touch=False)  # written by another process 1 s ago
    assert [h.memory["memory_id"] for h in hits] == ["carl-0"]
    s.close()
    assert all_ids(tmp_path) == collections.Counter({f"ann-{i}": 1 for i in range(6)} | {"carl-0": 1})


def test_a_killed_writer_retried_stores_every_memory_exactly_once(tmp_path):
    log = tmp_path / "w.log"
    proc = spawn("add", tmp_path, "w", 400, log)
    deadline = time.monotonic() + 120
    while len(logged(log)) < 15:
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    done = len(logged(log))
    assert 15 <= done < 400
    run("add", tmp_path, "w", 400, tmp_path / "retry.log")  # the caller retries every call, same ids
    ids = all_ids(tmp_path)
    assert sum(ids.values()) == 400 and set(ids.values()) == {1}


@pytest.mark.parametrize(("at", "ids"), [("claim", True), ("claim", False), ("commit", False)])
def test_a_writer_killed_mid_group_commit_loses_and_doubles_nothing(tmp_path, at, ids):
    """Three writer processes and a fourth that is SIGKILLed in the writers' turn holding the
    others' memories, after claiming them and before (or after) their one commit: the others'
    calls all return with their memory stored exactly once, also when the store chose the ids (no
    check by id saves a commit made twice); with its own ids the killed caller retries and every
    memory is there once; upkeep leaves the spool empty."""
    root, n = tmp_path, 30
    store(root).add_rows(bulk("seed", 3))  # the table exists before the writers race for it
    owners = ["gw0", "gw1", "gw2"]
    env = {} if ids else {"MEMORY_WORKER_NO_IDS": "1"}
    procs = [spawn("add", root, o, n, tmp_path / f"{o}.log", env=env) for o in owners]
    killer = spawn("add", root, "gk", n, tmp_path / "gk.log", env={**env, "MEMORY_WORKER_DIE_IN_GROUP": at})
    out, _ = killer.communicate(timeout=300)
    assert killer.returncode == -signal.SIGKILL, out
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out
    if ids:
        run("add", root, "gk", n, tmp_path / "gk.log")  # the caller retries every id of its own
    texts = collections.Counter(
        store(root).mt.dataset(fresh=True).to_table(columns=["text"]).column("text").to_pylist()
    )
    for o in [*owners, "gk"] if ids else owners:
        assert [texts[f"{o} fact {i}"] for i in range(n)] == [1] * n, o
    assert max(texts.values()) == 1
    if ids:
        assert max(all_ids(root).values()) == 1
    run("maintain", root)
    assert list(store(root).mt.spool.dir.iterdir()) == []


def test_a_malformed_spool_entry_is_reported_and_never_used(tmp_path, caplog):
    s = store(root=tmp_path)
    s.remember("u", "first", vector=vector("u", 0))
    bad = s.mt.spool.dir / f"{os.getpid()}-x.pending"
    bad.write_text('{"memory_id": "evil", "check_id": false, "fragments": [{"id": "__import__"}]}')
    s.remember("u", "second", vector=vector("u", 1))
    assert "malformed" in caplog.text
    assert bad.with_suffix(".bad").exists() and not bad.exists()
    assert "evil" not in all_ids(tmp_path)
    assert len(s.list("u")) == 2


def test_upkeep_killed_midway_leaves_a_readable_table_and_runs_again(tmp_path):
    env = {"MMEM_MEMORY_INDEX_MIN_ROWS": "300", "MMEM_MEMORY_INDEX_PARTITIONS": "2"}
    run("add", tmp_path, "ann", 60, tmp_path / "a.log")  # 60 one-row fragments and more
    s = store(tmp_path, upkeep_small_fragments=10_000)
    s.add_rows(bulk("bulk", 400))
    killed = 0
    for delay in (0.05, 0.3, 0.8):
        proc = spawn("maintain", tmp_path, env=env)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(delay)  # into the work: index builds, compaction, cleanup
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
        killed += proc.returncode == -signal.SIGKILL
        fresh = store(tmp_path)
        assert len(fresh.list("ann")) == 60 and len(fresh.list("bulk")) == 400
        assert (
            fresh.recall("ann", vector=vector("ann", 7), k=1, touch=False)[0].memory["memory_id"] == "ann-7"
        )
    assert killed >= 2
    out = run("maintain", tmp_path, env=env)
    assert "'rows': 460" in out
    assert store(tmp_path).has_vector_index()


def test_expired_transient_memories_are_never_returned_before_or_after_upkeep(tmp_path):
    s = store(tmp_path, transient_ttl_hours=1)
    old = datetime.now(UTC) - timedelta(hours=2)
    s.remember("ann", "buy milk", kind="transient", session="s1", vector=vector("ann", 1), now=old,
               memory_id="ann-milk")
    s.remember("ann", "I like tea", vector=vector("ann", 2), memory_id="ann-tea")
    purged = []
    for _ in range(2):
        assert [m["memory_id"] for m in s.list("ann")] == ["ann-tea"] and s.get("ann", "ann-milk") is None
        hits = s.recall("ann", vector=vector("ann", 1), k=5, session="s1", touch=False)
        assert "ann-milk" not in [h.memory["memory_id"] for h in hits]
        purged.append(s.maintain().get("expired_purged"))
    assert purged == [1, None] and all_ids(tmp_path) == collections.Counter({"ann-tea": 1})
