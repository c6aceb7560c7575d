"""Train: the configs of the two training flows (LoRA SFT of Gemma3, the ImageBind memory model).

Every hyperparameter of a run is a field here, so a TOML profile (``schemas/profiles/train-*.toml``)
shows all of it and the artifact manifest records all of it. ``tiny=True`` swaps in tiny
random-weight models of the same architectures and the sizes in ``TINY_*`` below, unless a field
is given explicitly: the tests and the demo run the real code path, quickly.

A flow run's parameters can come from anyone who reaches the Prefect API, so every number has an
upper bound (a typo or a hostile ``batch_size=10**9`` is refused with a 409 before any work) and
``artifact``, which becomes a folder name, must be a plain name (``schemas.paths``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from schemas.config import StageConfig
from schemas.paths import SafeName, safe_child
from schemas.results import StageResult

Device = Literal["auto", "cuda", "cpu"]

# The Prefect event a new artifact version emits (resource labels ``mmem.artifact.name``,
# ``.version``, ``.ref``, ``.kind``, ``.path``); deployments/triggers.py starts evaluation on it.
ARTIFACT_CREATED_EVENT = "mmem.artifact.created"

BIG = 10**7  # steps, samples, checkpoints: far above any real run, far below a value that exhausts memory
SEED_MAX = 2**32 - 1  # numpy's seeds are 32-bit

# What ``tiny=True`` changes, field by field (explicit values still win).
TINY_SFT: dict[str, Any] = {"batch_size": 2, "grad_accum": 1, "save_steps": 5,
                            "learning_rate": 1e-3, "warmup_steps": 0}
TINY_MEMORY: dict[str, Any] = {"qformer_hidden": 32, "qformer_layers": 2, "qformer_heads": 2,
                               "qformer_intermediate": 64, "num_query_tokens": 4, "batch_size": 8,
                               "checkpoint_every": 10, "learning_rate": 1e-3, "eval_limit": 32}


class _TrainConfig(StageConfig):
    """Fields both training flows share."""

    tiny: bool = Field(default=False,
                       description="Tiny random-weight models of the same architectures (tests, demo).")
    artifact: SafeName = Field(description="Artifact name in the store: "
                               "<data_root>/artifacts/<artifact>/v<N>/ "
                               "(letters, digits, '.', '_', '-'; at most 64).")
    device: Device = "auto"
    seed: int = Field(default=0, ge=0, le=SEED_MAX,
                      description="Weights init, data order, LoRA init: the whole run is a function of it.")
    learning_rate: float = Field(default=2e-4, gt=0, le=1)
    weight_decay: float = Field(default=0.0, ge=0, le=1)
    warmup_steps: int = Field(default=0, ge=0, le=BIG)
    epochs: float = Field(default=1.0, gt=0, le=1000)
    max_steps: int | None = Field(default=None, ge=1, le=BIG,
                                  description="Stop after this many optimiser steps.")
    batch_size: int = Field(default=16, ge=1, le=65536)
    limit: int | None = Field(default=None, ge=1, le=BIG,
                              description="Only the first N dialogs (by id) of the train split.")
    keep_checkpoints: int = Field(default=2, ge=1, le=100,
                                  description="Checkpoints kept on disk (the newest).")
    force: bool = Field(default=False,
                        description="Train again even if an artifact with the same fingerprint exists.")

    tiny_defaults: ClassVar[dict[str, Any]] = {}

    @model_validator(mode="before")
    @classmethod
    def _tiny_sizes(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("tiny") in (True, "true", "1", 1, "True"):
            data = {**cls.tiny_defaults, **data}
        return data

    @property
    def checkpoints_dir(self) -> Path:
        return safe_child(self.data_root / "checkpoints", self.artifact, "artifact")

    @property
    def models_dir(self) -> Path:
        """Where tiny base models are written (and where real local weights may be kept)."""
        return self.data_root / "models"

    # Fields that only choose input versions: the fingerprint holds the versions they resolve to, so
    # a run pinned to the newest validated version and an unpinned one are the same run.
    version_selectors: ClassVar[set[str]] = set()

    def fingerprint_fields(self) -> dict[str, Any]:
        """The fields that change what is trained (not where it is written, nor ``force``, nor how
        the input versions were chosen)."""
        return self.model_dump(mode="json", exclude={"data_root", "force", "device", *self.version_selectors})


class SftConfig(_TrainConfig):
    """LoRA SFT of Gemma3-4B-it on ``reminders`` (section ``[train_sft]``, env ``MMEM_TRAIN_SFT_*``)."""

    model_config = SettingsConfigDict(env_prefix="MMEM_TRAIN_SFT_")
    section: ClassVar[str] = "train_sft"
    tiny_defaults: ClassVar[dict[str, Any]] = TINY_SFT
    version_selectors: ClassVar[set[str]] = {"reminders_version"}

    artifact: SafeName = "gemma3-4b-reminders-lora"
    base: Path | None = Field(default=None,
                              description="Local Gemma3-4B-it folder (HF layout); never downloaded.")
    backend: Literal["auto", "unsloth", "peft"] = Field(
        default="auto", description="auto: unsloth FastVisionModel on CUDA, transformers+peft+trl otherwise."
    )
    reminders_version: int | str | None = Field(
        default=None,
        description="Pinned Lance version (number or tag) of reminders; default the latest validated."
    )
    images_root: dict[str, Path] = Field(
        default_factory=dict,
        description="split -> image folder, for rows whose image_url is not a local file."
    )
    system_prompt: str = (
        "You are a helpful assistant that looks at an image and the conversation about it. First write a "
        "<reminder>...</reminder> that recalls what the conversation established, then answer the last "
        "question in one sentence."
    )
    # LoRA (the report: r=16, alpha=16, dropout 0, vision and language layers, attention and MLP)
    lora_r: int = Field(default=16, ge=1, le=1024)
    lora_alpha: int = Field(default=16, ge=1, le=4096)
    lora_dropout: float = Field(default=0.0, ge=0, lt=1)
    finetune_vision_layers: bool = True
    finetune_language_layers: bool = True
    finetune_attention_modules: bool = True
    finetune_mlp_modules: bool = True
    load_in_4bit: bool = Field(default=True, description="4-bit (bitsandbytes NF4) base weights; CUDA only.")
    gradient_checkpointing: bool = True
    # optimisation (unsloth's Gemma3 vision notebook values)
    learning_rate: float = Field(default=2e-4, gt=0, le=1)
    weight_decay: float = Field(default=0.01, ge=0, le=1)
    warmup_steps: int = Field(default=5, ge=0, le=BIG)
    lr_scheduler: str = "linear"
    optim: str = Field(default="adamw_torch",
                       description="transformers optimiser name (adamw_8bit needs bitsandbytes).")
    batch_size: int = Field(default=2, ge=1, le=1024, description="Per-device batch.")
    grad_accum: int = Field(default=4, ge=1, le=1024)
    max_seq_length: int = Field(default=2048, ge=16, le=131072,
                                description="Gemma3's context is 128k tokens.")
    val_fraction: float = Field(default=0.05, ge=0, lt=1,
                                description="Train dialogs held out (by id hash) for eval loss.")
    save_steps: int = Field(default=100, ge=1, le=BIG, description="Checkpoint every N optimiser steps.")
    logging_steps: int = Field(default=1, ge=1, le=BIG)
    seed: int = Field(default=3407, ge=0, le=SEED_MAX)


class MemoryTrainConfig(_TrainConfig):
    """The Extraction-Memorization memory model (section ``[train_memory]``, env ``MMEM_TRAIN_MEMORY_*``)."""

    model_config = SettingsConfigDict(env_prefix="MMEM_TRAIN_MEMORY_")
    section: ClassVar[str] = "train_memory"
    tiny_defaults: ClassVar[dict[str, Any]] = TINY_MEMORY
    version_selectors: ClassVar[set[str]] = {"table_versions"}

    artifact: SafeName = "memory-model"
    llm: Path | None = Field(default=None,
                             description="Local causal LM folder (LLaMA-3.2-1B); never downloaded.")
    load_in_4bit: bool = Field(default=False, description="Frozen LM in 4-bit (bitsandbytes NF4); CUDA only.")
    init_from: Path | None = Field(
        default=None,
        description="Warm start: a memory-model artifact folder or .safetensors (e.g. a Q-Former)."
    )
    table_versions: dict[str, int | str] = Field(
        default_factory=dict,
        description="Pinned Lance versions of turns/dialogs/image_embeddings/text_embeddings."
    )
    split: str = "train"
    eval_split: str = Field(default="val",
                            description="Split whose turns give the eval loss (first eval_limit).")
    eval_limit: int = Field(default=1024, ge=0, le=BIG)
    # architecture (the report's, after MA-LMM / BLIP-2)
    num_query_tokens: int = Field(default=32, ge=1, le=1024)
    qformer_hidden: int = Field(default=768, ge=1, le=8192)
    qformer_layers: int = Field(default=12, ge=1, le=48)
    qformer_heads: int = Field(default=12, ge=1, le=128)
    qformer_intermediate: int = Field(default=3072, ge=1, le=32768)
    qformer_cross_attention_frequency: int = Field(default=2, ge=1, le=48)
    qformer_dropout: float = Field(default=0.1, ge=0, lt=1,
                                   description="Active only when the Q-Former trains.")
    train_qformer: bool = Field(default=False, description="Also train the Q-Former and its query tokens.")
    train_llm_proj: bool = Field(default=False,
                                 description="Also train llm_proj (the report kept it frozen).")
    prompt_template: str = "Question: {question} Answer:"
    max_prompt_tokens: int = Field(default=48, ge=4, le=8192)
    max_answer_tokens: int = Field(default=24, ge=2, le=8192)
    # objectives
    infonce_weight: float = Field(default=0.0, ge=0, le=100,
                                  description="Multi-positive InfoNCE (retrieval) loss weight.")
    infonce_temperature: float = Field(default=0.07, gt=0, le=100)
    # optimisation (the report: batch 16, 2 epochs)
    epochs: float = Field(default=2.0, gt=0, le=1000)
    batch_size: int = Field(default=16, ge=1, le=65536)
    learning_rate: float = Field(default=1e-4, gt=0, le=1)
    weight_decay: float = Field(default=0.05, ge=0, le=1)
    warmup_steps: int = Field(default=100, ge=0, le=BIG)
    grad_clip: float = Field(default=1.0, gt=0, le=1000)
    dtype: Literal["auto", "bf16", "fp32"] = Field(default="auto",
                                                   description="auto: bf16 on CUDA, fp32 on CPU.")
    checkpoint_every: int = Field(default=1000, ge=1, le=BIG,
                                  description="Checkpoint every N optimiser steps.")


class TrainResult(StageResult):
    """What a training flow hands back (``mmem train sft`` / ``mmem train memory`` print it): the
    artifact version, whether this run created it or found it up to date, and what it was trained
    on. ``read_versions`` are the input tables' Lance versions; a training run writes no table."""

    artifact: str = Field(description="The version's reference, ``<name>:v<N>``.")
    name: str
    version: int
    path: str
    created: bool = Field(description="False when a version with the same fingerprint already existed.")
    fingerprint: str
    inputs: dict[str, dict[str, Any]] = Field(default_factory=dict,
                                              description="The manifest's pinned inputs.")
    metrics: dict[str, Any] = Field(default_factory=dict)

    @classmethod
    def of(cls, art: Any, created: bool, fingerprint: str) -> TrainResult:
        """The result for artifact version ``art`` (a ``storage.artifacts.ArtifactVersion``)."""
        inputs = art.manifest.get("inputs") or {}
        read = {k: int(v["version"]) for k, v in inputs.items() if isinstance(v, dict) and "version" in v}
        return cls(artifact=art.ref, name=art.name, version=art.version, path=str(art.path), created=created,
                   fingerprint=fingerprint, inputs=inputs, metrics=art.manifest.get("metrics") or {},
                   read_versions=read)
