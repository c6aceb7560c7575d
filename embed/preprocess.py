"""ImageBind's preprocessing, split so that the CPU-bound half runs in worker processes.

Images: resize the short side to 224 (bicubic), centre-crop 224, scale to [0, 1], CLIP mean/std.
:func:`image_to_pixels` does the decode/resize/crop (-> 224x224x3 uint8) in a worker;
:func:`normalise_pixels` the normalisation on the model's device, with the same float operations
as ``ToTensor`` + ``Normalize``. Texts: ImageBind's BPE tokenizer, 77 tokens, each batch run only
as wide as its longest text (:func:`token_batches`). ``tests/test_embed.py`` pins both halves
against ``imagebind.data``.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from functools import lru_cache
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image

from embed.bpe import encode, fast_safe, fast_tokenizer
from embed.compat import import_imagebind

# Bump when anything below changes what a given input embeds to (it is part of every cache key).
PREPROCESS_VERSION = "ib1-bicubic224-crop224-clipnorm-bpe77"

IMAGE_SIZE = 224
CONTEXT_LENGTH = 77
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@lru_cache(maxsize=1)
def _vision_resize_crop():
    from torchvision import transforms

    return transforms.Compose([
        transforms.Resize(IMAGE_SIZE, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(IMAGE_SIZE),
    ])


def image_to_pixels(image: Image.Image) -> np.ndarray:
    """The CPU half of ImageBind's vision transform: RGB, resize 224 bicubic, centre crop -> HxWx3 uint8."""
    rgb = image if image.mode == "RGB" else image.convert("RGB")  # convert() of RGB is only a copy
    return np.asarray(_vision_resize_crop()(rgb), dtype=np.uint8)


def load_pixels(source: str | os.PathLike | BinaryIO) -> np.ndarray:
    """Decode one image (a file, or its bytes already read) fully and preprocess it; raises on
    unreadable data (caller quarantines)."""
    with Image.open(source) as image:
        image.load()
        return image_to_pixels(image)


def load_pixels_many(paths: Sequence[str | None]) -> tuple[np.ndarray, list[tuple[int, str, str]]]:
    """Pixels of the files that decode, and ``(position, "missing" | "unreadable" | "outside", detail)``
    of the rest (``None`` is a path that left its root). Runs in decoding worker processes."""
    pixels, failed = [], []
    for i, path in enumerate(paths):
        if path is None:
            failed.append((i, "outside", "path resolves outside the image root"))
            continue
        try:
            pixels.append(load_pixels(path))
        except FileNotFoundError:
            failed.append((i, "missing", "no such file at embed time"))
        except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad data; each is one failure
            failed.append((i, "unreadable", f"{type(exc).__name__}: {exc}"))
    arr = np.stack(pixels) if pixels else np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    return arr, failed


@lru_cache(maxsize=8)
def _clip_stats(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # made once per device: a fresh host->device copy per batch would wait for the queued batches
    return (torch.tensor(CLIP_MEAN, device=device).view(1, 3, 1, 1),
            torch.tensor(CLIP_STD, device=device).view(1, 3, 1, 1))


def normalise_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """The device half: (n, 224, 224, 3) uint8 -> (n, 3, 224, 224) float32, as ToTensor + Normalize do."""
    x = pixels.permute(0, 3, 1, 2).float().div(255)
    mean, std = _clip_stats(x.device)
    return x.sub_(mean).div_(std)


def warm_images() -> None:
    """Load what a decoding worker process needs before its first image (the transforms)."""
    _vision_resize_crop()


def warm_texts() -> None:
    """Load both tokenizers (imports ImageBind, reads its BPE vocabulary) before the first text shard."""
    tokenizer()
    fast_tokenizer(bpe_path())


_TOKENIZER_LOCK = threading.Lock()


@lru_cache(maxsize=1)
def tokenizer():
    """ImageBind's BPE tokenizer with its bundled vocabulary (one per process; it caches BPE merges)."""
    import_imagebind()
    from imagebind.models.multimodal_preprocessors import SimpleTokenizer

    return SimpleTokenizer(bpe_path=bpe_path(), context_length=CONTEXT_LENGTH)


def tokenize(texts: Sequence[str]) -> np.ndarray:
    """(n, 77) int32 token ids, exactly as ``imagebind.data.load_and_transform_text`` makes them: the
    Rust rebuild of its tokenizer (:mod:`embed.bpe`) for the texts it provably matches, ImageBind's
    own for the rest."""
    out = np.zeros((len(texts), CONTEXT_LENGTH), dtype=np.int32)
    if not texts:
        return out
    fast = np.fromiter((fast_safe(t) for t in texts), bool, len(texts))
    if fast.any():
        out[fast] = encode(bpe_path(), [t for t, f in zip(texts, fast, strict=True) if f], CONTEXT_LENGTH)
    if not fast.all():
        slow = [t for t, f in zip(texts, fast, strict=True) if not f]
        out[~fast] = python_tokenize(slow)
    return out


def python_tokenize(texts: Sequence[str]) -> np.ndarray:
    """ImageBind's own (Python) tokenizer: (n, 77) int32."""
    tok = tokenizer()
    with _TOKENIZER_LOCK:  # its BPE cache is a plain dict shared by the threads of a worker
        ids = tok(list(texts))
    return ids.reshape(len(texts), CONTEXT_LENGTH).numpy().astype(np.int32)


@lru_cache(maxsize=1)
def bpe_path() -> str:
    """The BPE vocabulary file ImageBind ships."""
    return import_imagebind().data.return_bpe_path()


def token_widths(tokens: np.ndarray | torch.Tensor) -> np.ndarray:
    """Per row, the positions the text tower must run: up to its end-of-text token (the highest
    id, where ImageBind's head reads; the same ``argmax`` the model takes), inclusive."""
    return np.asarray(tokens).argmax(axis=1) + 1


def padded_width(longest: int, multiple: int = 8) -> int:
    """``longest`` rounded up to ``multiple`` (tensor-core friendly shapes), at most 77."""
    return min(CONTEXT_LENGTH, -(-int(longest) // multiple) * multiple)


def length_order(tokens: np.ndarray) -> np.ndarray:
    """The order that sorts texts by token length (stable): batches of similar widths."""
    return np.argsort(token_widths(tokens), kind="stable")


def token_batches(chunks: Iterable[np.ndarray | torch.Tensor], budget: int,
                  multiple: int = 8) -> Iterator[np.ndarray]:
    """Token-id chunks re-cut into batches of at most ``budget`` token positions, each cut to its
    longest text (rounded up to ``multiple``): a batch of short texts holds more rows. Exact
    whatever the order (the width covers every row's end-of-text); sorted input wastes least."""

    pending = None
    for chunk in chunks:
        rows = np.asarray(chunk) if pending is None else np.concatenate([pending, np.asarray(chunk)])
        pending = yield from _cut(rows, budget, multiple, final=False)
    if pending is not None:
        yield from _cut(pending, budget, multiple, final=True)


def _cut(rows: np.ndarray, budget: int, multiple: int, final: bool):
    """Yield full batches from the front of ``rows``; return what is left for the next chunk (nothing
    if ``final``)."""
    while len(rows):
        longest = np.maximum.accumulate(token_widths(rows))
        widths = np.minimum(-(-longest // multiple) * multiple, CONTEXT_LENGTH)
        # a prefix: the product only grows
        fit = max(1, int((np.arange(1, len(rows) + 1) * widths <= budget).sum()))
        if fit == len(rows) and not final:
            return rows  # more rows may still join this batch
        yield rows[:fit, : widths[fit - 1]]
        rows = rows[fit:]
    return rows
