"""Find, open, measure and hash images, with a reason for every one that cannot be used.

Pure functions (no Prefect). ``check_images`` fans the work out over worker processes because
decoding and hashing 82k JPEGs is CPU-bound.

An image file is never read unbounded: it is stat-ed first (only a regular file of at most the
byte limit is opened; a FIFO would block a reader forever, a sparse file could claim gigabytes),
opened non-blocking without following a symlink, and checked again on the open descriptor, so a
file swapped in between the two looks is caught too.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import multiprocessing
import os
import re
import stat
import warnings
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ingest.visdial import VisdialFormatError
from schemas.quarantine import Reason, Rejection

_ID_IN_NAME = re.compile(r"(\d+)\.(?:jpe?g|png)$", re.IGNORECASE)


def index_image_folder(root: str | Path) -> dict[int, str]:
    """Image id -> file name, from COCO-style names (``..._000000123456.jpg``) in ``root``."""
    found: dict[int, str] = {}
    with os.scandir(root) as it:
        for entry in it:
            m = _ID_IN_NAME.search(entry.name)
            if m:
                found.setdefault(int(m.group(1)), entry.name)
    return found


class CocoFormatError(VisdialFormatError):
    """The COCO annotation file as a whole is unusable; the message names the file and position.
    A kind of VisDial input error: VisDial's images are COCO's, named by this file."""


def coco_file_names(coco_path: str | Path) -> tuple[dict[int, str], list[Rejection]]:
    """Image id -> ``file_name`` from a COCO annotation file, indexed by pycocotools, and a
    rejection for each ``images`` entry whose ``id`` or ``file_name`` is unusable (the others are
    kept; the folder may still name that image).

    The file is parsed here rather than by pycocotools, whose ``json.load`` would fail with a bare
    traceback on a truncated file; only the ``images`` list is indexed, as nothing else is used.
    """
    from pycocotools.coco import COCO

    path = Path(coco_path)
    try:
        doc = json.loads(path.read_bytes())
    except OSError as exc:
        raise CocoFormatError(f"{path}: cannot read: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise CocoFormatError(f"{path}: not UTF-8 at byte {exc.start}: {exc.reason}") from exc
    except json.JSONDecodeError as exc:
        raise CocoFormatError(f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno} "
                              f"(char {exc.pos}): {exc.msg}") from exc
    except RecursionError as exc:
        raise CocoFormatError(f"{path}: invalid JSON: nested too deep") from exc
    images = doc.get("images") if isinstance(doc, dict) else None
    if not isinstance(images, list):
        raise CocoFormatError(f"{path}: not a COCO annotation file: no \"images\" list at the top level")
    good, rejections = [], []
    for pos, entry in enumerate(images):
        problem = _coco_entry_problem(entry)
        if problem is None:
            good.append(entry)
            continue
        field, why = problem
        ok_id = isinstance(entry, dict) and _is_int(entry.get("id"))
        key = str(entry["id"]) if ok_id else f"images[{pos}]"
        rejections.append(Rejection(key, Reason.BAD_RECORD, entry, f"{path}: images[{pos}].{field} {why}"))
    coco = COCO()
    coco.dataset = {"images": good}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress chatter
        coco.createIndex()
    return {int(i): img["file_name"] for i, img in coco.imgs.items()}, rejections


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _coco_entry_problem(entry) -> tuple[str, str] | None:
    """(field, what is wrong with it) for an unusable ``images`` entry, else None."""
    if not isinstance(entry, dict):
        return "", f"is a {type(entry).__name__}, not an object"
    image_id, name = entry.get("id"), entry.get("file_name")
    if not _is_int(image_id) or not -(2**63) <= image_id < 2**63:
        return "id", f"is {image_id!r:.80}, not a 64-bit integer"
    if not isinstance(name, str):
        return "file_name", f"is {name!r:.80}, not a string"
    if not name or "\0" in name:
        return "file_name", f"is {name!r:.80}: empty or holds a NUL character"
    return None


@dataclass(frozen=True)
class ImageInfo:
    image_id: int
    path: str
    width: int
    height: int
    mode: str
    num_bytes: int
    sha256: str


@dataclass(frozen=True)
class ImageProblem:
    image_id: int
    path: str
    reason: Reason
    detail: str


def resolve_inside(root: str | Path, rel: str) -> Path | None:
    """``root/rel`` with symlinks resolved, or None if it leaves ``root``."""
    root_real = os.path.realpath(root)
    full = os.path.realpath(os.path.join(root_real, rel))
    if os.path.commonpath([root_real, full]) != root_real:
        return None
    return Path(full)


DEFAULT_MAX_BYTES = 50_000_000  # IngestConfig.max_image_bytes' default

_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def _not_readable(st: os.stat_result, max_bytes: int) -> tuple[Reason, str] | None:
    """Why a file with this status must not be read, or None."""
    if not stat.S_ISREG(st.st_mode):
        kind = next((name for test, name in _KINDS if test(st.st_mode)), "not a regular file")
        return Reason.IMAGE_NOT_A_FILE, f"{kind}, not a regular file"
    if st.st_size > max_bytes:
        return Reason.IMAGE_FILE_TOO_LARGE, f"{st.st_size} bytes > {max_bytes} bytes (max_image_bytes)"
    return None


def read_bounded(path: Path, max_bytes: int) -> bytes | tuple[Reason, str]:
    """The bytes of a regular file of at most ``max_bytes``, or why it was not read."""
    try:
        why = _not_readable(os.stat(path), max_bytes)
        if why:
            return why
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return Reason.IMAGE_MISSING, "no such file"
    except OSError as exc:
        if os.path.islink(path):  # swapped for a symlink since the path was resolved
            return Reason.IMAGE_OUTSIDE_ROOT, "became a symlink while checked"
        return Reason.IMAGE_UNREADABLE, f"cannot open: {exc.strerror}"
    with open(fd, "rb") as f:
        try:
            st = os.fstat(fd)
            why = _not_readable(st, max_bytes)  # the file opened may not be the one stat-ed
            if why:
                return why
            data = f.read(st.st_size + 1)
        except OSError as exc:
            return Reason.IMAGE_UNREADABLE, f"cannot read: {exc.strerror}"
    if len(data) > max_bytes:
        return Reason.IMAGE_FILE_TOO_LARGE, f"grew past {max_bytes} bytes while read"
    if len(data) != st.st_size:
        return Reason.IMAGE_UNREADABLE, f"changed size while read ({st.st_size} -> {len(data)} bytes)"
    return data


def check_image(root: str, image_id: int, rel: str, max_pixels: int,
                max_bytes: int = DEFAULT_MAX_BYTES) -> ImageInfo | ImageProblem:
    """Open, fully decode (at reduced scale where the codec allows), measure and hash one image."""
    try:
        full = resolve_inside(root, rel)
    except (TypeError, ValueError) as exc:  # a NUL in the name, a name that is not text
        return ImageProblem(image_id, str(rel), Reason.BAD_RECORD, f"bad file name {rel!r}: {exc}")
    if full is None:
        return ImageProblem(image_id, rel, Reason.IMAGE_OUTSIDE_ROOT, "path resolves outside the image root")
    data = read_bounded(full, max_bytes)
    if isinstance(data, tuple):
        return ImageProblem(image_id, rel, *data)
    Image.MAX_IMAGE_PIXELS = max_pixels  # PIL's own bomb guard, at our limit (a process-wide setting)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > max_pixels:
                return ImageProblem(
                    image_id, rel, Reason.IMAGE_TOO_LARGE, f"{width}x{height} > {max_pixels} pixels"
                )
            mode = img.mode
            if img.format == "JPEG":
                # decodes every block, 64x fewer pixels
                img.draft(img.mode, (max(1, width // 8), max(1, height // 8)))
            img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        return ImageProblem(image_id, rel, Reason.IMAGE_TOO_LARGE, f"{type(exc).__name__}: {exc}")
    except UnidentifiedImageError as exc:
        return ImageProblem(image_id, rel, Reason.IMAGE_UNREADABLE, f"{type(exc).__name__}: {exc}")
    except (OSError, SyntaxError, ValueError) as exc:  # truncated / corrupt data
        return ImageProblem(image_id, rel, Reason.IMAGE_UNREADABLE, f"{type(exc).__name__}: {exc}")
    return ImageInfo(image_id, rel, width, height, mode, len(data), hashlib.sha256(data).hexdigest())


def _check_many(args: tuple[str, list[tuple[int, str]], int, int]) -> list[ImageInfo | ImageProblem]:
    root, items, max_pixels, max_bytes = args
    return [check_image(root, i, rel, max_pixels, max_bytes) for i, rel in items]


def check_images(
    root: str | Path, items: Iterable[tuple[int, str]], *, workers: int = 1, max_pixels: int = 50_000_000,
    max_bytes: int = DEFAULT_MAX_BYTES, chunk: int = 512, progress=None,
) -> list[ImageInfo | ImageProblem]:
    """Check ``(image_id, relative path)`` pairs, in ``workers`` processes; order is kept."""
    items = list(items)
    jobs = [(str(root), items[i : i + chunk], max_pixels, max_bytes) for i in range(0, len(items), chunk)]
    out: list[ImageInfo | ImageProblem] = []
    if workers > 1 and len(jobs) > 1:
        # forkserver, not fork: lancedb's runtime threads may be live in this process
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("forkserver")) as pool:
            for part in pool.map(_check_many, jobs):
                out.extend(part)
                if progress:
                    progress(len(part))
    else:
        for job in jobs:
            part = _check_many(job)
            out.extend(part)
            if progress:
                progress(len(part))
    return out
