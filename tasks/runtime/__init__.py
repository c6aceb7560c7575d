"""The Prefect glue every task wrapper shares: run context and artifacts (``context``), typed result
storage (``results``), the LLM hosts' global slots (``slots``) and Secret-block auth (``secrets``).
Importing it bridges the stage packages' logs and progress into Prefect runs, and makes Prefect
Secret blocks readable as LLM hosts' auth sources."""

from storage.progress import Progress, ProgressFn, track
from tasks.runtime import secrets as _secrets  # noqa: F401 -- registers the Secret-block reader
from tasks.runtime.context import (
    artifact_key,
    bridge_stage_logs,
    enforce_trust,
    in_prefect_run,
    logger,
    publish_markdown,
    publish_table,
    run_id,
)
from tasks.runtime.results import CheckedResults, checked_storage

bridge_stage_logs()

__all__ = [
    "CheckedResults",
    "Progress",
    "ProgressFn",
    "artifact_key",
    "bridge_stage_logs",
    "checked_storage",
    "enforce_trust",
    "in_prefect_run",
    "logger",
    "publish_markdown",
    "publish_table",
    "run_id",
    "track",
]
