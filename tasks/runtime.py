"""What a step needs from the orchestrator, in one place: the run id, a logger, progress,
artifacts, result storage that reads back only typed JSON. Each works inside a Prefect run and degrades to plain logging outside one, so the
same step runs from a test, a script or a flow.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar, Self

from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.context import FlowRunContext, TaskRunContext
from prefect.exceptions import MissingContextError
from prefect.filesystems import LocalFileSystem
from prefect.logging import get_run_logger
from pydantic import BaseModel, TypeAdapter

from schemas.config import Trusted


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
    """A terminal progress bar, a Prefect log line every ``log_every`` fraction of the work, and,
    inside a Prefect run, a progress artifact the UI shows on the run's page, updated as often."""

    def __init__(self, total: int, desc: str, *, log_every: float = 0.1, enabled: bool = True) -> None:
        from tqdm import tqdm

        self.total, self.desc, self.done = total, desc, 0
        self._next_log = log_every
        self._log_every = log_every
        self._bar = tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)
        self._artifact = None
        if enabled and in_prefect_run():
            try:
                self._artifact = create_progress_artifact(0.0, key=artifact_key(desc) or None, description=desc)
            except Exception as exc:  # noqa: BLE001 -- the UI's view of progress is not worth failing the work
                logging.getLogger("mmem").debug("no progress artifact for %s: %s", desc, exc)

    def __call__(self, n: int = 1) -> None:
        self.done += n
        self._bar.update(n)
        if self.total and self.done / self.total >= self._next_log:
            logger().info("%s: %d/%d (%.0f%%)", self.desc, self.done, self.total, 100 * self.done / self.total)
            self._show()
            while self._next_log <= self.done / self.total:
                self._next_log += self._log_every

    def _show(self) -> None:
        if self._artifact is not None and self.total:
            try:
                update_progress_artifact(self._artifact, progress=min(100.0, 100.0 * self.done / self.total))
            except Exception as exc:  # noqa: BLE001 -- as above
                logging.getLogger("mmem").debug("progress artifact of %s not updated: %s", self.desc, exc)

    def close(self) -> None:
        self._bar.close()
        self._show()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def track(items: Iterable[Any], total: int, desc: str) -> Iterable[Any]:
    with Progress(total, desc) as p:
        for item in items:
            yield item
            p()


ProgressFn = Callable[[int], None]


# --- persisted task results: JSON of one expected type, never a pickle ---------------------------


class CheckedResults(LocalFileSystem):
    """Result storage for a cached task whose results are JSON of one type (``result_model``: a pydantic
    model, or a plain type such as ``dict[str, float]``).

    Prefect decodes a persisted result with the serializer its file names, so a planted record saying
    ``pickle`` (or a JSON serializer with another decoder) would run code when the task's cache is
    checked. Reading through this storage refuses any record that is not plain JSON of exactly the
    expected model (a refused record is a cache miss: the task runs and overwrites it) and hands
    Prefect a record rebuilt from the validated value, with Prefect's default JSON serializer.
    """

    _block_type_name = "mmem checked results"
    result_model: ClassVar[Any]

    async def aread_path(self, path: str) -> bytes:
        return self.checked(await super().aread_path(path))

    def read_path(self, path: str, _sync: bool | None = None) -> bytes:  # Prefect passes _sync
        return self.checked(LocalFileSystem.read_path(self, path, _sync=True))

    @classmethod
    def checked(cls, content: bytes) -> bytes:
        from prefect._internal.result_records import ResultRecord, ResultRecordMetadata
        from prefect.serializers import JSONSerializer
        from prefect.utilities.importtools import to_qualified_name

        try:
            record = json.loads(content)
            meta = ResultRecordMetadata.model_validate(record["metadata"])
            serializer = record["metadata"]["serializer"]
            if serializer != JSONSerializer().model_dump(mode="json"):
                raise ValueError(f"serializer {serializer.get('type') if isinstance(serializer, dict) else '?'}")
            if not isinstance(record["result"], str):  # a JSON result is stored as its text
                raise TypeError("the result is not JSON text")
            payload = json.loads(record["result"])
            model = cls.result_model
            if isinstance(model, type) and issubclass(model, BaseModel):  # Prefect wraps a model in its name
                if not isinstance(payload, dict) or set(payload) != {"__class__", "data"} or \
                        payload["__class__"] != to_qualified_name(model):
                    raise ValueError("not a result of the expected type")
                _no_type_tags(payload["data"])
                value = model.model_validate(payload["data"])
            else:
                _no_type_tags(payload)
                value = TypeAdapter(model).validate_python(payload, strict=True)
        except Exception as exc:  # noqa: BLE001 - every way a record can be bad is a cache miss
            raise ValueError(f"refused a persisted result that is not JSON of {cls.result_model} "
                             f"({type(exc).__name__}: {str(exc)[:200]})") from None
        clean = ResultRecordMetadata(serializer=JSONSerializer(), storage_key=meta.storage_key,
                                     expiration=meta.expiration, storage_block_id=meta.storage_block_id)
        return ResultRecord(metadata=clean, result=value).serialize()


def _no_type_tags(value: Any) -> None:
    """Prefect's JSON decoder imports whatever a ``__class__``/``__exc_type__`` key names: none inside."""
    if isinstance(value, dict):
        if "__class__" in value or "__exc_type__" in value:
            raise ValueError("a nested type tag")
        for v in value.values():
            _no_type_tags(v)
    elif isinstance(value, list):
        for v in value:
            _no_type_tags(v)


def checked_storage(cls: type[CheckedResults], folder: Path, prefix: str) -> CheckedResults:
    """``cls`` over ``folder``, saved server-side under a name derived from the path (Prefect wants
    result storage it can name), so results of one data root never answer for another."""
    path = folder.resolve()
    block = cls(basepath=str(path))
    block.save(f"{prefix}-{hashlib.sha256(str(path).encode()).hexdigest()[:16]}", overwrite=True)
    return block


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
