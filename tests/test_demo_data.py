"""The demo dataset: deterministic, VisDial v1.0-shaped, COCO-readable, and true about its images."""

from __future__ import annotations

import contextlib
import io
import json
import re

import numpy as np
from PIL import Image

from ingest.demo_data import COLORS, make_scene, write_split


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = write_split(tmp_path / "a", "train", 5, seed=3)
    b = write_split(tmp_path / "b", "train", 5, seed=3)
    c = write_split(tmp_path / "c", "train", 5, seed=4)
    assert a["visdial"].read_bytes() == b["visdial"].read_bytes()
    assert a["visdial"].read_bytes() != c["visdial"].read_bytes()
    names = sorted(p.name for p in a["images"].iterdir())
    assert names == sorted(p.name for p in b["images"].iterdir())
    assert all(re.fullmatch(r"COCO_train2014_\d{12}\.jpg", n) for n in names)
    assert (a["images"] / names[0]).read_bytes() == (b["images"] / names[0]).read_bytes()


def test_visdial_format(demo_dir):
    doc = json.loads((demo_dir / "visdial_1.0_train.json").read_text())
    assert doc["version"] == "1.0" and doc["split"] == "train"
    data = doc["data"]
    assert all(isinstance(q, str) and q == q.lower() and not q.endswith("?") for q in data["questions"])
    for d in data["dialogs"]:
        assert len(d["dialog"]) == 10
        for r in d["dialog"]:
            assert len(r["answer_options"]) == 100
            assert r["answer_options"][r["gt_index"]] == r["answer"]
            assert r["answer_options"].count(r["answer"]) == 1


def test_coco_file_readable_by_pycocotools(demo_dir):
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(demo_dir / "captions_train2014.json"))
    assert len(coco.imgs) == 20
    img = next(iter(coco.imgs.values()))
    assert (demo_dir / "images" / "train2014" / img["file_name"]).is_file()
    assert coco.imgToAnns[img["id"]][0]["caption"].startswith("a drawing of")


def test_answers_are_true_about_the_image(demo_dir):
    """Counting answers match the scene, and the named colours are really in the pixels."""
    doc = json.loads((demo_dir / "visdial_1.0_train.json").read_text())
    q, a = doc["data"]["questions"], doc["data"]["answers"]
    numbers = ["zero", "one", "two", "three", "four", "five", "six"]
    checked = 0
    for i, d in enumerate(doc["data"]["dialogs"]):
        scene = make_scene(0, "train", i)
        assert scene.image_id == d["image_id"]
        img = np.asarray(
            Image.open(demo_dir / "images" / "train2014" / f"COCO_train2014_{d['image_id']:012d}.jpg")
        )
        assert img.shape[:2] == (scene.height, scene.width)
        for r in d["dialog"]:
            question, answer = q[r["question"]], a[r["answer"]]
            if question == "how many shapes are there" and answer in numbers:
                assert numbers.index(answer) == len(scene.shapes)
                checked += 1
            m = re.fullmatch(r"is there anything (\w+)", question)
            if m:
                color = np.array(COLORS[m.group(1)])
                present = (np.abs(img.astype(int) - color).sum(-1) < 40).mean() > 0.002
                assert present == answer.startswith("yes"), (question, answer)
                checked += 1
    assert checked >= 5


def test_photos_have_the_real_data_cost_shape(tmp_path):
    """--photos: photo-sized progressive JPEGs of COCO sizes, deterministic, and mostly distinct turn
    texts."""
    from schemas.embed import turn_text

    paths = write_split(tmp_path / "p", "train", 30, seed=0, photos=True)
    again = write_split(tmp_path / "q", "train", 3, seed=0, photos=True)
    files = sorted(paths["images"].iterdir())
    assert len(files) == 30
    assert files[0].read_bytes() == (again["images"] / files[0].name).read_bytes()  # a function of (seed, id)
    sizes = np.array([f.stat().st_size for f in files]) / 1024
    assert 100 <= sizes.mean() <= 200, sizes.mean()
    for f in files[:5]:
        with Image.open(f) as im:
            assert im.format == "JPEG" and im.mode == "RGB" and im.info.get("progressive")
            assert 400 <= min(im.size) and max(im.size) <= 720
            px = np.asarray(im, dtype=np.float32)
        assert px.std() > 20 and np.abs(np.diff(px, axis=1)).mean() > 4  # texture and noise, not flat colour
    base = write_split(tmp_path / "b", "train", 2, seed=0, photos=True, baseline_jpeg=True)["images"]
    with Image.open(base / files[0].name) as im, Image.open(files[0]) as prog:  # the same photo, baseline
        assert not im.info.get("progressive") and im.size == prog.size
        assert np.abs(np.asarray(im, dtype=int) - np.asarray(prog, dtype=int)).mean() < 2
    doc = json.loads(paths["visdial"].read_text())["data"]
    texts = [turn_text(doc["questions"][r["question"]], doc["answers"][r["answer"]])
             for d in doc["dialogs"] for r in d["dialog"]]
    assert len(texts) == 300 and len(set(texts)) >= 0.6 * len(texts)
    assert (
        3
        <= np.mean(
            [len(doc["questions"][r["question"]].split()) for d in doc["dialogs"] for r in d["dialog"]]
        )
        <= 7
    )
