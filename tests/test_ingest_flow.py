"""The ingest flow end to end on the demo data: tables, quarantine, idempotence, versions."""

from __future__ import annotations

import json
import shutil

import pytest

from flows.ingest import ingest_flow
from schemas.ingest import IngestConfig
from schemas.validate import ValidationFailed
from storage.lance import connect, read


def _config(root, demo, **kw):
    return IngestConfig(
        data_root=root,
        visdial=demo / "visdial_1.0_train.json",
        images=demo / "images" / "train2014",
        coco=demo / "captions_train2014.json",
        workers=1,
        **kw,
    )


def test_ingested_tables(ingested_root):
    db = connect(ingested_root / "lance")
    turns = read(db, "turns")
    dialogs = read(db, "dialogs")
    images = read(db, "images")
    assert len(dialogs) == 26 and len(images) == 26 and len(turns) == 260
    assert set(read(db, "dialogs").column("split").to_pylist()) == {"train", "val"}
    t = turns.filter(turns.column("turn").to_numpy() == 1).slice(0, 1).to_pylist()[0]
    assert t["answer_options"][t["gt_index"]] == t["answer"] and len(t["answer_options"]) == 100
    assert len(read(db, "quarantine")) == 0


def test_rerun_writes_nothing_and_changed_input_writes_a_new_version(tmp_path, demo_dir):
    root = tmp_path / "root"
    first = ingest_flow(_config(root, demo_dir))
    again = ingest_flow(_config(root, demo_dir))
    assert again.versions == first.versions
    shown = json.loads(first.to_json())  # what `mmem ingest` prints: today's keys
    assert set(shown) == {"read_versions", "versions", "counts"} and shown["read_versions"] == {}
    assert (
        set(shown["versions"]) == {"images", "dialogs", "turns", "quarantine"}
        and shown["counts"]["dialogs_kept"] == 20
    )

    doc = json.loads((demo_dir / "visdial_1.0_train.json").read_text())
    doc["data"]["dialogs"][0]["caption"] = "a changed caption"
    changed_file = tmp_path / "visdial_1.0_train.json"
    changed_file.write_text(json.dumps(doc))
    changed = ingest_flow(_config(root, demo_dir).model_copy(update={"visdial": changed_file}))
    assert changed.versions["dialogs"] == first.versions["dialogs"] + 1
    assert changed.versions["images"] == first.versions["images"]
    db = connect(root / "lance")
    assert (
        read(db, "dialogs", where=f"image_id = {doc['data']['dialogs'][0]['image_id']}")
        .column("caption")[0]
        .as_py()
        == "a changed caption"
    )
    assert len(read(db, "dialogs")) == 20  # updated in place, not appended
    old = read(db, "dialogs", version=first.versions["dialogs"])
    assert "a changed caption" not in old.column("caption").to_pylist()


def test_bad_records_are_quarantined_with_reasons(tmp_path, demo_dir):
    demo = tmp_path / "demo"
    shutil.copytree(demo_dir, demo)
    doc = json.loads((demo / "visdial_1.0_train.json").read_text())
    dialogs = doc["data"]["dialogs"]
    dialogs[1]["dialog"] = dialogs[1]["dialog"][:7]
    dialogs[2]["dialog"][0]["question"] = 10**6
    dialogs.append(dict(dialogs[3]))  # duplicate id
    (demo / "visdial_1.0_train.json").write_text(json.dumps(doc))
    img_dir = demo / "images" / "train2014"
    (img_dir / f"COCO_train2014_{dialogs[4]['image_id']:012d}.jpg").unlink()
    trunc = img_dir / f"COCO_train2014_{dialogs[5]['image_id']:012d}.jpg"
    trunc.write_bytes(trunc.read_bytes()[:500])
    coco = json.loads((demo / "captions_train2014.json").read_text())
    coco["images"] = [im for im in coco["images"] if im["id"] != dialogs[4]["image_id"]]
    (demo / "captions_train2014.json").write_text(json.dumps(coco))

    result = ingest_flow(_config(tmp_path / "root", demo))
    counts = result.counts
    assert counts["dialogs_in"] == 21 and counts["dialogs_kept"] == 16 and counts["turns_kept"] == 160
    q = read(connect(tmp_path / "root" / "lance"), "quarantine").to_pylist()
    by_key = {(r["key"], r["reason"]) for r in q}
    ids = [str(d["image_id"]) for d in dialogs]
    assert by_key == {
        (ids[1], "wrong_turn_count"), (ids[2], "index_out_of_range"), (ids[3], "duplicate_id"),
        (ids[4], "image_missing"), (ids[5], "image_unreadable"),
    }
    assert all(r["stage"] == "ingest" and r["record"] for r in q)
    again = ingest_flow(_config(tmp_path / "root", demo))
    assert again.versions == result.versions  # quarantine rows are not written twice


def test_counts_artifact_published(tmp_path, demo_dir, flow_run_artifacts):
    state = ingest_flow(_config(tmp_path / "root", demo_dir), return_state=True)
    artifacts = flow_run_artifacts(state.state_details.flow_run_id)
    assert {"ingest-counts", "ingest-validation"} <= set(artifacts)
    assert "dialogs_kept | 20" in artifacts["ingest-counts"]["data"]


def test_missing_image_folder_is_a_clear_error(tmp_path, demo_dir):
    with pytest.raises(FileNotFoundError, match="image folder"):
        ingest_flow(_config(tmp_path / "root", demo_dir).model_copy(update={"images": tmp_path / "nope"}))


def test_validation_gate_fails_with_report():
    import pyarrow as pa

    from schemas.expectations import dialogs_suite
    from schemas.validate import validate

    report = validate(
        pa.table({"image_id": [1, 1], "caption": ["a", "b"]}), dialogs_suite(), table_name="dialogs"
    )
    with pytest.raises(ValidationFailed, match="expect_column_values_to_be_unique"):
        report.raise_if_failed()


@pytest.mark.parametrize("field, value", [("workers", 10**6), ("max_image_pixels", 10**12),
                                          ("max_image_bytes", 10**12), ("max_image_bytes", 0)])
def test_numeric_parameters_are_bounded(tmp_path, field, value):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=field):
        IngestConfig(visdial=tmp_path / "v.json", images=tmp_path, **{field: value})
    assert IngestConfig(visdial=tmp_path / "v.json", images=tmp_path).max_image_bytes == 50_000_000


def test_bad_coco_entries_are_quarantined_and_their_dialogs_kept(tmp_path, demo_dir):
    demo = tmp_path / "demo"
    shutil.copytree(demo_dir, demo)
    coco_path = demo / "captions_train2014.json"
    coco = json.loads(coco_path.read_text())
    coco["images"][0]["file_name"] = "COCO_train2014_\0.jpg"
    coco["images"][1]["file_name"] = ["not", "a", "name"]
    coco_path.write_text(json.dumps(coco))
    bad = [str(coco["images"][i]["id"]) for i in (0, 1)]

    result = ingest_flow(_config(tmp_path / "root", demo))
    assert result.counts["dialogs_kept"] == 20  # the image folder still names both images
    q = read(connect(tmp_path / "root" / "lance"), "quarantine").to_pylist()
    assert sorted((r["key"], r["reason"]) for r in q) == sorted((k, "bad_record") for k in bad)
    details = {r["key"]: r["detail"] for r in q}
    assert details[bad[0]].startswith(f"{coco_path}: images[0].file_name is ") and "NUL" in details[bad[0]]
    assert details[bad[1]] == f"{coco_path}: images[1].file_name is ['not', 'a', 'name'], not a string"
    assert json.loads(next(r["record"] for r in q if r["key"] == bad[1])) == coco["images"][1]


def test_truncated_coco_file_is_a_one_line_error_through_the_cli(tmp_path, demo_dir):
    from typer.testing import CliRunner

    from cli.main import app

    coco = tmp_path / "captions_train2014.json"
    raw = (demo_dir / "captions_train2014.json").read_bytes()
    coco.write_bytes(raw[: len(raw) // 3])
    res = CliRunner().invoke(app, ["--data-root", str(tmp_path / "root"), "ingest", "--workers", "1",
                                   "--visdial", str(demo_dir / "visdial_1.0_train.json"),
                                   "--images", str(demo_dir / "images" / "train2014"), "--coco", str(coco)])
    assert res.exit_code == 1, res.output
    assert f"error: {coco}: invalid JSON at line 1, column " in res.output, res.output
    assert "Traceback" not in res.output
