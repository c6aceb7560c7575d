"""ImageBind behind one small interface: load a model, embed texts and images, name the weights.

The model code is Meta's ``ImageBindModel`` from the ``imagebind-unofficial`` package. The weights
of ImageBind-Huge (``imagebind_huge.pth``, loaded with ``weights_only=True`` and checked key by key
against the architecture) are found in this order: an explicit checkpoint path (``--checkpoint``
or the stage's config), ``MMEM_IMAGEBIND_CHECKPOINT``, the cache (``<HF_HOME>/mmem/imagebind/``,
Hugging Face's cache directory convention), else they are downloaded once into that cache from
``MMEM_IMAGEBIND_URL`` (default: Meta's official URL), with a progress bar, a size and (when
``MMEM_IMAGEBIND_SHA256`` pins one) sha256 check and an atomic rename, never under
``HF_HUB_OFFLINE=1``. Tests and the demo use a tiny model of the same class with every modality's
tower shrunk, random weights drawn from a seed (so two processes build identical weights) and the
same 1024-d output.

Preprocessing is ImageBind's own (``imagebind.data``): resize the short side to 224 (bicubic),
centre-crop 224, scale to [0, 1], CLIP mean/std; texts through its BPE tokenizer, 77 tokens (run
only as wide as each batch's longest text: see :func:`token_batches`). It is
split in two halves so that the expensive, CPU-bound half can run in worker processes:
:func:`image_to_pixels` (decode, resize, crop -> 224x224x3 uint8) and the normalisation, done on
the model's device in :meth:`Embedder.embed_pixels` with the same float operations as
``ToTensor`` + ``Normalize``. ``tests/test_embed.py`` pins both halves against ``imagebind.data``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from schemas.embed import EMBED_DIM
from training.attention import make_batch_first
from training.compat import import_imagebind

# Bump when anything below changes what a given input embeds to (it is part of every cache key).
PREPROCESS_VERSION = "ib1-bicubic224-crop224-clipnorm-bpe77"

IMAGE_SIZE = 224
CONTEXT_LENGTH = 77
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# ImageBind-Huge, as ``imagebind_model.imagebind_huge`` builds it.
HUGE_ARCH: dict[str, Any] = {
    "vision_embed_dim": 1280, "vision_num_blocks": 32, "vision_num_heads": 16,
    "text_embed_dim": 1024, "text_num_blocks": 24, "text_num_heads": 16,
    "out_embed_dim": EMBED_DIM, "audio_drop_path": 0.1, "imu_drop_path": 0.7,
}
# Every tower shrunk (not only vision and text: the others alone are ~217M parameters); same joint dim.
TINY_ARCH: dict[str, Any] = {
    "vision_embed_dim": 32, "vision_num_blocks": 2, "vision_num_heads": 2,
    "text_embed_dim": 32, "text_num_blocks": 2, "text_num_heads": 2,
    "audio_embed_dim": 16, "audio_num_blocks": 1, "audio_num_heads": 1,
    "depth_embed_dim": 16, "depth_num_blocks": 1, "depth_num_heads": 1,
    "thermal_embed_dim": 16, "thermal_num_blocks": 1, "thermal_num_heads": 1,
    "imu_embed_dim": 16, "imu_num_blocks": 1, "imu_num_heads": 1,
    "out_embed_dim": EMBED_DIM,
}
ARCHS = {"imagebind_huge": HUGE_ARCH, "imagebind_tiny": TINY_ARCH}


class CheckpointError(ValueError):
    """The checkpoint cannot be read, or does not match the architecture."""


# --- preprocessing ---------------------------------------------------------------------------


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


def load_pixels(path: str | os.PathLike) -> np.ndarray:
    """Decode one image file fully and preprocess it; raises on unreadable data (caller quarantines)."""
    with open(path, "rb") as fh:
        image = Image.open(fh)
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


def warm_preprocessing() -> None:
    """Load what the CPU half of preprocessing needs (transforms; the tokenizer, which imports
    ImageBind and reads its BPE vocabulary: seconds), e.g. when a worker process starts."""
    _vision_resize_crop()
    tokenizer()


_TOKENIZER_LOCK = threading.Lock()


@lru_cache(maxsize=1)
def tokenizer():
    """ImageBind's BPE tokenizer with its bundled vocabulary (one per process; it caches BPE merges)."""
    ib = import_imagebind()
    from imagebind.models.multimodal_preprocessors import SimpleTokenizer

    return SimpleTokenizer(bpe_path=ib.data.return_bpe_path(), context_length=CONTEXT_LENGTH)


def tokenize(texts: Sequence[str]) -> np.ndarray:
    """(n, 77) int32 token ids, exactly as ``imagebind.data.load_and_transform_text`` makes them."""
    out = np.zeros((len(texts), CONTEXT_LENGTH), dtype=np.int32)
    if not texts:
        return out
    tok = tokenizer()
    with _TOKENIZER_LOCK:  # its BPE cache is a plain dict shared by the threads of a worker
        ids = tok(list(texts))
    out[:] = ids.reshape(len(texts), CONTEXT_LENGTH).numpy()
    return out


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
    """Yield full batches from the front of ``rows``; return what is left for the next chunk (nothing if ``final``)."""
    while len(rows):
        widths = np.minimum(-(-np.maximum.accumulate(token_widths(rows)) // multiple) * multiple, CONTEXT_LENGTH)
        fit = max(1, int((np.arange(1, len(rows) + 1) * widths <= budget).sum()))  # a prefix: the product only grows
        if fit == len(rows) and not final:
            return rows  # more rows may still join this batch
        yield rows[:fit, : widths[fit - 1]]
        rows = rows[fit:]
    return rows


# --- model -----------------------------------------------------------------------------------


def model_class():
    import_imagebind()
    from imagebind.models.imagebind_model import ImageBindModel

    return ImageBindModel


# Building a model draws from torch's global RNG, and skipping initialisation patches torch.nn.init
# globally: two threads building at once (the flow's pre-start beside a fingerprint) would draw
# each other's numbers. Builds take turns.
_BUILD_LOCK = threading.RLock()


@contextlib.contextmanager
def _skip_weight_init() -> Iterator[None]:
    """Build without drawing random weights that a checkpoint overwrites anyway (30 s -> 1 s for Huge).

    Safe only because :func:`load_checkpoint` then loads with ``strict=True``: every parameter
    and buffer is replaced, so no uninitialised memory survives.
    """
    init = torch.nn.init
    names = ["uniform_", "normal_", "trunc_normal_", "xavier_uniform_", "xavier_normal_",
             "kaiming_uniform_", "kaiming_normal_", "constant_", "zeros_", "ones_"]
    _BUILD_LOCK.acquire()  # before reading the functions: another thread may have them patched
    saved = {n: getattr(init, n) for n in names}
    try:
        for n in names:
            setattr(init, n, lambda tensor, *a, **k: tensor)
        yield
    finally:
        for n, f in saved.items():
            setattr(init, n, f)
        _BUILD_LOCK.release()


def build_random(arch: str, seed: int = 0, device: str | torch.device = "cpu") -> torch.nn.Module:
    """A model of ``arch`` with random weights that depend only on ``seed`` (on CPU) and the code."""
    cls = model_class()
    with _BUILD_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.device(device):
            return cls(**ARCHS[arch])


def existing_checkpoint(path: str | Path, origin: str = "the checkpoint path given") -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"ImageBind checkpoint {path} ({origin}) does not exist; a named path is never downloaded to. "
            f"Point it at imagebind_huge.pth, or leave it unset to use the cache ({checkpoint_cache_dir()}) and "
            f"download {OFFICIAL_URL} there once; --tiny uses the random-weight test model."
        )
    return path


# --- the weights by themselves: named, cached or downloaded ------------------------------------------

OFFICIAL_URL = "https://dl.fbaipublicfiles.com/imagebind/imagebind_huge.pth"
CHECKPOINT_ENV = "MMEM_IMAGEBIND_CHECKPOINT"  # a local file: wins over the cache
URL_ENV = "MMEM_IMAGEBIND_URL"  # where to download from (a mirror, or a test server)
SHA256_ENV = "MMEM_IMAGEBIND_SHA256"  # the download's expected sha256 (hex); checked when set
SIZE_ENV = "MMEM_IMAGEBIND_SIZE"  # the download's expected size in bytes; else the server's Content-Length
_TRUTHY = {"1", "true", "yes", "on"}


def checkpoint_cache_dir() -> Path:
    """``<HF_HOME>/mmem/imagebind``: Hugging Face's cache root (``HF_HOME``, else
    ``$XDG_CACHE_HOME/huggingface``, else ``~/.cache/huggingface``), read at call time."""
    home = os.environ.get("HF_HOME")
    if not home:
        home = str(Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "huggingface")
    return Path(home).expanduser() / "mmem" / "imagebind"


def checkpoint_url() -> str:
    return os.environ.get(URL_ENV) or OFFICIAL_URL


def resolve_checkpoint(checkpoint: str | Path | None = None, *, download: bool = True) -> Path:
    """The ImageBind-Huge weights file: ``checkpoint``, else ``MMEM_IMAGEBIND_CHECKPOINT``, else the
    cached download, else a download into the cache (unless ``download`` is off or
    ``HF_HUB_OFFLINE`` is set, which raise :class:`CheckpointError` saying what to do)."""
    if checkpoint is not None:
        return existing_checkpoint(checkpoint)
    if os.environ.get(CHECKPOINT_ENV):
        return existing_checkpoint(os.environ[CHECKPOINT_ENV], CHECKPOINT_ENV)
    url = checkpoint_url()
    cached = checkpoint_cache_dir() / _file_name(url)
    if cached.is_file():
        return cached
    if not download or os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUTHY:
        raise CheckpointError(
            f"no ImageBind-Huge checkpoint: none given (--checkpoint / {CHECKPOINT_ENV}), none cached at {cached}, "
            "and downloads are off (HF_HUB_OFFLINE); pass a checkpoint or use --tiny")
    size = os.environ.get(SIZE_ENV)
    return download_checkpoint(url, cached, sha256=os.environ.get(SHA256_ENV) or None,
                               size=int(size) if size else None)


def _file_name(url: str) -> str:
    from urllib.parse import unquote, urlparse

    name = Path(unquote(urlparse(url).path)).name
    if not name or name in (".", ".."):
        raise CheckpointError(f"{URL_ENV}={url!r} names no file")
    return name


def download_checkpoint(url: str, dest: Path, *, sha256: str | None = None, size: int | None = None,
                        timeout: float = 60.0, chunk: int = 1 << 20) -> Path:
    """Fetch ``url`` to ``dest``: streamed to a temporary file beside it (progress bar on stderr),
    size checked (``size``, else the server's Content-Length) and sha256 checked (when given),
    then renamed into place. A failed or mismatching download leaves nothing behind; one process
    downloads while the others wait on a lock and then find the file."""
    import httpx
    from filelock import FileLock
    from tqdm.auto import tqdm

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dest.parent / f".{dest.name}.lock")):
        if dest.is_file():
            return dest
        part = dest.parent / f".{dest.name}.{os.getpid()}.part"
        digest = hashlib.sha256()
        written = 0
        try:
            with httpx.stream("GET", url, follow_redirects=True, timeout=timeout) as resp, part.open("wb") as out:
                if resp.status_code != 200:
                    raise CheckpointError(f"downloading {url}: HTTP {resp.status_code}")
                length = resp.headers.get("content-length")
                expected = size if size is not None else (int(length) if length else None)
                if size is not None and length and int(length) != size:
                    raise CheckpointError(f"downloading {url}: the server announces {length} bytes, "
                                          f"{SIZE_ENV} expects {size}")
                with tqdm(total=expected, unit="B", unit_scale=True, unit_divisor=1024,
                          desc=f"download {dest.name}") as bar:
                    for block in resp.iter_bytes(chunk):
                        out.write(block)
                        digest.update(block)
                        written += len(block)
                        bar.update(len(block))
                out.flush()
                os.fsync(out.fileno())
            if expected is not None and written != expected:
                raise CheckpointError(f"downloading {url}: got {written} bytes, expected {expected} (size mismatch)")
            if sha256 is not None and digest.hexdigest() != sha256.strip().lower():
                raise CheckpointError(f"downloading {url}: sha256 {digest.hexdigest()} does not match the expected "
                                      f"{sha256.strip().lower()} ({SHA256_ENV})")
            os.replace(part, dest)
        except httpx.HTTPError as exc:
            raise CheckpointError(f"downloading {url} failed: {exc}; pass --checkpoint PATH to a local copy") from exc
        finally:
            part.unlink(missing_ok=True)
    return dest


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    path = existing_checkpoint(path)
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        raise CheckpointError(f"cannot read ImageBind checkpoint {path} as a weights-only state dict: {exc}") from exc
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path} is not a state dict (a mapping of parameter names to tensors)")
    return sd


def check_state_dict(model: torch.nn.Module, sd: dict[str, torch.Tensor], path: Path, arch: str) -> None:
    """Raise :class:`CheckpointError` naming what differs, instead of torch's wall of text."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    shapes = sorted(k for k in set(expected) & set(sd) if tuple(sd[k].shape) != expected[k])
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
        if shapes:
            k = shapes[0]
            parts.append(f"{len(shapes)} with another shape (e.g. {k}: file {tuple(sd[k].shape)}, model {expected[k]})")
        raise CheckpointError(f"checkpoint {path} does not match {arch}: " + "; ".join(parts))


def load_checkpoint(path: str | Path, arch: str = "imagebind_huge") -> torch.nn.Module:
    """``arch`` with the weights of a local checkpoint (weights_only, strict)."""
    path = Path(path)
    sd = read_state_dict(path)
    with _skip_weight_init():
        model = model_class()(**ARCHS[arch])
    check_state_dict(model, sd, path, arch)
    model.load_state_dict(sd, strict=True)
    return model


_FILE_DIGESTS: dict[tuple[str, int, int], str] = {}


def file_digest(path: Path) -> str:
    """sha256 of a file, remembered per (path, size, mtime) for the life of the process."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _FILE_DIGESTS:
        with path.open("rb") as fh:
            _FILE_DIGESTS[key] = hashlib.file_digest(fh, "sha256").hexdigest()
    return _FILE_DIGESTS[key]


def weights_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes (cheap for the tiny model only)."""
    h = hashlib.sha256()
    for name, t in sorted(state_dict.items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def arch_digest(arch: str) -> str:
    return hashlib.sha256(repr(sorted(ARCHS[arch].items())).encode()).hexdigest()[:8]


def fingerprint_of(arch: str, weights: str) -> str:
    """``<arch>-<architecture digest>:<weights digest>``: changes when either changes."""
    return f"{arch}-{arch_digest(arch)}:{weights[:16]}"


@lru_cache(maxsize=8)
def _tiny_fingerprint(seed: int) -> str:
    return fingerprint_of("imagebind_tiny", weights_digest(build_random("imagebind_tiny", seed).state_dict()))


def model_fingerprint(checkpoint: str | Path | None = None, *, tiny: bool = False, seed: int = 0,
                      random_weights: bool = False) -> str:
    """The fingerprint :func:`load_embedder` gives the same arguments, without building Huge.

    The flow needs it for cache keys before any worker loads a model.
    """
    arch = "imagebind_tiny" if tiny else "imagebind_huge"
    if checkpoint is not None and tiny:  # same weights, same name, whether drawn or read from a file
        return fingerprint_of(arch, weights_digest(read_state_dict(Path(checkpoint))))
    if checkpoint is not None:  # hashing 4.8 GB of tensors would cost more than hashing the file
        return fingerprint_of(arch, file_digest(existing_checkpoint(checkpoint)))
    if tiny:
        return _tiny_fingerprint(seed)
    if random_weights:  # benchmark only: drawn on the target device, so named by its seed alone
        return fingerprint_of(arch, f"random{seed:08d}")
    return fingerprint_of(arch, file_digest(resolve_checkpoint()))  # from the environment, the cache or a download


# --- the embedder ----------------------------------------------------------------------------


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass
class Embedder:
    """A loaded ImageBind model: texts and images in, (n, 1024) L2-normalised float32 out."""

    model: torch.nn.Module
    device: torch.device
    dtype: torch.dtype
    fingerprint: str
    batch_size: int = 64
    pad_batches: bool = False  # a compiled model sees one batch shape: pad the last batch instead of recompiling
    preprocess: str = PREPROCESS_VERSION
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        return self.embed_tokens(tokenize(texts))

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        pixels = np.stack([image_to_pixels(im) for im in images]) if images else np.zeros((0, 224, 224, 3), np.uint8)
        return self.embed_pixels(pixels)

    def embed_tokens(self, tokens: np.ndarray | torch.Tensor, stats: StreamStats | None = None) -> np.ndarray:
        """Embed (n, 77) token ids, run in order of length so that batches are narrow; results in input order."""
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
                    events.append((torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)))
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
            stats.forward_s = sum(a.elapsed_time(b) for a, b in events) / 1e3  # device time, now that it is known
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
    """ImageBind-Huge from ``checkpoint`` (default: :func:`resolve_checkpoint`'s); or the tiny model (``tiny=True``: random from ``seed``,
    or from ``checkpoint`` if one is given); or random Huge (``random_weights=True``, benchmarks).

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
        fingerprint = fingerprint_of(arch, weights_digest(model.state_dict()))  # == model_fingerprint(tiny=True)
    else:
        fingerprint = model_fingerprint(checkpoint, tiny=tiny, seed=seed, random_weights=random_weights)
        # random Huge (benchmarks) is drawn on the device: seconds instead of half a minute on CPU
        model = load_checkpoint(checkpoint, arch) if checkpoint is not None else build_random(arch, seed, dev)
    # after the fingerprint and any checkpoint load: the rewrite renames the attention parameters
    model = make_batch_first(model.to(device=dev, dtype=dtype).eval().requires_grad_(False))
    bs = batch_size or (256 if dev.type == "cuda" else 32)
    if compile:
        model = torch.compile(model, dynamic=False)
    return Embedder(model=model, device=dev, dtype=dtype, fingerprint=fingerprint, batch_size=bs, pad_batches=compile)


_CACHE: dict[tuple, Embedder] = {}
_CACHE_LOCK = threading.Lock()


def cached_embedder(checkpoint: str | Path | None = None, **kwargs: Any) -> Embedder:
    """:func:`load_embedder`, once per process and arguments (a Dask worker loads the model once)."""
    key = (str(checkpoint) if checkpoint else None, tuple(sorted((k, str(v)) for k, v in kwargs.items())))
    with _CACHE_LOCK:
        if key not in _CACHE:
            _CACHE[key] = load_embedder(checkpoint, **kwargs)
        return _CACHE[key]
