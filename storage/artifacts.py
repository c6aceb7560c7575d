"""The artifact store: every trained model is a numbered, immutable version with a manifest.

Layout (under ``<data_root>/artifacts``)::

    <name>/v<N>/            weights or adapter in Hugging Face format, plus manifest.json
    <name>/latest -> v<N>   an alias (relative symlink) to the newest version

A version is built in a staging folder beside its final place and renamed into ``v<N>`` in one
step, so a reader never sees half a version and two writers never get the same number. The
manifest says what went in (tables and their Lance versions, the full config, the code version),
what came out (file hashes) and how well (metrics); its ``fingerprint`` lets a re-run with the
same inputs, config and code find the version it would produce instead of training again.

Names come from flow parameters, so every one passes ``schemas.paths.safe_child`` (no absolute
path, ``..`` or symlink out of the store). Claiming a number and moving ``latest`` happen under one
lock per artifact (an flock on ``<name>/.lock``), and ``latest`` is moved to the highest complete
version, so two concurrent publishers can never leave it naming the older one.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from schemas.paths import NAME_PATTERN, safe_child

MANIFEST = "manifest.json"
LATEST = "latest"
LOCK = ".lock"
_NAME = re.compile(NAME_PATTERN)  # names() lists only folders a name can reach (no hidden, no odd ones)
REPO_ROOT = Path(__file__).resolve().parent.parent


class ArtifactError(LookupError):
    """No such artifact or version, or its files do not match its manifest."""


@dataclass(frozen=True)
class ArtifactVersion:
    name: str
    version: int
    path: Path
    manifest: dict[str, Any]

    @property
    def ref(self) -> str:
        """``name:vN`` — how other tables and flows refer to this version."""
        return f"{self.name}:v{self.version}"

    def summary(self) -> dict[str, Any]:
        m = self.manifest
        return {
            "artifact": self.ref,
            "kind": m.get("kind"),
            "created_at": m.get("created_at"),
            "inputs": ", ".join(f"{t}@{i.get('version')}" for t, i in m.get("inputs", {}).items()),
            "code": (m.get("code", {}).get("commit") or "unknown")[:10]
            + ("+dirty" if m.get("code", {}).get("dirty") else ""),
            "metrics": ", ".join(f"{k}={_fmt(v)}" for k, v in m.get("metrics", {}).items()),
            "files": len(m.get("files", {})),
            "bytes": sum(f["bytes"] for f in m.get("files", {}).values()),
        }


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def sha256_file(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def file_hashes(folder: Path) -> dict[str, dict[str, Any]]:
    """Relative path -> sha256 and size, for every file under ``folder`` except the manifest."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            out[p.relative_to(folder).as_posix()] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    return out


def code_version(repo: Path = REPO_ROOT, sources: Iterable[Path] = ()) -> dict[str, Any]:
    """The git commit and dirty flag of ``repo`` (read-only git calls), plus a hash of ``sources``.

    The source hash pins the code that actually ran even when the tree is dirty.
    """
    def git(*args: str) -> str | None:
        try:
            res = subprocess.run(["git", "-C", str(repo), *args], check=False, capture_output=True, text=True,
                                 timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return res.stdout.strip() if res.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    h = hashlib.sha256()
    for src in sorted(Path(s) for s in sources):
        h.update(src.name.encode() + b"\0" + src.read_bytes())
    return {"commit": commit, "dirty": bool(status) if status is not None else None,
            "source_hash": h.hexdigest()[:16] if sources else None}


def fingerprint(*parts: Any) -> str:
    """A stable content hash of JSON-able parts (config, input versions, code source hash)."""
    blob = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


class ArtifactStore:
    """Versioned model artifacts under one folder (``StageConfig.artifacts_dir``)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    # --- reading --------------------------------------------------------------------------

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and _NAME.fullmatch(p.name))

    def folder(self, name: str) -> Path:
        """``<root>/<name>``, refused (``UnsafeName``, a ``ValueError``) for a name that is no plain
        path component or leads out of the store."""
        return safe_child(self.root, name, "artifact")

    def versions(self, name: str) -> list[int]:
        folder = self.folder(name)
        if not folder.is_dir():
            return []
        return sorted(int(p.name[1:]) for p in folder.iterdir()
                      if p.name[:1] == "v" and p.name[1:].isdigit() and (p / MANIFEST).is_file())

    def get(self, name: str, version: int | str = LATEST, *, verify: bool = False) -> ArtifactVersion:
        """One version by number (``3``, ``"v3"``, ``"3"``) or ``"latest"``; ``verify`` checks file hashes."""
        number = self._resolve(name, version)
        path = self.folder(name) / f"v{number}"
        manifest = json.loads((path / MANIFEST).read_text())
        art = ArtifactVersion(name, number, path, manifest)
        if verify:
            self.verify(art)
        return art

    def get_ref(self, ref: str, *, verify: bool = False) -> ArtifactVersion:
        """``name``, ``name:latest`` or ``name:vN``."""
        name, _, version = ref.partition(":")
        return self.get(name, version or LATEST, verify=verify)

    def list(self, name: str | None = None) -> list[ArtifactVersion]:
        names = [name] if name else self.names()
        return [self.get(n, v) for n in names for v in self.versions(n)]

    def find(self, name: str, fingerprint_: str) -> ArtifactVersion | None:
        """The newest version whose manifest has this fingerprint."""
        for v in reversed(self.versions(name)):
            art = self.get(name, v)
            if art.manifest.get("fingerprint") == fingerprint_:
                return art
        return None

    def verify(self, art: ArtifactVersion) -> None:
        actual = file_hashes(art.path)
        expected = art.manifest.get("files", {})
        if {k: v["sha256"] for k, v in actual.items()} != {k: v["sha256"] for k, v in expected.items()}:
            changed = sorted(set(actual) ^ set(expected) | {k for k in actual.keys() & expected.keys()
                                                            if actual[k]["sha256"] != expected[k]["sha256"]})
            raise ArtifactError(f"{art.ref}: files differ from the manifest: {changed}")

    def _resolve(self, name: str, version: int | str) -> int:
        known = self.versions(name)
        if not known:
            raise ArtifactError(f"no artifact named {name!r} under {self.root} (have: {self.names()})")
        if isinstance(version, str) and version == LATEST:
            link = self.folder(name) / LATEST
            target = os.readlink(link) if link.is_symlink() else None
            if target and target[1:].isdigit() and int(target[1:]) in known:
                return int(target[1:])
            return known[-1]
        number = int(str(version).lstrip("v"))
        if number not in known:
            raise ArtifactError(
                f"{name} has no version v{number} (have: {', '.join(f'v{k}' for k in known)})"
            )
        return number

    # --- writing --------------------------------------------------------------------------

    def publish(
        self,
        name: str,
        write: Callable[[Path], None],
        *,
        kind: str,
        inputs: dict[str, dict[str, Any]],
        config: dict[str, Any],
        code: dict[str, Any],
        metrics: dict[str, Any],
        fingerprint_: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> ArtifactVersion:
        """Create the next version: ``write(folder)`` fills it, then the manifest is added and the
        folder is renamed into place and ``latest`` moved to it."""
        base = self.folder(name)
        base.mkdir(parents=True, exist_ok=True)
        staging = base / f".staging-{uuid.uuid4().hex}"
        staging.mkdir()
        try:
            write(staging)
            manifest = {
                "name": name,
                "kind": kind,
                "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
                "fingerprint": fingerprint_,
                "inputs": inputs,
                "config": config,
                "code": code,
                "metrics": metrics,
                "files": file_hashes(staging),
                **(extra or {}),
            }
            with _locked(base / LOCK):
                number = self._claim(base, staging, manifest)
                self._point_latest(base, max(self.versions(name)))
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return self.get(name, number)

    @staticmethod
    def _claim(base: Path, staging: Path, manifest: dict[str, Any]) -> int:
        """Rename ``staging`` to the next free ``v<N>`` (under the artifact's lock; a writer that does
        not take it, e.g. an older version of this code, still only makes us take N+1)."""
        existing = [int(p.name[1:]) for p in base.iterdir() if p.name[:1] == "v" and p.name[1:].isdigit()]
        number = max(existing, default=0) + 1
        while True:
            manifest["version"] = number
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
            try:
                os.rename(staging, base / f"v{number}")  # fails if v<N> exists and is not empty
                return number
            except OSError:
                if not (base / f"v{number}").exists():
                    raise
                number += 1

    @staticmethod
    def _point_latest(base: Path, number: int) -> None:
        tmp = base / f".latest-{uuid.uuid4().hex}"
        os.symlink(f"v{number}", tmp)
        os.replace(tmp, base / LATEST)  # atomic: readers see the old or the new alias


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive flock on ``path`` (created 0600, never followed if it is a symlink)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock
