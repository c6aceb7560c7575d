"""Images decoded by the GPU that runs the model: nvJPEG (``torchvision.io.decode_jpeg`` on CUDA,
batched; on A100/H100 its hardware JPEG engines) with the resize and crop on the same device, in the
process that feeds the model. PIL on the CPU stays the fallback.

Decoding photos is CPU work; on a machine with a few cores per GPU it, not the model, bounds the
image stream. With ``image_decode="gpu"`` the decoding workers only read files and look at their
headers (:func:`read_jpegs`): whole baseline RGB or greyscale JPEGs come back as bytes; anything
else (progressive scans, PNG, CMYK, a file cut short) is decoded there by ImageBind's CPU path. A
thread of the feeding process decodes many jobs' JPEGs in one nvJPEG call on a CUDA stream of its
own (:func:`decode_on_device`), so the decode overlaps the forwards on the model's stream. One CUDA
context does it all: nvJPEG in every worker process (a context each) slowed the model it shares the
GPU with (``benchmarks/results/h100-2026-12-07c``). A file nvJPEG refuses takes the CPU path, so
every file embeds as before or is quarantined as before.

The transform is ImageBind's: the short side to 224 with antialiased bicubic (torchvision's tensor
resize follows PIL's filter), centre crop 224, uint8. Decoders differ in their IDCT and chroma
upsampling, so pixels match the CPU path within a few levels, not bit for bit;
``tests/test_embed_jpeg.py`` pins the tolerance (libjpeg through torchvision here, nvJPEG on a GPU).
"""

from __future__ import annotations

import contextlib
import io
import queue
import threading
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from embed.preprocess import IMAGE_SIZE, load_pixels

JPEG_MODES = ("RGB", "L")  # what nvJPEG decodes to RGB as PIL does; CMYK/YCCK and the rest stay on the CPU
DEVICE_BATCH = 256  # JPEGs per nvJPEG call: the hardware decoder works a batch at a time
PREFETCH = 4  # decoded jobs held ahead of the model (device memory: ~150 KiB each image)

# position in the job, path, and the JPEG's bytes (the device decodes them) or the CPU path's pixels
Entry = tuple[int, str, bytes | np.ndarray]
Failure = tuple[int, str, str]  # position in the job, "missing" | "unreadable" | "outside", detail
Job = tuple[list[Entry], list[Failure]]


def read_jpegs(paths: Sequence[str | None]) -> Job:
    """Per file, its bytes if it is a JPEG the device decodes, else its pixels from ImageBind's CPU
    path; and the failures by position (``None`` is a path that left its root). Runs in decoding
    worker processes: for a JPEG, reading and a header parse, no pixel decoding."""
    entries: list[Entry] = []
    failed: list[Failure] = []
    for i, path in enumerate(paths):
        if path is None:
            failed.append((i, "outside", "path resolves outside the image root"))
            continue
        try:
            with open(path, "rb") as fh:
                data = fh.read()
            entries.append((i, path, data if _gpu_decodable(data) else load_pixels(io.BytesIO(data))))
        except FileNotFoundError:
            failed.append((i, "missing", "no such file at embed time"))
        except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad data; each is one failure
            failed.append((i, "unreadable", f"{type(exc).__name__}: {exc}"))
    return entries, failed


def _gpu_decodable(data: bytes) -> bool:
    # a file cut short (no end-of-image marker) goes to PIL, which refuses it; nvJPEG's hardware
    # decoder would return the part it has
    if data[:2] != b"\xff\xd8" or data.rstrip(b"\0")[-2:] != b"\xff\xd9":
        return False
    try:
        with Image.open(io.BytesIO(data)) as im:  # the header only
            # progressive scans: nvJPEG's hardware engines refuse them, and its one-at-a-time
            # software path in this process starved the model (h100-2026-12-08): PIL decodes them
            return im.format == "JPEG" and im.mode in JPEG_MODES and not im.info.get("progressive")
    except Exception:  # noqa: BLE001 - a header PIL cannot read: the CPU path decides
        return False


def resize_crop(image: torch.Tensor) -> torch.Tensor:
    """(3, H, W) uint8 -> (224, 224, 3) uint8 on the image's device: ImageBind's resize + centre crop."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as F

    out = F.resize(image, IMAGE_SIZE, interpolation=InterpolationMode.BICUBIC, antialias=True)
    return F.center_crop(out, IMAGE_SIZE).permute(1, 2, 0)


def _decode_jpegs(blobs: list[bytes], device: torch.device) -> list[torch.Tensor | None]:
    """Decoded (3, H, W) uint8 images on ``device``, ``None`` where the decoder refuses one."""
    from torchvision.io import ImageReadMode, decode_jpeg

    data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
    try:
        return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
    except Exception:  # noqa: BLE001 - one bad file fails the batch: find it
        out: list[torch.Tensor | None] = []
        for x in data:
            try:
                out.append(decode_jpeg(x, mode=ImageReadMode.RGB, device=device))
            except Exception:  # noqa: BLE001 - the CPU path decodes it or says why not
                out.append(None)
        return out


def decode_jobs(jobs: Sequence[Job], device: torch.device | str) -> list[tuple[torch.Tensor, list[Failure]]]:
    """Per job, its (n, 224, 224, 3) uint8 pixels on ``device`` in order, and its failures: the JPEG
    bytes of every job decoded in one call, the CPU path's pixels copied over, and a JPEG the device
    refuses decoded by the CPU path (or, failing that, one ``unreadable`` failure)."""
    device = torch.device(device)
    blobs = [e[2] for entries, _ in jobs for e in entries if isinstance(e[2], bytes)]
    decoded = iter(_decode_jpegs(blobs, device) if blobs else [])
    out = []
    for entries, failed in jobs:
        failed = list(failed)
        pixels = []
        for pos, path, data in entries:
            image = next(decoded) if isinstance(data, bytes) else None
            if image is not None:
                pixels.append(resize_crop(image))
                continue
            try:
                px = data if isinstance(data, np.ndarray) else load_pixels(path)
            except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad data; each is one failure
                failed.append((pos, "unreadable", f"{type(exc).__name__}: {exc}"))
                continue
            pixels.append(torch.tensor(px, device=device))
        stacked = (torch.stack(pixels) if pixels
                   else torch.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=torch.uint8, device=device))
        out.append((stacked, sorted(failed)))
    return out


def decode_on_device(jobs: Iterable[Job], device: torch.device | str, batch: int = DEVICE_BATCH,
                     ahead: int = PREFETCH) -> Iterator[tuple[torch.Tensor, list[Failure]]]:
    """:func:`decode_jobs` over a stream of jobs (the workers' :func:`read_jpegs`), in order, in a
    thread that stays up to ``ahead`` jobs ahead. On CUDA it decodes on a stream of its own and hands
    over only finished pixels, marked as used by the model's stream (so their memory is not reused
    before the model has read them)."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    done: queue.Queue = queue.Queue(maxsize=max(1, ahead))
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            with contextlib.suppress(queue.Full):
                done.put(item, timeout=0.1)
                return True
        return False

    def work() -> None:
        stream = torch.cuda.Stream(device) if cuda else None
        try:
            with torch.cuda.stream(stream) if cuda else contextlib.nullcontext():
                for group in _groups(jobs, batch):
                    results = decode_jobs(group, device)
                    if cuda:
                        stream.synchronize()
                        for pixels, _ in results:
                            pixels.record_stream(torch.cuda.default_stream(device))
                    if not all(put(r) for r in results):
                        return
            put(None)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer
            put(exc)

    thread = threading.Thread(target=work, name="embed-device-decode", daemon=True)
    thread.start()
    try:
        while (item := done.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


def _groups(jobs: Iterable[Job], batch: int) -> Iterator[list[Job]]:
    """Consecutive jobs holding about ``batch`` JPEGs together."""
    group: list[Job] = []
    have = 0
    for job in jobs:
        group.append(job)
        have += len(job[0])
        if have >= batch:
            yield group
            group, have = [], 0
    if group:
        yield group
