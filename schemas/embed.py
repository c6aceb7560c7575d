"""Embed: the ``image_embeddings`` and ``text_embeddings`` tables, the text key, and the config."""

from __future__ import annotations

import hashlib
import unicodedata
from pathlib import Path
from typing import ClassVar, Literal

import pyarrow as pa
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from schemas.config import MAX_WORKERS, StageConfig, Trusted
from schemas.results import StageResult
from schemas.tables import register

EMBED_DIM = 1024  # ImageBind-Huge's joint space, both towers


def normalise_text(text: str) -> str:
    """The form a text is embedded and keyed in: NFKC, collapsed whitespace, stripped."""
    return " ".join(unicodedata.normalize("NFKC", text).split())


def text_hash(text: str) -> str:
    """Key of ``text_embeddings``: identical normalised texts are embedded once."""
    return hashlib.sha256(normalise_text(text).encode("utf-8")).hexdigest()[:32]


def turn_text(question: str, answer: str) -> str:
    """A turn is embedded as its question and answer in one string."""
    return f"Q: {question} A: {answer}"


IMAGE_EMBEDDINGS = register(
    "image_embeddings",
    pa.schema(
        [
            pa.field("image_id", pa.int64(), nullable=False),
            pa.field("vector", pa.list_(pa.float32(), EMBED_DIM), nullable=False),
            pa.field("model", pa.string(), nullable=False),  # model fingerprint
            pa.field("preprocess", pa.string(), nullable=False),  # preprocessing version
            # ``images.sha256`` of the bytes embedded: a changed image is re-embedded, not kept stale
            pa.field("image_sha256", pa.string(), nullable=False),
        ]
    ),
    key=("image_id",),
    doc="L2-normalised ImageBind image embedding per image.",
)

TEXT_EMBEDDINGS = register(
    "text_embeddings",
    pa.schema(
        [
            pa.field("text_hash", pa.string(), nullable=False),
            pa.field("text", pa.string(), nullable=False),
            pa.field("vector", pa.list_(pa.float32(), EMBED_DIM), nullable=False),
            pa.field("model", pa.string(), nullable=False),
            pa.field("preprocess", pa.string(), nullable=False),
        ]
    ),
    key=("text_hash",),
    doc="L2-normalised ImageBind text embedding per distinct normalised text (turns and captions).",
)


class EmbedConfig(StageConfig):
    """Parameters of the embed flow (section ``[embed]``, env ``MMEM_EMBED_*``)."""

    model_config = SettingsConfigDict(env_prefix="MMEM_EMBED_")
    section: ClassVar[str] = "embed"

    checkpoint: Path | None = Field(
        default=None,
        description="imagebind_huge.pth; unset: MMEM_IMAGEBIND_CHECKPOINT, the cache, else downloaded once.")
    tiny: bool = Field(default=False, description="Use a tiny random-weight ImageBind (tests, demo).")
    seed: int = Field(default=0, ge=0, lt=2**32, description="Seed of the tiny model's random weights.")
    random_weights: bool = Field(default=False,
                                 description="Benchmarks only: ImageBind-Huge with random weights.")
    compile: bool = Field(default=False,
                          description="torch.compile the model (CUDA; batches padded to one shape).")
    device: Literal["auto", "cuda", "cpu"] = "auto"
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        default="auto", description="Compute dtype; auto = bfloat16 on CUDA, float32 on CPU.")
    shard_rows: int = Field(default=4096, ge=1, le=1_000_000,
                            description="Rows per shard (one Prefect task each).")
    batch_size: int = Field(default=256, ge=1, le=65_536, description="Images or texts per forward pass.")
    decode_workers: int = Field(default=0, ge=0, le=MAX_WORKERS,
                                description="Processes decoding images per worker; 0 = one per core.")
    decode_pool: Literal["process", "thread"] = Field(
        default="process", description="Decode images in worker processes, or in threads of the process "
        "that feeds the GPU (PIL releases the GIL while decoding and resizing; no pixels cross a pipe).")
    image_decode: Literal["cpu", "gpu"] = Field(
        default="cpu", description="Where JPEGs decode and resize: worker processes (PIL), or the model's "
        "GPU for baseline JPEGs (nvJPEG in the feeding process; the workers only read them; progressive, "
        "CMYK and other formats still on the CPU). CPU-only runs ignore gpu.")
    concurrent_shards: int = Field(default=2, ge=1, le=MAX_WORKERS,
                                   description="Shards in flight per flow (local runner).")
    merge_rows: int = Field(default=65536, ge=1, le=10_000_000,
                            description="Rows buffered before each merge into Lance.")
    index_min_rows: int = Field(default=100_000, ge=1, le=10**12,
                                description="Build a vector index once a table has this many rows.")
    early_index: bool = Field(
        default=True, description="Index a table as soon as its last shard is merged, while the other "
        "table's shards run (the build's CPU threads then compete with the image decoders); false: "
        "every index after the last shard.")
    splits: list[str] | None = Field(default=None, description="Splits to embed; default all.")
    image_roots: dict[str, Path] = Field(
        default_factory=dict, description="split -> image folder, overriding the root stored by ingest."
    )
    dask_address: str | None = Field(
        default=None, description="Run shards on the Dask cluster at this `tls://` address (one worker per "
        "GPU; credentials from DASK_DISTRIBUTED__COMM__TLS__*), or `local` for a LocalCluster of "
        "`dask_workers` processes on this machine (127.0.0.1, temporary TLS credentials). A served run may "
        "name only an address its `mmem serve` allows.")
    dask_workers: int = Field(default=1, ge=1, le=MAX_WORKERS,
                              description="Worker processes of a `local` Dask cluster.")
    table_versions: dict[str, int | str] = Field(
        default_factory=dict, description="Pinned Lance versions (number or tag) of images/dialogs/turns to "
        "read; default the latest. The pipeline pins the versions ingest wrote.",
    )

    def trusted_values(self) -> Trusted:
        """A remote scheduler runs this process's code and returns what it unpickles: `local` is
        this machine's own cluster and always allowed."""
        base = super().trusted_values()
        if self.dask_address and self.dask_address != "local":
            base.dask_addresses = [self.dask_address]
        return base

    @property
    def results_dir(self) -> Path:
        """Where shard results persist, so a killed run resumes from the last finished shard."""
        return self.cache_dir / "embed"

    @property
    def rows_dir(self) -> Path:
        """The rows of those results, one Arrow IPC file per shard (binary, beside the JSON)."""
        return self.cache_dir / "embed-rows"


class EmbedResult(StageResult):
    """What an embed run did: the model, the rows and shards (up to date in the tables, served from
    their persisted result, computed), the rows merged per table, where the computed shards' time
    went per stream, and the images quarantined per reason. ``versions`` are the embeddings tables
    (what train_memory reads) and the quarantine after the run."""

    model: str = Field(description="Fingerprint of the model that made (or would make) the vectors.")
    images: int = 0
    texts: int = Field(default=0, description="Distinct turn texts and captions.")
    shards: int = 0
    shards_up_to_date: int = Field(default=0, description="Shards whose rows were in the tables already.")
    shards_cached: int = Field(default=0, description="Shards Prefect served from their persisted result.")
    shards_computed: int = 0
    workers: int = Field(default=0, description="Distinct processes that computed shards.")
    image_embeddings_inserted: int = 0
    text_embeddings_inserted: int = 0
    image_embeddings_updated: int = 0
    text_embeddings_updated: int = 0
    merge_seconds: float = 0.0
    # where the run's wall time went: planning, the shards (merges and a table's early index overlap
    # them), tagging and the quarantine, waiting on vector indexes after the last shard; and when
    # each stream's last shard came in
    plan_seconds: float = 0.0
    compute_seconds: float = 0.0
    finish_seconds: float = 0.0
    index_seconds: float = 0.0
    stream_done_seconds: dict[str, float] = Field(
        default_factory=dict,
        description="Per stream (image, text): seconds into the shards when its last one finished.")
    # per stream, the computed shards only: blocked on input vs running forwards (seconds)
    image_input_wait_s: float = 0.0
    image_forward_s: float = 0.0
    text_input_wait_s: float = 0.0
    text_forward_s: float = 0.0
    text_widths: dict[int, int] = Field(default_factory=dict, description="Texts run at each token width.")
    quarantined: int = 0
    # quarantined per reason (the reasons an embed run gives)
    quarantined_image_missing: int = 0
    quarantined_image_unreadable: int = 0
    quarantined_image_outside_root: int = 0
    index: dict[str, str] = Field(default_factory=dict, description="Vector index action per table.")
