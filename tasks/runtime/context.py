"""What a step needs from the orchestrator: the run id, a logger, artifacts, the trust check, and
the bridges that carry the pure stage code's log lines and progress into the run's page. Each
works inside a Prefect run and degrades to plain logging outside one, so the same step runs from a
test, a script or a flow.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.context import FlowRunContext, TaskRunContext
from prefect.exceptions import MissingContextError
from prefect.logging import get_run_logger

from schemas.config import Trusted
from storage import progress


def in_prefect_run() -> bool:
    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


def run_id() -> str:
    """The current flow run's id, or ``local`` outside Prefect."""
    ctx = FlowRunContext.get()
    if ctx is not None and ctx.flow_run is not None:
        return str(ctx.flow_run.id)
    tctx = TaskRunContext.get()
    if tctx is not None and tctx.task_run.flow_run_id is not None:
        return str(tctx.task_run.flow_run_id)
    return "local"


def logger() -> logging.Logger | logging.LoggerAdapter:
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("mmem")


def artifact_key(text: str) -> str:
    """Prefect artifact keys allow lower-case letters, digits and dashes only."""
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")


def publish_table(key: str, rows: list[Mapping[str, Any]], description: str) -> None:
    if in_prefect_run():
        create_table_artifact(key=artifact_key(key), table=[dict(r) for r in rows], description=description)


def publish_markdown(key: str, markdown: str, description: str) -> None:
    if in_prefect_run():
        create_markdown_artifact(key=artifact_key(key), markdown=markdown, description=description)


# --- a run's parameters choose data, never trust ---------------------------------------------


def enforce_trust(config) -> None:
    """Refuse, before any work, a run whose config names a data root, scheduler, host or secret its
    process does not allow (``schemas.config.Trusted``). Configs are already checked when built
    under ``mmem serve``'s allow-list; this also covers a deployment served by another process
    (no allow-list): it may name only what this process's own environment and defaults would."""
    trusted = Trusted.current()
    if trusted is None:
        ctx = FlowRunContext.get()
        if ctx is None or ctx.flow_run is None or ctx.flow_run.deployment_id is None:
            return  # the process that called the flow chose these values itself
        trusted = Trusted.of(type(config).load())
    for c in config.trust_scope():
        trusted.check(c)


# --- bridges from the pure stage code into the run's page --------------------------------------


class ArtifactSink:
    """Inside a Prefect run, each progress bar of the stage code is also a progress artifact."""

    def start(self, desc: str) -> Any:
        if not in_prefect_run():
            return None
        return create_progress_artifact(0.0, key=artifact_key(desc) or None, description=desc)

    def update(self, handle: Any, percent: float) -> None:
        update_progress_artifact(handle, progress=percent)


class RunLogs(logging.Handler):
    """Inside a Prefect run, a stage package's log record is written again through the run's logger
    (the terminal and the run's logs in the UI, as the task's own lines are); outside one, nothing."""

    def emit(self, record: logging.LogRecord) -> None:
        if not in_prefect_run():
            return
        try:
            run_log = get_run_logger()
        except MissingContextError:
            return
        run_log.log(record.levelno, "%s", record.getMessage(), exc_info=record.exc_info)


def bridge_stage_logs() -> None:
    """Stage packages log to the ``mmem`` logger tree with the standard library only (they never
    import Prefect); carry those lines, at INFO and above, into the run's logs, and their progress
    bars into progress artifacts. Idempotent."""
    stage_logger = logging.getLogger("mmem")
    if stage_logger.level == logging.NOTSET:
        stage_logger.setLevel(logging.INFO)
    if not any(isinstance(h, RunLogs) for h in stage_logger.handlers):
        stage_logger.addHandler(RunLogs())
    progress.add_sink(ArtifactSink())
