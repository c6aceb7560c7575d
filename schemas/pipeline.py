"""The parent pipeline's config: which splits to ingest, which stages to run, and each stage's
own config (the same models the stage flows take), so one profile drives the whole DAG.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal, Self

from pydantic import BaseModel, Field, SerializeAsAny, model_validator
from pydantic_settings import SettingsConfigDict

from schemas.config import MAX_WORKERS, StageConfig, check_as_a_whole
from schemas.embed import EmbedConfig
from schemas.evaluate import EvaluateConfig
from schemas.reminders import RemindersConfig
from schemas.results import StageResult
from schemas.train import MemoryTrainConfig, SftConfig

Stage = Literal["ingest", "embed", "reminders", "train_sft", "train_memory", "evaluate"]
STAGES: tuple[Stage, ...] = ("ingest", "embed", "reminders", "train_sft", "train_memory", "evaluate")

# What each stage needs to have succeeded first: a failed stage skips exactly its dependents.
DEPENDS_ON: dict[Stage, tuple[Stage, ...]] = {
    "ingest": (),
    "embed": ("ingest",),
    "reminders": ("ingest",),
    "train_sft": ("reminders",),
    "train_memory": ("embed",),
    "evaluate": ("train_sft", "train_memory"),
}

SUB_CONFIGS: dict[str, type[StageConfig]] = {
    "embed": EmbedConfig,
    "reminders": RemindersConfig,
    "train_sft": SftConfig,
    "train_memory": MemoryTrainConfig,
    "evaluate": EvaluateConfig,
}


class SplitInput(BaseModel):
    """One VisDial split to ingest."""

    split: str = Field(description="train / val / test (for information; the file says which).")
    visdial: Path
    images: Path
    coco: Path | None = None


class PipelineConfig(StageConfig):
    """The whole DAG (section ``[pipeline]`` plus each stage's own section of the same profile)."""

    model_config = SettingsConfigDict(env_prefix="MMEM_PIPELINE_")
    section: ClassVar[str] = "pipeline"

    inputs: list[SplitInput] = Field(default_factory=list, description="VisDial splits to ingest.")
    stages: list[Stage] = Field(
        default_factory=lambda: list(STAGES), description="Stages to run, in DAG order."
    )
    ingest_workers: int = Field(default=2, ge=1, le=MAX_WORKERS)
    embed: EmbedConfig = Field(default_factory=EmbedConfig)
    reminders: RemindersConfig = Field(default_factory=RemindersConfig)
    train_sft: SftConfig = Field(default_factory=SftConfig)
    train_memory: MemoryTrainConfig = Field(default_factory=MemoryTrainConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)

    @model_validator(mode="wrap")
    @classmethod
    def _trusted_as_a_whole(cls, data: Any, handler: Any) -> Self:
        """Stage configs built here (defaults included) are checked as the pipeline runs them."""
        return check_as_a_whole(handler, data)

    @classmethod
    def load(cls, profile: str | Path | None = None, **overrides: Any) -> Self:
        """Each stage's config from its own profile section and env, all under one data root."""
        own = {k: v for k, v in overrides.items() if k not in SUB_CONFIGS}
        base = super().load(profile, **own)
        subs = {name: sub.load(profile, data_root=base.data_root, **(overrides.get(name) or {}))
                for name, sub in SUB_CONFIGS.items()}
        return base.model_copy(update=subs)

    def trust_scope(self) -> list[StageConfig]:
        """The pipeline and each stage's config as the stage will run it (the pipeline's data root)."""
        return [self, *(self.stage(name) for name in SUB_CONFIGS)]

    def stage(self, name: str) -> StageConfig:
        """A stage's config, with the pipeline's data root (one root for the whole DAG)."""
        return getattr(self, name).model_copy(update={"data_root": self.data_root})


class PipelineResult(BaseModel):
    """What the parent flow did: each stage's status and the result of each stage that ran (ingest:
    one result per split), the fields the next stage's pins were read from."""

    status: dict[str, str] = Field(default_factory=dict)
    ingest: dict[str, SerializeAsAny[StageResult]] = Field(default_factory=dict)
    embed: SerializeAsAny[StageResult] | None = None
    reminders: SerializeAsAny[StageResult] | None = None
    train_sft: SerializeAsAny[StageResult] | None = None
    train_memory: SerializeAsAny[StageResult] | None = None
    evaluate: SerializeAsAny[StageResult] | None = None

    def ingested(self) -> dict[str, int]:
        """The latest version ingest wrote of each of images/dialogs/turns (every split writes the
        same tables, one after another: the last split's version holds them all)."""
        out: dict[str, int] = {}
        for split in self.ingest.values():
            for name, v in split.versions.items():
                if name in ("images", "dialogs", "turns"):
                    out[name] = max(v, out.get(name, v))
        return out
