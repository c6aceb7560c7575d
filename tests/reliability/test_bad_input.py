"""Bad input, tried systematically: hypothesis drives the VisDial parser and the image loader.

Guarantee: every bad record gets a quarantine reason or the file a clear error, and every good
record in the same input survives.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from ingest.images import ImageInfo, ImageProblem, check_image
from ingest.visdial import VisdialFormatError, parse_visdial
from schemas.quarantine import Reason

QUESTIONS = ["is it red", "any dogs", "how many"]
ANSWERS = ["yes", "no", "two", "maybe"]

CORRUPTIONS = {
    "none": None,
    "short_dialog": Reason.WRONG_TURN_COUNT,
    "empty_dialog": Reason.WRONG_TURN_COUNT,
    "question_oob": Reason.INDEX_OUT_OF_RANGE,
    "negative_answer": Reason.INDEX_OUT_OF_RANGE,
    "huge_option": Reason.INDEX_OUT_OF_RANGE,
    "gt_oob": Reason.GT_INDEX_OUT_OF_RANGE,
    "string_index": Reason.BAD_RECORD,
    "float_index": Reason.BAD_RECORD,
    "missing_caption": Reason.BAD_RECORD,
    "missing_dialog": Reason.BAD_RECORD,
    "null_options": Reason.BAD_RECORD,
    "nested_options": Reason.BAD_RECORD,
    "bool_id": Reason.BAD_RECORD,
    "blank_caption": Reason.EMPTY_TEXT,
}


def _dialog(image_id: int, rng: np.random.Generator) -> dict:
    rounds = []
    for _ in range(10):
        a = int(rng.integers(len(ANSWERS)))
        opts = [int(x) for x in rng.integers(len(ANSWERS), size=100)]
        gt = int(rng.integers(100))
        opts[gt] = a
        rounds.append(
            {
                "question": int(rng.integers(len(QUESTIONS))),
                "answer": a,
                "gt_index": gt,
                "answer_options": opts,
            }
        )
    return {"image_id": image_id, "caption": f"picture {image_id}", "dialog": rounds}


def _corrupt(d: dict, kind: str, rng: np.random.Generator) -> dict:
    r = int(rng.integers(10))
    rnd = d["dialog"][r]
    if kind == "short_dialog":
        d["dialog"] = d["dialog"][: int(rng.integers(1, 10))]
    elif kind == "empty_dialog":
        d["dialog"] = []
    elif kind == "question_oob":
        rnd["question"] = len(QUESTIONS) + int(rng.integers(1, 10**9))
    elif kind == "negative_answer":
        rnd["answer"] = -int(rng.integers(1, 10**6))
    elif kind == "huge_option":
        rnd["answer_options"][int(rng.integers(100))] = 2**62
    elif kind == "gt_oob":
        rnd["gt_index"] = int(rng.choice([-1, 100, 10**7]))
    elif kind == "string_index":
        rnd["question"] = str(rnd["question"])
    elif kind == "float_index":
        rnd["answer"] = rnd["answer"] + 0.5
    elif kind == "missing_caption":
        del d["caption"]
    elif kind == "missing_dialog":
        del d["dialog"]
    elif kind == "null_options":
        rnd["answer_options"] = None
    elif kind == "nested_options":
        rnd["answer_options"] = [rnd["answer_options"]]
    elif kind == "bool_id":
        d["image_id"] = True
    elif kind == "blank_caption":
        d["caption"] = " \t"
    return d


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kinds=st.lists(st.sampled_from(sorted(CORRUPTIONS)), min_size=1, max_size=12),
    seed=st.integers(0, 2**32 - 1),
    dup=st.booleans(),
)
def test_every_bad_dialog_has_a_reason_and_good_ones_survive(kinds, seed, dup):
    rng = np.random.default_rng(seed)
    dialogs, expected_kept, expected_reasons = [], [], []
    for i, kind in enumerate(kinds):
        d = _corrupt(_dialog(1000 + i, rng), kind, rng)
        dialogs.append(d)
        if CORRUPTIONS[kind] is None:
            expected_kept.append(1000 + i)
        else:
            expected_reasons.append(CORRUPTIONS[kind])
    if dup and expected_kept:
        dialogs.append(_dialog(expected_kept[0], rng))
        expected_reasons.append(Reason.DUPLICATE_ID)
    doc = {
        "version": "1.0",
        "split": "train",
        "data": {"questions": QUESTIONS, "answers": ANSWERS, "dialogs": dialogs},
    }
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "v.json"
        p.write_text(json.dumps(doc))
        parsed = parse_visdial(p)
    assert parsed.image_ids.tolist() == expected_kept
    assert sorted(r.reason for r in parsed.rejections) == sorted(expected_reasons)
    assert parsed.num_dialogs + len(parsed.rejections) == len(dialogs)


@settings(max_examples=30, deadline=None)
@given(
    cut=st.floats(0.0, 0.999),
    seed=st.integers(0, 1000),
    byte=st.sampled_from([b"\xff", b"\xc3", b"\x80"]),
    mode=st.sampled_from(["truncate", "non_utf8"]),
)
def test_broken_file_is_a_clear_error_naming_the_file(cut, seed, byte, mode):
    rng = np.random.default_rng(seed)
    doc = {
        "version": "1.0",
        "split": "train",
        "data": {"questions": QUESTIONS, "answers": ANSWERS, "dialogs": [_dialog(i, rng) for i in range(3)]},
    }
    raw = json.dumps(doc).encode()
    pos = int(cut * len(raw))
    if mode == "truncate":
        raw = raw[:pos]
    else:
        quote = raw.index(b'"picture', min(pos, raw.rindex(b'"picture'))) + 1
        raw = raw[:quote] + byte + raw[quote:]
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "broken.json"
        p.write_bytes(raw)
        try:
            parse_visdial(p)
        except VisdialFormatError as exc:
            assert str(p) in str(exc)
            assert ("line" in str(exc)) or ("byte" in str(exc)) or ("VisDial" in str(exc))
        else:
            raise AssertionError("a broken file parsed")


def _image_bytes(kind: str, w: int, h: int, rng: np.random.Generator) -> bytes:
    arr = (rng.random((h, w, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    if kind == "rgb":
        Image.fromarray(arr).save(buf, "JPEG")
    elif kind == "cmyk":
        Image.fromarray(arr).convert("CMYK").save(buf, "JPEG")
    elif kind == "gray":
        Image.fromarray(arr).convert("L").save(buf, "JPEG")
    elif kind == "png16":
        Image.fromarray(arr[..., 0].astype(np.uint16) * 257).save(buf, "PNG")
    elif kind == "png_as_jpg":
        Image.fromarray(arr).save(buf, "PNG")
    elif kind == "garbage":
        return rng.bytes(int(rng.integers(0, 300)))
    return buf.getvalue()


@settings(max_examples=60, deadline=None)
@given(kind=st.sampled_from(["rgb", "cmyk", "gray", "png16", "png_as_jpg", "garbage"]),
       w=st.integers(1, 96), h=st.integers(1, 96), cut=st.one_of(st.none(), st.floats(0, 0.95)),
       seed=st.integers(0, 1000), limit=st.sampled_from([10**8, 2000]))
def test_image_loader_never_crashes_and_keeps_valid_images(kind, w, h, cut, seed, limit):
    rng = np.random.default_rng(seed)
    data = _image_bytes(kind, w, h, rng)
    if cut is not None:
        data = data[: int(cut * len(data))]
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "x.jpg").write_bytes(data)
        os.symlink("/etc/hostname", Path(tmp, "link.jpg"))
        r = check_image(tmp, 1, "x.jpg", limit)
        assert check_image(tmp, 2, "link.jpg", limit).reason == Reason.IMAGE_OUTSIDE_ROOT
        assert check_image(tmp, 3, "../x.jpg", limit).reason == Reason.IMAGE_OUTSIDE_ROOT
    assert isinstance(r, (ImageInfo, ImageProblem))
    if kind != "garbage" and cut is None:
        if w * h > limit:
            assert r.reason == Reason.IMAGE_TOO_LARGE
        else:
            assert isinstance(r, ImageInfo) and (r.width, r.height) == (w, h)
    if isinstance(r, ImageProblem):
        assert r.reason in {Reason.IMAGE_UNREADABLE, Reason.IMAGE_TOO_LARGE} and r.detail


def test_decompression_bomb_is_refused_without_decoding(tmp_path):
    # A tiny PNG that claims 20000 x 20000 pixels: refused from its header.
    Image.new("1", (20000, 20000)).save(tmp_path / "bomb.png", optimize=True)
    assert (tmp_path / "bomb.png").stat().st_size < 200_000
    r = check_image(str(tmp_path), 1, "bomb.png", 50_000_000)
    assert r.reason == Reason.IMAGE_TOO_LARGE


# Runs in a fresh process: the real ingest flow (on this session's Prefect server) over an image
# folder holding a sparse 4 GB file and a FIFO, while a thread samples the process's RSS.
_INGEST_UNDER_WATCH = """
import json, sys, threading, time
import psutil
from flows.ingest import ingest_flow
from schemas.ingest import IngestConfig
from ingest.images import check_image

args = json.loads(sys.argv[1])
t0 = time.perf_counter()
fifo = check_image(args["config"]["images"], 0, args["fifo"], 50_000_000)
fifo_seconds = time.perf_counter() - t0
proc = psutil.Process()

def watched(config):
    base = proc.memory_info().rss
    peak, done = [base], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.002)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    result = ingest_flow(IngestConfig(**config))
    done.set()
    watcher.join()
    return result, peak[0] - base

# First the clean input: what a first flow run costs (imports, clients, caches) is not the input's.
_, warm_up = watched(args["warm_up"])
result, growth = watched(args["config"])
print("RESULT " + json.dumps({"fifo_reason": str(fifo.reason), "fifo_seconds": fifo_seconds,
                              "rss_growth": growth, "warm_up_growth": warm_up, "counts": result.counts}))
"""


def test_sparse_4gb_image_and_fifo_are_quarantined_unread(tmp_path, demo_dir):
    from prefect.settings import PREFECT_API_URL

    from storage.lance import connect, read

    demo = tmp_path / "demo"
    shutil.copytree(demo_dir, demo)
    images = demo / "images" / "train2014"
    ids = [
        d["image_id"] for d in json.loads((demo / "visdial_1.0_train.json").read_text())["data"]["dialogs"]
    ]
    sparse, fifo = (images / f"COCO_train2014_{i:012d}.jpg" for i in ids[:2])
    sparse.unlink()
    with open(sparse, "wb") as f:
        f.truncate(4 * 2**30)  # 4 GB claimed, no block written: reading it would fill RSS with zeros
    fifo.unlink()
    os.mkfifo(fifo)  # opening it for reading without O_NONBLOCK would wait for a writer for ever
    root = tmp_path / "root"
    config = {"data_root": str(root), "visdial": str(demo / "visdial_1.0_train.json"), "images": str(images),
              "coco": str(demo / "captions_train2014.json"), "workers": 1}  # one process: the one measured
    warm_up = {
        **config,
        "data_root": str(tmp_path / "warm"),
        "images": str(demo_dir / "images" / "train2014"),
    }
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    args = json.dumps({"config": config, "warm_up": warm_up, "fifo": fifo.name})
    # A hang (the old behaviour on a FIFO) fails here instead of holding CI.
    done = subprocess.run([sys.executable, "-c", _INGEST_UNDER_WATCH, args],
                          capture_output=True, text=True, timeout=240, env=env, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.split("RESULT ", 1)[1])
    print(f"sparse 4 GB + FIFO ingest: RSS growth {got['rss_growth'] / 2**20:.1f} MiB "
          f"(first, clean run: {got['warm_up_growth'] / 2**20:.1f} MiB); "
          f"FIFO checked in {got['fifo_seconds'] * 1000:.2f} ms")
    assert got["fifo_reason"] == Reason.IMAGE_NOT_A_FILE and got["fifo_seconds"] < 1.0
    assert got["rss_growth"] < 100 * 2**20, got
    assert got["counts"]["dialogs_kept"] == len(ids) - 2, got
    q = {r["key"]: r for r in read(connect(root / "lance"), "quarantine").to_pylist()}
    assert {k: r["reason"] for k, r in q.items()} == {str(ids[0]): "image_file_too_large",
                                                      str(ids[1]): "image_not_a_file"}
    assert (
        "4294967296 bytes > 50000000 bytes" in q[str(ids[0])]["detail"]
        and "a FIFO" in q[str(ids[1])]["detail"]
    )
    assert sparse.stat().st_blocks == 0  # still sparse: nothing wrote to it either
