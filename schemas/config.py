"""One configuration system for every flow.

Each flow takes one pydantic-settings model as its parameter, so the Prefect UI renders it as a
form and validates it. Values come from, lowest to highest priority: the field defaults, the
flow's section of a TOML profile (``[embed]`` ...; top-level keys apply to every flow), ``MMEM_*``
environment variables (``MMEM_DATA_ROOT``, ``MMEM_EMBED_BATCH_SIZE`` ...), and explicit overrides
(the command line). Every path defaults under one data root.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, ClassVar, Self

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, EnvSettingsSource, SettingsConfigDict


class StageConfig(BaseSettings):
    """Fields every flow shares; subclasses set ``section`` and their own ``env_prefix``."""

    model_config = SettingsConfigDict(env_prefix="MMEM_", extra="forbid", populate_by_name=True)
    section: ClassVar[str] = ""

    data_root: Path = Field(
        default=Path("mmem-data"),
        validation_alias=AliasChoices("data_root", "MMEM_DATA_ROOT"),
        description="Root under which every table, artifact and cache lives.",
    )

    @property
    def lance_uri(self) -> str:
        return str(self.data_root / "lance")

    @property
    def artifacts_dir(self) -> Path:
        return self.data_root / "artifacts"

    @property
    def cache_dir(self) -> Path:
        return self.data_root / "cache"

    @classmethod
    def load(cls, profile: str | Path | None = None, **overrides: Any) -> Self:
        """Defaults < profile < environment < overrides (``None`` overrides are ignored)."""
        values: dict[str, Any] = read_profile_section(profile, cls.section) if profile else {}
        values.update(EnvSettingsSource(cls)())  # the environment beats the profile ...
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)  # ... and explicit overrides beat both


def read_profile_section(profile: str | Path, section: str) -> dict[str, Any]:
    """Top-level scalar keys of a TOML profile plus its ``[section]`` table."""
    path = Path(profile)
    if not path.is_file():
        raise FileNotFoundError(f"profile {path} does not exist")
    with path.open("rb") as fh:
        try:
            doc = tomllib.load(fh)
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"profile {path} is not valid TOML: {exc}") from exc
    values = {k: v for k, v in doc.items() if not isinstance(v, dict)}
    values.update(doc.get(section, {}) if section else {})
    return values
