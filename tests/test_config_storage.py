"""Configuration layering and the Lance storage layer."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from schemas.ingest import IngestConfig
from storage.lance import connect, dedupe, merge, read, tag


def test_config_layers_defaults_profile_env_overrides(tmp_path, monkeypatch):
    profile = tmp_path / "p.toml"
    profile.write_text('data_root = "/from/profile"\n[ingest]\nworkers = 3\nmax_image_pixels = 10\n')
    base = {"visdial": Path("v.json"), "images": Path("imgs")}
    c = IngestConfig.load(profile, **base)
    assert (c.data_root, c.workers, c.max_image_pixels) == (Path("/from/profile"), 3, 10)
    monkeypatch.setenv("MMEM_INGEST_WORKERS", "5")
    monkeypatch.setenv("MMEM_DATA_ROOT", "/from/env")
    c = IngestConfig.load(profile, **base)
    assert (c.data_root, c.workers, c.max_image_pixels) == (Path("/from/env"), 5, 10)
    c = IngestConfig.load(profile, workers=7, data_root=Path("/cli"), **base)
    assert (c.data_root, c.workers) == (Path("/cli"), 7)
    assert c.lance_uri == "/cli/lance"


def test_config_rejects_unknown_and_invalid_values(tmp_path):
    profile = tmp_path / "p.toml"
    profile.write_text("[ingest]\nwokers = 3\n")
    with pytest.raises(ValueError, match="wokers"):
        IngestConfig.load(profile, visdial=Path("v"), images=Path("i"))
    with pytest.raises(ValueError, match="workers"):
        IngestConfig(visdial=Path("v"), images=Path("i"), workers=0)
    bad = tmp_path / "bad.toml"
    bad.write_text("[ingest\n")
    with pytest.raises(ValueError, match="not valid TOML"):
        IngestConfig.load(bad, visdial=Path("v"), images=Path("i"))


def _dialogs(ids, caption="c"):
    return pa.table(
        {
            "image_id": ids,
            "split": ["train"] * len(ids),
            "caption": [f"{caption}{i}" for i in ids],
            "caption_hash": ["h"] * len(ids),
        }
    )


def test_merge_dedupes_upserts_and_skips_noop_versions(tmp_path):
    db = connect(tmp_path / "lance")
    r1 = merge(db, "dialogs", _dialogs([1, 2, 2, 3]))
    assert (r1.inserted, r1.updated) == (3, 0)
    r2 = merge(db, "dialogs", _dialogs([1, 2, 3]))
    assert r2.version == r1.version  # nothing changed: no new version
    r3 = merge(db, "dialogs", pa.concat_tables([_dialogs([3], "new"), _dialogs([4])]))
    assert (r3.inserted, r3.updated, r3.version) == (1, 1, r1.version + 1)
    rows = {r["image_id"]: r["caption"] for r in read(db, "dialogs").to_pylist()}
    assert rows == {1: "c1", 2: "c2", 3: "new3", 4: "c4"}
    assert len(read(db, "dialogs", version=r1.version)) == 3
    label = tag(db, "dialogs", "run:1/a")
    assert label == "run-1-a"
    assert len(read(db, "dialogs", version=label)) == 4
    for update in (True, False):  # an empty batch is a no-op either way (no version, no error)
        assert merge(db, "dialogs", _dialogs([]), update=update).version == r3.version


def test_dedupe_keeps_last_and_conform_requires_key(tmp_path):
    t = pa.table({"k": [1, 2, 1], "v": ["a", "b", "c"]})
    assert dedupe(t, ("k",)).to_pylist() == [{"k": 2, "v": "b"}, {"k": 1, "v": "c"}]
    with pytest.raises(ValueError, match="required columns"):
        merge(connect(tmp_path / "l"), "dialogs", pa.table({"caption": ["x"]}))
