"""The ImageBind architectures and their weights: built at random from a seed (the tiny test
model, random Huge for benchmarks), or ImageBind-Huge read from a checkpoint, and the fingerprint
that names them in every cache key and embeddings row.

The weights of ImageBind-Huge (``imagebind_huge.pth``, loaded with ``weights_only=True`` and
checked key by key against the architecture) are found in this order: an explicit checkpoint path
(``--checkpoint`` or the stage's config), ``MMEM_IMAGEBIND_CHECKPOINT``, the cache
(``<HF_HOME>/mmem/imagebind/``, Hugging Face's cache directory convention), else they are
downloaded once into that cache from ``MMEM_IMAGEBIND_URL`` (default: Meta's official URL), with a
progress bar, a size and (when ``MMEM_IMAGEBIND_SHA256`` pins one) sha256 check and an atomic
rename, never under ``HF_HUB_OFFLINE=1``. The tiny model is the same class with every modality's
tower shrunk, random weights drawn from a seed (so two processes build identical weights) and the
same 1024-d output.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from embed.compat import import_imagebind
from schemas.embed import EMBED_DIM

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
    """Build without drawing random weights that a checkpoint overwrites anyway (drawing them is
    most of the time it takes to build Huge).

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
            f"Point it at imagebind_huge.pth, or leave it unset to use the cache ({checkpoint_cache_dir()}) "
            f"and "
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
            f"no ImageBind-Huge checkpoint: none given (--checkpoint / {CHECKPOINT_ENV}), "
            f"none cached at {cached}, "
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
            with httpx.stream("GET", url, follow_redirects=True, timeout=timeout) as resp, \
                    part.open("wb") as out:
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
                raise CheckpointError(f"downloading {url}: got {written} bytes, expected {expected} "
                                      "(size mismatch)")
            if sha256 is not None and digest.hexdigest() != sha256.strip().lower():
                raise CheckpointError(f"downloading {url}: sha256 {digest.hexdigest()} does not match the "
                                      f"expected {sha256.strip().lower()} ({SHA256_ENV})")
            os.replace(part, dest)
        except httpx.HTTPError as exc:
            raise CheckpointError(f"downloading {url} failed: {exc}; "
                                  "pass --checkpoint PATH to a local copy") from exc
        finally:
            part.unlink(missing_ok=True)
    return dest


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    path = existing_checkpoint(path)
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        raise CheckpointError(f"cannot read ImageBind checkpoint {path} as a weights-only state dict: "
                              f"{exc}") from exc
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
            parts.append(f"{len(shapes)} with another shape "
                         f"(e.g. {k}: file {tuple(sd[k].shape)}, model {expected[k]})")
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
    # from the environment, the cache or a download
    return fingerprint_of(arch, file_digest(resolve_checkpoint()))
