"""Lineage survives upkeep: a version an artifact's manifest names is pinned by a tag, a run's
writes are tagged with the run, and `mmem tables maintain` compacts and removes every other old
version (bytes included) while each pinned one still opens with the rows it had."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from cli.main import app
from storage.lance import connect, open_table, pin, tag_run


def _maintain(root) -> list[dict]:
    res = CliRunner().invoke(app, ["--data-root", str(root), "tables", "maintain", "--keep-hours", "0"])
    assert res.exit_code == 0, res.output
    return json.loads(res.output)


def test_maintain_keeps_pinned_and_run_tagged_versions_and_removes_the_rest(data_root):
    db = connect(data_root / "lance")
    turns = open_table(db, "turns")
    pinned, pinned_rows = turns.version, turns.count_rows()
    assert pin(db, "turns", pinned) == f"pinned-v{pinned}"
    turns.delete("turn = 10")  # an untagged version in between ...
    untagged = turns.version
    turns.delete("turn = 9")  # ... and a run's write
    assert tag_run(db, "turns", "some-run") == "some-run"
    tagged, tagged_rows = turns.version, turns.count_rows()
    turns.delete("turn = 8")  # the latest, untagged
    latest_rows = turns.count_rows()

    report = {r["table"]: r for r in _maintain(data_root)}
    assert report["turns"]["versions_removed"] >= 1 and "memories" not in report

    ds = open_table(connect(data_root / "lance"), "turns").to_lance()
    assert ds.checkout_version(pinned).count_rows() == pinned_rows
    assert ds.checkout_version(tagged).count_rows() == tagged_rows
    assert ds.checkout_version("some-run").count_rows() == tagged_rows
    assert ds.count_rows() == latest_rows
    with pytest.raises((ValueError, OSError)):
        ds.checkout_version(untagged).count_rows()


def test_a_runs_later_write_moves_its_tag_forward(data_root):
    db = connect(data_root / "lance")
    tbl = open_table(db, "dialogs")
    tag_run(db, "dialogs", "run-1")
    tbl.delete("image_id < 0")  # no rows: still a new version
    tbl.delete(f"image_id = {tbl.to_lance().to_table(columns=['image_id']).column('image_id')[0].as_py()}")
    tag_run(db, "dialogs", "run-1")
    assert tbl.tags.list()["run-1"]["version"] == tbl.version


def test_tables_are_created_in_the_named_storage_version(tmp_path):
    from storage.lance import STORAGE_VERSION

    tbl = open_table(connect(tmp_path / "lance"), "reminders")
    assert tbl.to_lance().data_storage_version == STORAGE_VERSION == "2.2"
