"""Names that become paths: artifact names, run labels, variant and shard names.

A name reaches the file system from places the user does not fully control (a flow run's
parameters from the Prefect API, an event's payload, a TOML file), so every such name goes through
``safe_child``: it must be one plain path component of a fixed alphabet, and the path it names
must stay under its base folder even after symlinks are followed. An absolute path, ``..`` or a
symlink planted to lead elsewhere is refused with an error that names the parameter, instead of
writing artifact versions, locks or reports wherever the user can write.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

from pydantic import StringConstraints

# One path component: starts with a letter or digit (so never ``.``, ``..`` or a hidden file),
# then letters, digits, ``.``, ``_``, ``-``; at most 64 characters.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
_NAME = re.compile(NAME_PATTERN)

# The same rule as a pydantic type: the pattern lands in the JSON schema too, so the Prefect
# server refuses a bad name in a flow run's parameters (409) before any work starts.
SafeName = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]


class UnsafeName(ValueError):
    """A name that is not one plain path component, or that leads out of its base folder."""


def check_name(value: object, param: str) -> str:
    """``value`` if it is a safe name, else ``UnsafeName`` naming ``param``."""
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise UnsafeName(f"{param}={value!r} is not a plain name: it must match {NAME_PATTERN} "
                         "(letters, digits, '.', '_', '-'; no '/', no '..', at most 64 characters)")
    return value


def safe_child(base: Path | str, name: object, param: str) -> Path:
    """``base / name`` after checking ``name`` and that the path, symlinks followed, stays under
    ``base``. The path is returned as ``base / name`` (not resolved), so callers keep the folder
    they configured."""
    check_name(name, param)
    base = Path(base)
    root = base.resolve()
    path = base / str(name)
    real = path.resolve()
    if real != root and root not in real.parents:
        raise UnsafeName(f"{param}={name!r}: {path} leads out of {base} (to {real}); refusing to follow it")
    return path


def stored_root(root: str | None, data_root: str | Path) -> str | None:
    """An image folder as the ``images`` table records it, as a path: a relative one is relative to
    the data root (so a root moved whole keeps its images), an absolute one is taken as it is."""
    if not root:
        return root
    return root if Path(root).is_absolute() else str(Path(data_root) / root)
