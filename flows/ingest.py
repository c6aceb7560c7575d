"""The ingest flow: clean one VisDial split into Lance tables, gate it with Great Expectations."""

from __future__ import annotations

from prefect import flow

from ingest.clean import counts_markdown
from schemas.ingest import IngestConfig, IngestResult
from schemas.validate import ValidationFailed
from tasks.ingest import clean_task, validate_task, write_task
from tasks.runtime import logger, publish_markdown, run_id


@flow(name="ingest", log_prints=True)
def ingest_flow(config: IngestConfig) -> IngestResult:
    """Clean ``config.visdial`` + ``config.images`` into ``images``/``dialogs``/``turns``.

    Returns the table versions written and the counts kept and dropped per reason.
    """
    out = clean_task(config)
    reports = validate_task(out)
    publish_markdown(
        "ingest-validation", "\n".join(r.markdown() for r in reports), "Great Expectations: ingest"
    )
    failed = [r for r in reports if not r.success]
    if failed:
        raise ValidationFailed("ingest validation failed:\n" + "\n".join(r.markdown() for r in failed))
    versions = write_task(config.lance_uri, out, f"ingest-{run_id()}")
    result = IngestResult(versions=versions, counts=out.counts())
    publish_markdown("ingest-counts", counts_markdown(result.counts), "Rows kept and dropped per reason")
    logger().info("ingest done: %s; versions %s", result.counts, result.versions)
    return result
