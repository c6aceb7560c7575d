"""Two flow runs writing the same Lance tables at once, and readers during commits."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pyarrow as pa
from prefect.settings import PREFECT_API_URL

from storage.lance import connect, merge, open_table, read


def _ingest_cmd(root, demo, split):
    folder = {"train": "train2014", "val": "val2014"}[split]
    return [sys.executable, "-m", "cli.main", "--data-root", str(root), "ingest",
            "--visdial", str(demo / f"visdial_1.0_{split}.json"), "--images", str(demo / "images" / folder),
            "--coco", str(demo / f"captions_{folder}.json"), "--workers", "1"]


def test_concurrent_ingest_runs_lose_and_duplicate_nothing(tmp_path, demo_dir):
    """Three runs at once: two write the same rows (train twice), one writes other rows (val)."""
    splits = ("train", "train", "val")
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    procs = [subprocess.Popen(_ingest_cmd(tmp_path / "root", demo_dir, s), env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for s in splits]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outs
    db = connect(tmp_path / "root" / "lance")
    expected = 26
    for name, key, per in (
        ("dialogs", ["image_id"], 1),
        ("turns", ["image_id", "turn"], 10),
        ("images", ["image_id"], 1),
    ):
        t = read(db, name, columns=key)
        assert len(t) == expected * per, name
        assert len(t.group_by(key).aggregate([])) == len(t), f"duplicate keys in {name}"


def test_readers_see_whole_commits_only(tmp_path):
    db = connect(tmp_path / "lance")
    batch = 500
    committed = {0}
    seen: list[int] = []
    stop = threading.Event()

    def reader():
        rdb = connect(tmp_path / "lance")
        while not stop.is_set():
            tbl = open_table(rdb, "dialogs")
            seen.append(len(tbl.to_lance().to_table(columns=["image_id"])))

    t = threading.Thread(target=reader)
    t.start()
    try:
        for i in range(8):
            ids = list(range(i * batch, (i + 1) * batch))
            merge(db, "dialogs", pa.table({"image_id": ids, "split": ["x"] * batch, "caption": ["c"] * batch,
                                           "caption_hash": ["h"] * batch}))
            committed.add((i + 1) * batch)
    finally:
        stop.set()
        t.join()
    assert seen, "the reader never ran"
    assert set(seen) <= committed  # never a half-written batch
    assert len(read(db, "dialogs")) == 8 * batch


def test_concurrent_first_opens_create_a_table_once(tmp_path):
    """Eight threads open a table that does not exist yet, while one of them already writes.

    Unserialised, LanceDB's ``create_table(exist_ok=True)`` lets the losers of the create race
    commit an Overwrite on top of the winner (about 1 in 3 trials here), erasing what was merged
    meanwhile or failing the merge; ``open_table`` takes a lock around the creation.
    """
    for trial in range(12):
        uri = tmp_path / f"lance{trial}"
        start = threading.Barrier(8)
        errors: list[BaseException] = []

        def first_open(writer: bool, uri=uri, start=start, errors=errors):
            try:
                db = connect(uri)
                start.wait()
                open_table(db, "dialogs")
                if writer:
                    merge(
                        db,
                        "dialogs",
                        pa.table(
                            {
                                "image_id": [1, 2],
                                "split": ["x"] * 2,
                                "caption": ["c"] * 2,
                                "caption_hash": ["h"] * 2,
                            }
                        ),
                    )
            except BaseException as e:  # noqa: BLE001 - collected and asserted below
                errors.append(e)

        threads = [threading.Thread(target=first_open, args=(i == 0,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        tbl = open_table(connect(uri), "dialogs")
        assert tbl.version == 2, (
            f"trial {trial}: {tbl.version - 2} extra commits (a create rebased as Overwrite)"
        )
        assert len(read(connect(uri), "dialogs")) == 2
