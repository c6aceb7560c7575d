"""The one writer of the ``quarantine`` table, shared by every stage."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from datetime import UTC, datetime

import lancedb
import pyarrow as pa

from schemas.quarantine import QUARANTINE, Rejection
from storage.lance import MergeResult, merge, tag_run


def rejection_rows(stage: str, rejections: Iterable[Rejection], run_id: str | None = None) -> pa.Table:
    now = datetime.now(UTC)
    rows = [
        {
            "quarantine_id": r.row_id(stage),
            "stage": stage,
            "key": r.key,
            "reason": str(r.reason),
            "detail": r.detail,
            "record": r.record_json(),
            "run_id": run_id,
            "created_at": now,
        }
        for r in rejections
    ]
    return pa.Table.from_pylist(rows, schema=QUARANTINE.schema)


def quarantine(
    db: lancedb.DBConnection, stage: str, rejections: list[Rejection], run_id: str | None = None
) -> MergeResult:
    """Write rejections (idempotently: the same record and reason is one row across re-runs); a
    write of a run is tagged with it (``<stage>-<run id>``, or the run id where it names the stage)."""
    res = merge(db, "quarantine", rejection_rows(stage, rejections, run_id), update=False)
    if run_id and res.inserted:
        tag_run(db, "quarantine", run_id if run_id.startswith(stage) else f"{stage}-{run_id}", res.version)
    return res


def reason_counts(rejections: Iterable[Rejection]) -> dict[str, int]:
    return dict(Counter(str(r.reason) for r in rejections))
