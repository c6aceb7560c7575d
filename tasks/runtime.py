"""What a step needs from the orchestrator, in one place: the run id, a logger, progress,
artifacts. Each works inside a Prefect run and degrades to plain logging outside one, so the
same step runs from a test, a script or a flow.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.context import FlowRunContext, TaskRunContext
from prefect.exceptions import MissingContextError
from prefect.logging import get_run_logger


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


class Progress:
    """A terminal progress bar plus a Prefect log line every ``log_every`` fraction of the work."""

    def __init__(self, total: int, desc: str, *, log_every: float = 0.1, enabled: bool = True) -> None:
        from tqdm import tqdm

        self.total, self.desc, self.done = total, desc, 0
        self._next_log = log_every
        self._log_every = log_every
        self._bar = tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)

    def __call__(self, n: int = 1) -> None:
        self.done += n
        self._bar.update(n)
        if self.total and self.done / self.total >= self._next_log:
            logger().info("%s: %d/%d (%.0f%%)", self.desc, self.done, self.total, 100 * self.done / self.total)
            while self._next_log <= self.done / self.total:
                self._next_log += self._log_every

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def track(items: Iterable[Any], total: int, desc: str) -> Iterable[Any]:
    with Progress(total, desc) as p:
        for item in items:
            yield item
            p()


ProgressFn = Callable[[int], None]
