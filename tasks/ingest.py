"""Prefect tasks of the ingest stage: thin wrappers around :mod:`ingest` (the flow is the single
writer of the tables)."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from ingest.clean import IngestOutput, clean, validate_tables
from ingest.write import write
from schemas.ingest import IngestConfig
from schemas.validate import ValidationReport

# Inputs are large Arrow tables: hashing them for a cache key would cost more than the work;
# re-runs are cheap anyway because ``write`` only writes what changed.


@task(name="clean-visdial", cache_policy=NO_CACHE)
def clean_task(config: IngestConfig, progress: bool = True) -> IngestOutput:
    return clean(config, progress)


@task(name="validate-ingest", cache_policy=NO_CACHE)
def validate_task(out: IngestOutput) -> list[ValidationReport]:
    return validate_tables(out)


@task(name="write-ingest-tables", retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE)
def write_task(lance_uri: str, out: IngestOutput, run_label: str) -> dict[str, int]:
    return write(lance_uri, out, run_label)
