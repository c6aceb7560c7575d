"""Images decoded by nvJPEG (``torchvision.io.decode_jpeg`` on CUDA, a batch per call) with the
resize and crop on the same device, and PIL on the CPU as the fallback.

Decoding and resizing photos is CPU work; on a machine with few cores per GPU it, not the model,
bounds the image stream. With ``image_decode="gpu"`` each decoding worker process reads its files,
looks at their headers, and decodes them on the GPU (:func:`decode_files`): one nvJPEG handle per
process, so the workers decode in parallel (torchvision serialises the calls of one process), and
the CPU does at most nvJPEG's entropy decoding. Baseline and progressive RGB or greyscale JPEGs go to
the GPU, anything else (PNG, CMYK, a file nvJPEG refuses) takes ImageBind's CPU path
(:func:`embed.preprocess.load_pixels`), so every file embeds as before or is quarantined as before.

The transform is ImageBind's: the short side to 224 with antialiased bicubic (torchvision's tensor
resize follows PIL's filter), centre crop 224, uint8. Decoders differ in their IDCT and chroma
upsampling, so pixels match the CPU path within a few levels, not bit for bit;
``tests/test_embed.py`` pins the tolerance (CPU decode here, nvJPEG on a GPU machine).
"""

from __future__ import annotations

import io
import threading
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from embed.preprocess import IMAGE_SIZE, load_pixels

_DECODE_LOCK = threading.Lock()
JPEG_MODES = ("RGB", "L")  # what nvJPEG decodes to RGB as PIL does; CMYK/YCCK and the rest stay on the CPU


Entry = tuple[int, str, bytes | None]  # position in the job, path, JPEG bytes for the device (None: CPU path)


def read_jpegs(paths: Sequence[str | None]) -> tuple[list[Entry], list[tuple[int, str, str]]]:
    """Per file, its bytes if it is a JPEG the device decoder takes (else ``None``: decode on the
    CPU), and ``(position, "missing" | "outside", detail)`` of paths with no file. Runs in worker
    processes: reading and a header parse, no pixel decoding."""
    entries: list[Entry] = []
    failed = []
    for i, path in enumerate(paths):
        if path is None:
            failed.append((i, "outside", "path resolves outside the image root"))
            continue
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except FileNotFoundError:
            failed.append((i, "missing", "no such file at embed time"))
            continue
        except OSError:
            entries.append((i, path, None))  # the CPU path reports it
            continue
        entries.append((i, path, data if _gpu_decodable(data) else None))
    return entries, failed


def _gpu_decodable(data: bytes) -> bool:
    if data[:2] != b"\xff\xd8":
        return False
    try:
        with Image.open(io.BytesIO(data)) as im:  # the header only
            return im.format == "JPEG" and im.mode in JPEG_MODES
    except Exception:  # noqa: BLE001 - a header PIL cannot read: the CPU path decides
        return False


def _decode_one(data: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except Exception:  # noqa: BLE001 - the CPU path decodes it or says why not
        return None


def resize_crop(image: torch.Tensor) -> torch.Tensor:
    """(3, H, W) uint8 -> (224, 224, 3) uint8 on the image's device: ImageBind's resize + centre crop."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as F

    out = F.resize(image, IMAGE_SIZE, interpolation=InterpolationMode.BICUBIC, antialias=True)
    return F.center_crop(out, IMAGE_SIZE).permute(1, 2, 0)


def decode_pixels(entries: Sequence[Entry], device: torch.device | str
                  ) -> tuple[torch.Tensor, list[tuple[int, str, str]]]:
    """(n, 224, 224, 3) uint8 on ``device`` for the entries that decode, in order, and
    ``(position, "unreadable", detail)`` of the rest. Entries with bytes go to the device decoder
    (a batch it refuses is retried one by one), the others and its refusals to the CPU path."""
    from torchvision.io import ImageReadMode, decode_jpeg

    device = torch.device(device)
    blobs = [b for _, _, b in entries]
    out: list[torch.Tensor | None] = [None] * len(blobs)
    failed = []
    gpu = [i for i, b in enumerate(blobs) if b is not None]
    if gpu:
        data = [torch.frombuffer(bytearray(blobs[i]), dtype=torch.uint8) for i in gpu]
        with _DECODE_LOCK:  # shards' threads share the process's one decoder handle
            try:
                images = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
            except Exception:  # noqa: BLE001 - one bad file fails the batch: find it
                images = [_decode_one(x, device) for x in data]
        for i, image in zip(gpu, images, strict=True):
            out[i] = None if image is None else resize_crop(image)
    for i in range(len(blobs)):
        if out[i] is None:
            try:
                out[i] = torch.from_numpy(np.array(load_pixels(entries[i][1]))).to(device)
            except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad data; each is one failure
                failed.append((entries[i][0], "unreadable", f"{type(exc).__name__}: {exc}"))
    kept = [t for t in out if t is not None]
    pixels = torch.stack(kept) if kept else torch.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=torch.uint8,
                                                        device=device)
    return pixels, failed


def decode_files(device: str, paths: Sequence[str | None]) -> tuple[np.ndarray, list[tuple[int, str, str]]]:
    """:func:`embed.preprocess.load_pixels_many` with the decoding on ``device``: the pixels
    (n, 224, 224, 3) uint8 on the host, and the failures by position. Runs in decoding workers."""
    entries, failed = read_jpegs(paths)
    pixels, bad = decode_pixels(entries, device)
    return pixels.cpu().numpy(), sorted(failed + bad)
