"""What a stage run hands back: one pydantic result per stage (each stage's own subclass lives in
its ``schemas/<stage>.py``), so the pipeline flow reads fields instead of guessing at dict keys,
and the CLI, the Prefect UI and a user's script all see the same JSON.

Every result names the table versions it read (``read_versions``) and wrote (``versions``): the
lineage the pipeline hands to the next stage and prints in its summary.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class StageResult(BaseModel):
    """The common part of every stage's result."""

    model_config = ConfigDict(extra="forbid")

    read_versions: dict[str, int] = Field(default_factory=dict, description="Input tables' versions read.")
    versions: dict[str, int] = Field(default_factory=dict, description="Tables' versions after the run.")

    def flat(self) -> dict[str, Any]:
        """One level of ``name: value``: the versions as ``read_<table>`` / ``version_<table>``."""
        out = {
            k: v for k, v in self.model_dump(mode="json").items() if k not in ("read_versions", "versions")
        }
        out.update({f"read_{k}": v for k, v in self.read_versions.items()})
        out.update({f"version_{k}": v for k, v in self.versions.items()})
        return out

    def artifact_rows(self) -> list[dict[str, str]]:
        """The flat result as the rows of a Prefect table artifact (one ``count``/``value`` each)."""
        return [
            {"count": k, "value": v if isinstance(v, str) else json.dumps(v)} for k, v in self.flat().items()
        ]

    def to_json(self) -> str:
        """The JSON the CLI prints (stable keys: scripts parse it)."""
        return self.model_dump_json(indent=2)
