"""The embed stage's Prefect tasks: thin wrappers around :mod:`embed` (plan, compute one shard,
merge, tag and quarantine, index), the shard cache key and the storage its results persist in.

A shard's task caches on its content key (:func:`embed.plan.content_key`: rows, model fingerprint,
preprocessing, :data:`embed.plan.RESULT_VERSION`), results persisted under the data root (JSON, the
rows in an Arrow file beside it), so a killed run resumes at the first unfinished shard.
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from embed.compute import embed_shard
from embed.plan import ModelArgs, Plan, Shard, plan
from embed.shard import ShardPayload
from embed.write import finish, index_tables
from schemas.embed import EmbedConfig
from schemas.quarantine import Rejection
from storage.lance import MergeResult, connect, merge
from tasks.runtime import CheckedResults, checked_storage


class ShardResults(CheckedResults):
    """Where shard results persist: read back only as JSON of ``ShardPayload``."""

    _block_type_name = "mmem embed shard results"
    result_model = ShardPayload


def shard_cache_key(context, parameters) -> str:
    """The shard's content key: the same rows, model and preprocessing give the same result."""
    return parameters["shard"].key


def results_storage(config: EmbedConfig) -> ShardResults:
    """Shard results persist (JSON) under the data root, so caches do not leak between data roots (on
    a multi-host Dask cluster the data root must be shared storage)."""
    return checked_storage(ShardResults, config.results_dir, "mmem-embed")


def embed_shard_result(shard: Shard, model: ModelArgs, rows_dir: str, workers: int = 0, pool: str = "process",
                       decode: str = "cpu") -> ShardPayload:
    """:func:`embed.compute.embed_shard`, its rows written under ``rows_dir``, as the JSON its task
    persists."""
    return embed_shard(shard, model, workers, pool, decode).payload(rows_dir)


embed_shard_task = task(
    embed_shard_result,
    name="embed-shard",
    task_run_name="embed-{shard.kind}-{shard.index}",
    cache_key_fn=shard_cache_key,
    persist_result=True,
    result_serializer="json",
    retries=1,
    retry_delay_seconds=5,
)


@task(name="embed-plan", cache_policy=NO_CACHE)
def plan_task(config: EmbedConfig) -> Plan:
    """Read the inputs and the tables: every shard, and those not embedded yet."""
    return plan(connect(config.lance_uri), config)


@task(name="embed-merge", cache_policy=NO_CACHE, task_run_name="embed-merge-{name}")
def merge_task(db, name: str, rows) -> MergeResult:
    return merge(db, name, rows)


@task(name="embed-finish", cache_policy=NO_CACHE)
def finish_task(lance_uri: str, merged: dict[str, tuple[int, int]], rejections: list[Rejection],
                label: str) -> dict[str, int]:
    """Tag what the run changed, quarantine its rejections; the versions after the run."""
    return finish(connect(lance_uri), merged, rejections, label)


index_task = task(index_tables, name="index-embeddings", cache_policy=NO_CACHE)
