"""The GPU image decoder (:mod:`embed.jpeg`) against ImageBind's CPU path: same pixels within a
few levels, the same failures, jobs in order."""

import threading

import numpy as np
import pytest
import torch
from PIL import Image

from embed.preprocess import load_pixels


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_device_jpeg_decode_matches_the_cpu_path(tmp_path, device):
    """embed.jpeg (nvJPEG on CUDA; libjpeg through torchvision on CPU) + resize/crop on the device:
    within a few levels of ImageBind's PIL path on photo-like and flat JPEGs; greyscale on the device
    too; CMYK and PNG take the CPU path exactly; truncated, missing and outside files fail as before;
    the prefetching decoder keeps jobs in order and their failures with them."""
    from embed.jpeg import decode_jobs, decode_on_device, read_jpegs
    from ingest.demo_data import write_split

    photos = sorted(write_split(tmp_path / "p", "train", 6, seed=0, photos=True)["images"].iterdir())
    flat = sorted(write_split(tmp_path / "f", "train", 3, seed=0)["images"].iterdir())
    baseline = []
    for i, p in enumerate(photos[:3]):  # the demo photos are progressive; these, baseline as COCO's
        with Image.open(p) as im:
            im.save(tmp_path / f"base{i}.jpg", quality=92)
        baseline.append(tmp_path / f"base{i}.jpg")
    with Image.open(photos[0]) as im:
        im.convert("L").save(tmp_path / "grey.jpg", quality=90)
        im.convert("CMYK").save(tmp_path / "cmyk.jpg")
        im.save(tmp_path / "png.jpg", "PNG")  # a PNG named .jpg
    (tmp_path / "cut.jpg").write_bytes(baseline[1].read_bytes()[:20_000])
    decodable = [str(p) for p in photos + baseline + flat]
    decodable += [str(tmp_path / n) for n in ("grey.jpg", "cmyk.jpg", "png.jpg")]
    paths = decodable + [str(tmp_path / "cut.jpg"), str(tmp_path / "gone.jpg"), None]

    job = read_jpegs(paths)  # what a decoding worker returns
    # baseline photos, flat scenes and grey to the device; progressive photos, CMYK, PNG decoded by the
    # worker; the cut file refused there (no end marker)
    on_device = [isinstance(e[2], bytes) for e in job[0]]
    assert on_device == [False] * len(photos) + [True] * (len(baseline) + len(flat) + 1) + [False, False]
    [(pixels, failed)] = decode_jobs([job], device)
    n = len(paths)
    assert [(pos, kind) for pos, kind, _ in failed] == [(n - 3, "unreadable"), (n - 2, "missing"),
                                                        (n - 1, "outside")]
    assert pixels.shape == (len(decodable), 224, 224, 3) and pixels.dtype == torch.uint8
    assert pixels.device.type == device
    pixels = pixels.cpu().numpy()
    want = np.stack([load_pixels(p) for p in decodable]).astype(int)
    diff = np.abs(pixels.astype(int) - want)
    # edges of flat scenes ring a level more than photos; nvJPEG's IDCT and chroma upsampling add a little
    assert diff.max() <= (4 if device == "cpu" else 12) and diff.mean() < (0.5 if device == "cpu" else 1.5), (
        diff.max(), diff.mean())
    assert diff[-2:].max() == 0 and diff[:len(photos)].max() == 0  # CMYK, PNG, progressive: the CPU path

    # a stream of jobs, decoded several to a device call, comes back job by job in order
    jobs = [read_jpegs(paths[i:i + 4]) for i in range(0, n, 4)]
    streamed = list(decode_on_device(iter(jobs), device, batch=6, ahead=1))
    assert [f for _, f in streamed] == [decode_jobs([j], device)[0][1] for j in jobs]
    np.testing.assert_array_equal(torch.cat([p for p, _ in streamed]).cpu().numpy(), pixels)

    def broken():
        yield jobs[0]
        raise OSError("a worker died")

    with pytest.raises(OSError, match="a worker died"):
        list(decode_on_device(broken(), device))
    # a consumer that stops early (a failed shard) leaves no decoding thread behind
    stream = decode_on_device(iter(jobs), device, batch=1, ahead=1)
    next(stream)
    stream.close()
    assert not [t for t in threading.enumerate() if t.name == "embed-device-decode"]
