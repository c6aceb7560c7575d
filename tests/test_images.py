"""Image checks: every unusable image gets a reason; odd-but-valid images are kept."""

from __future__ import annotations

import numpy as np
from PIL import Image

from ingest.images import ImageInfo, check_image, check_images, index_image_folder
from schemas.quarantine import Reason


def _jpeg(path, size=(64, 48), mode="RGB"):
    arr = (np.random.default_rng(0).random((size[1], size[0], 3)) * 255).astype(np.uint8)
    img = Image.fromarray(arr).convert(mode)
    img.save(path, "JPEG" if mode in ("RGB", "L", "CMYK") else "PNG")
    return path


def test_reasons_for_each_kind_of_bad_image(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    _jpeg(root / "COCO_x_000000000001.jpg")
    full = (root / "COCO_x_000000000002.jpg")
    _jpeg(full, size=(300, 200))
    data = full.read_bytes()
    full.write_bytes(data[: len(data) // 2])  # truncated
    (root / "COCO_x_000000000003.jpg").write_bytes(b"")  # zero bytes
    outside = _jpeg(tmp_path / "outside.jpg")
    (root / "COCO_x_000000000004.jpg").symlink_to(outside)  # symlink leaving the root
    _jpeg(root / "COCO_x_000000000005.jpg", size=(400, 400))  # too many pixels for the limit below
    png_named_jpg = root / "COCO_x_000000000006.jpg"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(png_named_jpg, "PNG")
    _jpeg(root / "COCO_x_000000000007.jpg", mode="CMYK")
    _jpeg(root / "COCO_x_000000000008.jpg", mode="L")
    Image.fromarray(np.full((8, 8), 40000, np.uint16)).save(root / "COCO_x_000000000009.png")  # 16-bit

    where = index_image_folder(root)
    assert sorted(where) == list(range(1, 10))
    items = sorted(where.items()) + [(10, "../outside.jpg"), (11, "COCO_x_000000000011.jpg")]
    results = {r.image_id: r for r in check_images(root, items, max_pixels=100_000)}
    reasons = {i: (None if isinstance(r, ImageInfo) else r.reason) for i, r in results.items()}
    assert reasons == {
        1: None, 2: Reason.IMAGE_UNREADABLE, 3: Reason.IMAGE_UNREADABLE, 4: Reason.IMAGE_OUTSIDE_ROOT,
        5: Reason.IMAGE_TOO_LARGE, 6: None, 7: None, 8: None, 9: None, 10: Reason.IMAGE_OUTSIDE_ROOT,
        11: Reason.IMAGE_MISSING,
    }
    assert results[7].mode == "CMYK" and results[8].mode == "L"
    assert (results[1].width, results[1].height) == (64, 48)


def test_hash_is_of_content_and_process_pool_matches_serial(tmp_path):
    for i in range(6):
        _jpeg(tmp_path / f"COCO_x_{i:012d}.jpg", size=(32 + i, 32))
    items = sorted(index_image_folder(tmp_path).items())
    serial = check_images(tmp_path, items, workers=1)
    pooled = check_images(tmp_path, items, workers=2, chunk=2)
    assert serial == pooled
    one = check_image(str(tmp_path), 0, items[0][1], 10**8)
    import hashlib

    assert one.sha256 == hashlib.sha256((tmp_path / items[0][1]).read_bytes()).hexdigest()


def test_only_regular_files_within_the_byte_limit_are_read(tmp_path):
    import os

    from ingest.images import read_bounded

    root = tmp_path / "imgs"
    root.mkdir()
    exact = _jpeg(root / "COCO_x_000000000001.jpg")
    limit = exact.stat().st_size
    _jpeg(root / "COCO_x_000000000002.jpg", size=(300, 200))  # more bytes than ``limit``
    (root / "COCO_x_000000000003.jpg").mkdir()  # a folder with an image's name
    os.mkfifo(root / "COCO_x_000000000004.jpg")  # a reader of a FIFO without a writer would block for ever
    with open(root / "COCO_x_000000000005.jpg", "wb") as f:
        f.truncate(2**40)  # sparse: a terabyte claimed, no block written
    items = sorted(index_image_folder(root).items()) + [(6, "COCO_x_\0.jpg"), (7, 7)]
    results = {r.image_id: r for r in check_images(root, items, max_pixels=10**8, max_bytes=limit)}
    reasons = {i: (None if isinstance(r, ImageInfo) else r.reason) for i, r in results.items()}
    assert reasons == {
        1: None,
        2: Reason.IMAGE_FILE_TOO_LARGE,
        3: Reason.IMAGE_NOT_A_FILE,
        4: Reason.IMAGE_NOT_A_FILE,
        5: Reason.IMAGE_FILE_TOO_LARGE,
        6: Reason.BAD_RECORD,
        7: Reason.BAD_RECORD,
    }
    assert results[1].num_bytes == limit
    assert "a FIFO" in results[4].detail and "a folder" in results[3].detail
    assert f"{2**40} bytes > {limit} bytes" in results[5].detail
    assert "NUL" in results[6].detail or "null" in results[6].detail

    # A name that became a symlink after it was resolved is not followed (opened with O_NOFOLLOW).
    (root / "swapped.jpg").symlink_to(exact)
    assert read_bounded(root / "swapped.jpg", limit) == (
        Reason.IMAGE_OUTSIDE_ROOT,
        "became a symlink while checked",
    )
    assert read_bounded(exact, limit) == exact.read_bytes()
    assert read_bounded(exact, limit - 1)[0] == Reason.IMAGE_FILE_TOO_LARGE


def test_coco_file_names_rejects_bad_entries_and_keeps_the_rest(tmp_path):
    import json

    from ingest.images import coco_file_names

    images = [
        {"id": 1, "file_name": "a.jpg"},
        {"id": 2, "file_name": "b\0.jpg"},
        {"id": 3, "file_name": 3},
        {"id": 4, "file_name": None},
        {"id": "5", "file_name": "e.jpg"},
        {"id": True, "file_name": "f.jpg"},
        "not an object",
        {"id": 8, "file_name": ""},
        {"id": 9, "file_name": "../i.jpg"},
    ]
    p = tmp_path / "captions.json"
    p.write_text(json.dumps({"images": images, "annotations": [{"broken": True}]}))
    names, rejections = coco_file_names(p)
    assert names == {1: "a.jpg", 9: "../i.jpg"}  # leaving the root is the image check's to quarantine
    got = {r.key: r.detail for r in rejections}
    assert set(got) == {"2", "3", "4", "images[4]", "images[5]", "images[6]", "8"}
    assert all(r.reason == Reason.BAD_RECORD and r.detail.startswith(f"{p}: images[") for r in rejections)
    assert "images[1].file_name" in got["2"] and "NUL" in got["2"]
    assert "images[2].file_name is 3, not a string" in got["3"] and "images[4].id is '5'" in got["images[4]"]
    assert json.loads(rejections[0].record_json()) == images[1]  # the source record, NUL and all


def test_broken_coco_file_is_a_clear_error_naming_file_and_position(tmp_path):
    import json

    import pytest

    from ingest.images import CocoFormatError, coco_file_names
    from ingest.visdial import VisdialFormatError

    raw = json.dumps({"images": [{"id": i, "file_name": f"{i}.jpg"} for i in range(50)]}).encode()
    p = tmp_path / "captions.json"
    for content, fragment in [(raw[: len(raw) // 2], "invalid JSON at line 1, column"), (raw[:1], "line 1"),
                              (b"", "char 0"), (b'{"images": "\xff"}', "not UTF-8 at byte 12"),
                              (b"[1, 2]", 'no "images" list'), (b'{"images": {}}', 'no "images" list')]:
        p.write_bytes(content)
        with pytest.raises(CocoFormatError) as err:
            coco_file_names(p)
        assert str(p) in str(err.value) and fragment in str(err.value), (content, str(err.value))
        # the CLI reports it as it reports a bad VisDial file
        assert isinstance(err.value, VisdialFormatError)
    with pytest.raises(CocoFormatError, match="cannot read: No such file"):
        coco_file_names(tmp_path / "nope.json")
