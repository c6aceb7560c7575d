"""ImageBind behind one small interface: load a model, embed texts and images.

The model code is Meta's ``ImageBindModel`` from the ``imagebind-unofficial`` package
(:mod:`embed.weights` builds it and names its weights, :mod:`embed.preprocess` prepares its
inputs, :mod:`embed.attention` rewrites its trunks batch-first). An :class:`Embedder` streams
host chunks through the model, re-batched, and hands back L2-normalised float32 vectors.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from embed.attention import make_batch_first
from embed.device import resolve_device
from embed.preprocess import (
    CONTEXT_LENGTH,
    PREPROCESS_VERSION,
    image_to_pixels,
    length_order,
    normalise_pixels,
    padded_width,
    token_batches,
    token_widths,
    tokenize,
)
from embed.weights import (
    build_random,
    fingerprint_of,
    load_checkpoint,
    model_fingerprint,
    resolve_checkpoint,
    weights_digest,
)
from schemas.embed import EMBED_DIM


@dataclass
class Embedder:
    """A loaded ImageBind model: texts and images in, (n, 1024) L2-normalised float32 out."""

    model: torch.nn.Module
    device: torch.device
    dtype: torch.dtype
    fingerprint: str
    batch_size: int = 64
    pad_batches: bool = False  # a compiled model sees one batch shape: pad the last batch, never recompile
    preprocess: str = PREPROCESS_VERSION
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        return self.embed_tokens(tokenize(texts))

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        if not images:
            return self.embed_pixels(np.zeros((0, 224, 224, 3), np.uint8))
        pixels = np.stack([image_to_pixels(im) for im in images])
        return self.embed_pixels(pixels)

    def embed_tokens(self, tokens: np.ndarray | torch.Tensor, stats: StreamStats | None = None) -> np.ndarray:
        """Embed (n, 77) token ids, run in order of length so that batches are narrow; results in input
        order."""
        tokens = np.asarray(tokens)
        order = length_order(tokens)
        out = np.empty((len(tokens), EMBED_DIM), dtype=np.float32)
        out[order] = self.embed_stream("text", [tokens[order]], stats)
        return out

    def embed_pixels(self, pixels: np.ndarray | torch.Tensor) -> np.ndarray:
        return self.embed_stream("vision", [pixels])

    @torch.inference_mode()
    def embed_stream(self, modality: str, chunks: Iterable[np.ndarray | torch.Tensor],
                     stats: StreamStats | None = None) -> np.ndarray:
        """Embed a stream of host chunks (token ids, or uint8 pixels), re-batched to ``batch_size``
        (texts: to ``batch_size`` x 77 token positions, each batch only as wide as its longest text).

        Results stay on the device until the stream ends: on CUDA the host keeps queueing copies
        and kernels while the GPU works (the only sync is the final copy back), and a producer
        (decoding processes) feeding ``chunks`` runs in parallel with both. ``stats`` receives
        where the time went: waiting for the producer, or forwards on the device.
        """
        stats = stats if stats is not None else StreamStats()
        cuda = self.device.type == "cuda"
        outs: list[torch.Tensor] = []
        events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        if modality == "text" and not self.pad_batches:
            batches = token_batches(chunks, self.batch_size * CONTEXT_LENGTH)
        else:
            batches = _rebatch(chunks, self.batch_size)
        while True:
            t0 = time.perf_counter()
            batch = next(batches, None)
            stats.input_wait_s += time.perf_counter() - t0
            if batch is None:
                break
            x = torch.as_tensor(batch)
            n = len(x)
            if self.pad_batches and n < self.batch_size:
                x = torch.cat([x, x[-1:].expand(self.batch_size - n, *x.shape[1:])])
            if modality == "text":
                if self.pad_batches:  # a compiled model: few distinct widths, few recompiles
                    x = x[:, : padded_width(token_widths(x).max(), 16)]
                stats.widths[x.shape[1]] = stats.widths.get(x.shape[1], 0) + len(x)
            if cuda and x.device.type == "cpu":
                x = x.pin_memory()
            x = x.to(self.device, non_blocking=True)
            x = x.long() if modality == "text" else normalise_pixels(x).to(self.dtype)
            t0 = time.perf_counter()
            with self._lock:  # Dask/Prefect worker threads share one model: one forward at a time
                if cuda:  # recorded under the lock: only this forward's kernels lie between the two
                    events.append(tuple(torch.cuda.Event(enable_timing=True) for _ in range(2)))
                    events[-1][0].record()
                y = self.model({modality: x})[modality]
                if cuda:
                    events[-1][1].record()
            stats.forward_s += time.perf_counter() - t0
            stats.samples += n
            # the text head multiplies by a logit scale, and bf16 loses the unit norm: renormalise in fp32
            outs.append(torch.nn.functional.normalize(y[:n].float(), dim=-1))
        if not outs:
            return np.zeros((0, EMBED_DIM), dtype=np.float32)
        out = torch.cat(outs).cpu().numpy()
        if cuda:
            # device time, now that it is known
            stats.forward_s = sum(a.elapsed_time(b) for a, b in events) / 1e3
        return out


@dataclass
class StreamStats:
    """Where a stream's time went (seconds): blocked on its input, and running forwards
    (device time on CUDA, host time elsewhere). A stream that mostly waits is input-bound."""

    samples: int = 0
    input_wait_s: float = 0.0
    forward_s: float = 0.0
    widths: dict[int, int] = field(default_factory=dict)  # texts: rows run at each token width (FLOPs run)


def _rebatch(chunks: Iterable[np.ndarray | torch.Tensor], size: int) -> Iterator[np.ndarray | torch.Tensor]:
    """Concatenate/split chunks along the first axis into batches of ``size`` (the last may be short)."""
    pending: list = []
    have = 0
    for chunk in chunks:
        while len(chunk):
            take = chunk[: size - have]
            chunk = chunk[len(take):]
            pending.append(take)
            have += len(take)
            if have == size:
                yield _concat(pending)
                pending, have = [], 0
    if have:
        yield _concat(pending)


def _concat(parts: list) -> np.ndarray | torch.Tensor:
    """One batch of host arrays, or of device tensors (decoded on the GPU) where they stay."""
    if len(parts) == 1:
        return parts[0]
    if isinstance(parts[0], torch.Tensor) and parts[0].device.type != "cpu":
        return torch.cat(parts)
    return np.concatenate([np.asarray(p) for p in parts])


def load_embedder(
    checkpoint: str | Path | None = None,
    *,
    tiny: bool = False,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    seed: int = 0,
    random_weights: bool = False,
    batch_size: int | None = None,
    compile: bool = False,
) -> Embedder:
    """ImageBind-Huge from ``checkpoint`` (default: :func:`resolve_checkpoint`'s); or the tiny model
    (``tiny=True``: random from ``seed``, or from ``checkpoint`` if one is given); or random Huge
    (``random_weights=True``, benchmarks).

    ``dtype`` defaults to bfloat16 on CUDA and float32 elsewhere. ``compile`` wraps the model in
    ``torch.compile`` (the first batch of each modality then takes a minute or two).
    """
    dev = resolve_device(device)
    dtype = dtype or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    arch = "imagebind_tiny" if tiny else "imagebind_huge"
    if checkpoint is None and not tiny and not random_weights:
        checkpoint = resolve_checkpoint()  # the environment's, the cache's, or a download's
    if checkpoint is None and tiny:  # drawn on CPU, so every process gets the same weights
        model = build_random(arch, seed, "cpu")
        # the same as model_fingerprint(tiny=True), from the weights already drawn
        fingerprint = fingerprint_of(arch, weights_digest(model.state_dict()))
    else:
        fingerprint = model_fingerprint(checkpoint, tiny=tiny, seed=seed, random_weights=random_weights)
        # random Huge (benchmarks) is drawn on the device: seconds instead of half a minute on CPU
        model = load_checkpoint(checkpoint, arch) if checkpoint is not None else build_random(arch, seed, dev)
    # after the fingerprint and any checkpoint load: the rewrite renames the attention parameters
    model = make_batch_first(model.to(device=dev, dtype=dtype).eval().requires_grad_(False))
    bs = batch_size or (256 if dev.type == "cuda" else 32)
    if compile:
        model = torch.compile(model, dynamic=False)
    return Embedder(model=model, device=dev, dtype=dtype, fingerprint=fingerprint, batch_size=bs,
                    pad_batches=compile)


_CACHE: dict[tuple, Embedder] = {}
_CACHE_LOCK = threading.Lock()


def cached_embedder(checkpoint: str | Path | None = None, **kwargs: Any) -> Embedder:
    """:func:`load_embedder`, once per process and arguments (a Dask worker loads the model once)."""
    key = (str(checkpoint) if checkpoint else None, tuple(sorted((k, str(v)) for k, v in kwargs.items())))
    with _CACHE_LOCK:
        if key not in _CACHE:
            _CACHE[key] = load_embedder(checkpoint, **kwargs)
        return _CACHE[key]
