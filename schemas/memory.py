"""Memory: the ``memories`` table and the memory config (scoring weights, policy, index).

The default weights and half-life are the ones ``benchmarks/memory_bench.py --quality`` picked
on its tuning dialogs (see that script's output for the figures and the exact command); change
them there first, then here.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

import pyarrow as pa
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from schemas.config import StageConfig
from schemas.embed import EMBED_DIM
from schemas.results import StageResult
from schemas.tables import register

TRANSIENT, DURABLE = "transient", "durable"
KINDS = (TRANSIENT, DURABLE)

MEMORIES = register(
    "memories",
    pa.schema(
        [
            pa.field("memory_id", pa.string(), nullable=False),
            pa.field("owner", pa.string(), nullable=False),
            pa.field("modality", pa.string(), nullable=False),  # text | image
            pa.field("text", pa.string()),  # the fact, or an image's caption
            pa.field("image_ref", pa.string()),
            pa.field("vector", pa.list_(pa.float32(), EMBED_DIM), nullable=False),
            pa.field(
                "model", pa.string()
            ),  # embedder fingerprint: vectors of other models are not comparable
            pa.field("created_at", pa.timestamp("us", tz="UTC"), nullable=False),
            pa.field("last_accessed_at", pa.timestamp("us", tz="UTC"), nullable=False),
            pa.field("access_count", pa.int64(), nullable=False),
            pa.field("saliency", pa.float32(), nullable=False),
            pa.field("kind", pa.string(), nullable=False),  # transient | durable
            pa.field("subject_key", pa.string()),
            pa.field("superseded_by", pa.string()),
            pa.field("session_id", pa.string()),
            pa.field("source", pa.string()),  # e.g. visdial:<image_id>:<turn> for seeded memories
        ]
    ),
    key=("memory_id",),
    doc="An agent's long-term multimodal memories.",
)


class MemoryConfig(StageConfig):
    """Memory settings (section ``[memory]``, env ``MMEM_MEMORY_*``)."""

    model_config = SettingsConfigDict(env_prefix="MMEM_MEMORY_")
    section: ClassVar[str] = "memory"

    # the embedder (the embed stage's model, through embed.model.load_embedder)
    checkpoint: Path | None = Field(default=None, description="Local imagebind_huge.pth (never downloaded).")
    tiny: bool = Field(default=False, description="Tiny random-weight ImageBind (tests, demo).")
    device: Literal["auto", "cuda", "cpu"] = "auto"

    # score = sum(w_i * term_i) / sum(w_i), every term in [0, 1]
    w_similarity: float = Field(
        default=3.0, ge=0, description="Weight of cosine similarity (negatives clipped to 0)."
    )
    w_recency: float = Field(
        default=1.0, ge=0, description="Weight of 0.5 ** (hours since last access / half-life)."
    )
    w_frequency: float = Field(
        default=0.0, ge=0, description="Weight of log1p(access_count) / log1p(saturation)."
    )
    w_saliency: float = Field(default=0.5, ge=0, description="Weight of the saliency given when remembered.")
    # `python benchmarks/memory_bench.py quality` (2026-11-23): best tune MRR 0.3644 at half-life 6 h
    # (w_sal 0.25; 0.3642 with 0.5); at 24 h the test MRR was 0.245 vs 0.352 (revisit R@1 0.21 vs 0.97)
    half_life_hours: float = Field(
        default=6.0, gt=0, le=1e6, description="Recency halves every this many hours."
    )
    frequency_saturation: int = Field(
        default=32, ge=1, le=1_000_000, description="Access count at which frequency reaches 1."
    )
    candidates: int = Field(
        default=64, ge=1, le=10_000, description="Nearest memories re-ranked by the full score."
    )
    touch_flush_memories: int = Field(
        default=256,
        ge=1,
        le=1_000_000,
        description="Recalled memories whose access stats are written together.",
    )
    touch_flush_seconds: float = Field(
        default=60.0,
        ge=0,
        le=86_400,
        description="Access stats are written at the latest this long after a recall.",
    )
    refresh_seconds: float = Field(default=1.0, ge=0, le=3600,
                                   description="Reads see other processes' writes at most this late.")

    # upkeep (in the background of an open store, or `mmem memory maintain` / the memory-upkeep deployment)
    compact_rows: int = Field(default=16_384, ge=2, le=1_048_576,
                              description="Fragments smaller than this are folded into each other.")
    fold_rows: int = Field(default=1024, ge=2, le=1_048_576,
                           description="An open store folds fragments smaller than this into each other.")
    upkeep_small_fragments: int = Field(
        default=32,
        ge=2,
        le=100_000,
        description="An open store folds small fragments once this many pile up.",
    )
    upkeep_unindexed_rows: int = Field(
        default=20_000,
        ge=1,
        le=10**9,
        description="An open store indexes new rows once this many are outside the vector index.",
    )
    keep_versions_seconds: float = Field(
        default=600.0,
        ge=0,
        le=365 * 86_400,
        description="Upkeep removes untagged table versions older than this.",
    )
    upkeep_commits: int = Field(
        default=1000,
        ge=1,
        le=10**9,
        description="An open store removes old versions once this many commits piled up.",
    )

    # hybrid search: vector candidates plus LanceDB full-text candidates, BM25 blended into similarity
    hybrid: bool = Field(default=False, description="Also search the text with LanceDB full-text search.")
    keyword_weight: float = Field(
        default=0.3,
        ge=0,
        le=1,
        description="Share of the similarity term given to BM25 (scaled by the best hit).",
    )

    # policy
    default_saliency: float = Field(default=0.5, ge=0, le=1)
    transient_ttl_hours: float = Field(
        default=24.0,
        gt=0,
        le=1e6,
        description="Transient memories whose session never ended expire after this.",
    )

    # the vector index (below index_min_rows the search is exact: cheap, and an index needs rows to train)
    index_min_rows: int = Field(default=50_000, ge=1, le=10**9)
    # IVF_PQ + refine_factor 1: PQ codes pick the candidates, then every candidate's distance is
    # recomputed from its stored vector, so the similarity term is exact (benchmarks/memory_bench.py)
    index_type: Literal["IVF_HNSW_SQ", "IVF_PQ", "IVF_FLAT"] = "IVF_PQ"
    index_partitions: int | None = Field(
        default=None, ge=1, le=65_536, description="IVF partitions (default sqrt(rows))."
    )
    index_m: int = Field(default=20, ge=4, le=256, description="HNSW edges per node.")
    index_ef_construction: int = Field(default=150, ge=10, le=10_000)
    # 8 probes found 0.989-0.990 of the exact top 10 at 827,830 memories, 10 probes 0.997
    # (benchmarks/memory_write_bench.py's queries; the target is 0.99)
    nprobes: int = Field(default=10, ge=1, le=65_536, description="IVF partitions searched per query.")
    ef: int = Field(default=100, ge=1, le=100_000, description="HNSW search breadth.")
    refine_factor: int | None = Field(
        default=1, ge=1, le=1000, description="Re-read this many x candidates exactly (IVF_PQ)."
    )

    # seeding from VisDial
    seed_turn_spacing_s: float = Field(
        default=60.0, gt=0, le=1e7, description="Seconds between seeded turns of a dialog."
    )
    seed_dialog_gap_hours: float = Field(
        default=24.0, gt=0, le=1e6, description="Hours between dialogs of one owner."
    )
    seed_image_saliency: float = Field(default=0.7, ge=0, le=1)
    seed_turn_saliency: float = Field(default=0.5, ge=0, le=1)


class UpkeepResult(StageResult):
    """What one ``memory-upkeep`` run did (``mmem memory maintain`` prints the same keys); an index
    field names the index kind built by this run, ``None`` where none was built."""

    rows: int
    small_fragments_folded: int = 0
    indexes_rebuilt: list[str] = Field(default_factory=list)
    index_segments_merged: int = 0
    old_versions_removed: int = 0
    expired_purged: int | None = None
    vector_index: str | None = None
    owner_index: str | None = None
    memory_id_index: str | None = None
    superseded_by_index: str | None = None
    session_id_index: str | None = None
    created_at_index: str | None = None
    subject_key_index: str | None = None
    kind_index: str | None = None
    model_index: str | None = None
