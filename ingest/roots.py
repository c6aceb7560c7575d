"""Where a data root's images are: the ``images.root`` ingest records, and how every later stage
finds the folder again.

Ingest records an image folder under the data root relative to it (``demo/images/train2014``), so
a root moved or copied whole keeps its images; a folder elsewhere (a shared COCO copy) stays
absolute, and config (``image_roots``, per split) can point a stage at it after it moved. A root
written before roots were relative holds absolute folders that may no longer exist: when the same
folder, with the same files, is found under the data root by the tail of its old path, that one is
taken (and said so in the log).

A stage that cannot find a folder stops before it writes (:class:`ImageRootMissing`), rather than
quarantine every image as missing and drop what it made from them before.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path, PurePath

from schemas.paths import stored_root

log = logging.getLogger("mmem." + __name__)


def root_to_store(images: str | Path, data_root: str | Path) -> str:
    """The ``images.root`` value for the folder ``images``: relative to the data root (POSIX
    separators) when it lies under it, else absolute."""
    folder, base = Path(images).resolve(), Path(data_root).resolve()
    if folder == base or base in folder.parents:
        return folder.relative_to(base).as_posix()
    return str(folder)


def relative_to_root(path: str | Path, data_root: str | Path) -> str | None:
    """``path`` relative to the data root (POSIX), or None when it lies outside it."""
    full, base = Path(os.path.abspath(path)), Path(data_root).resolve()
    for b in dict.fromkeys((Path(os.path.abspath(data_root)), base)):
        if full == b or b in full.parents:
            return full.relative_to(b).as_posix()
    return None


class ImageRootMissing(FileNotFoundError):
    """A whole image folder is gone (the data root or the images moved): the run stops before it
    writes, rather than quarantine every image as ``image_missing`` and drop what it made of them."""

    def __init__(self, roots: dict[str, str], stage: str = "reminders") -> None:
        self.roots = dict(roots)
        example = json.dumps({split: "/new/folder" for split in dict.fromkeys(roots.values())})
        super().__init__(f"image folder(s) {sorted(roots)} do not exist (moved?); nothing was written. "
                         f"Point the {stage} config's image_roots at them, e.g. "
                         f"MMEM_{stage.upper()}_IMAGE_ROOTS='{example}'")


class ImageRoots:
    """The folder of each (split, stored root), found once: the config's ``image_roots[split]``,
    else the stored root (relative ones against the data root), else, for an absolute root that
    is gone, the same folder under the data root (see the module doc).

    ``find`` answers None where no folder is known at all (no stored root, no override). A folder
    that does not exist is answered as the path tried and remembered in ``missing`` (folder ->
    split), so the caller decides whether the rows it needs are affected (:meth:`check`)."""

    def __init__(self, data_root: str | Path, overrides: dict[str, str | Path] | None = None) -> None:
        self.data_root = Path(data_root)
        self.overrides = {k: str(v) for k, v in (overrides or {}).items()}
        self.missing: dict[str, str] = {}
        self._found: dict[tuple[str, str | None], str | None] = {}

    def find(self, split: str, stored: str | None, probe: str | None = None) -> str | None:
        """The folder for a row of ``split`` whose stored root is ``stored``; ``probe`` (a file
        relative to it) confirms a folder found by the fallback."""
        key = (split, stored)
        if key not in self._found:
            self._found[key] = self._find(split, stored, probe)
        return self._found[key]

    def _find(self, split: str, stored: str | None, probe: str | None) -> str | None:
        given = self.overrides.get(split)
        if given is not None:
            return given if os.path.isdir(given) else self._gone(given, split)
        if not stored:
            return None
        root = stored_root(stored, self.data_root)
        if os.path.isdir(root):
            return root
        moved = self._under_data_root(stored, probe) if Path(stored).is_absolute() else None
        if moved is None:
            return self._gone(root, split)
        log.warning("image folder %s is gone; using %s, the same folder under the data root %s",
                    stored, moved, self.data_root)
        return moved

    def _under_data_root(self, stored: str, probe: str | None) -> str | None:
        """The longest tail of the gone folder's path that is a folder under the data root (and
        holds ``probe``): a root written before roots were relative, then moved whole."""
        parts = PurePath(stored).parts[1:]
        for i in range(len(parts)):
            candidate = self.data_root.joinpath(*parts[i:])
            if candidate.is_dir() and (probe is None or (candidate / probe).is_file()):
                return str(candidate)
        return None

    def _gone(self, root: str, split: str) -> str:
        self.missing.setdefault(str(root), split)
        return root

    def check(self, roots: list[str | None] | None = None, stage: str = "reminders") -> None:
        """Raise :class:`ImageRootMissing` if any of ``roots`` (default: every folder looked up) is
        a folder that does not exist."""
        gone = self.missing if roots is None else {r: self.missing[r] for r in roots if r in self.missing}
        if gone:
            raise ImageRootMissing(gone, stage)

    def column(self, splits: list[str], stored: list[str | None], paths: list[str]) -> list[str | None]:
        """:meth:`find` for each row (``paths`` are the rows' files, relative to their roots)."""
        return [self.find(s, r, p) for s, r, p in zip(splits, stored, paths, strict=True)]
