"""Valid rows -> the ``reminders`` table (merged on ``image_id``), rejections -> ``quarantine``,
both tagged with the run; the Great Expectations gate in front of the write."""

from __future__ import annotations

import logging

import pyarrow as pa

from reminders import STAGE
from reminders.outcome import Outcome
from schemas.expectations import reminders_suite
from schemas.reminders import REMINDERS
from schemas.validate import ValidationReport, validate
from storage.lance import connect, merge, open_table, read, sql_in, table_exists, tag_run
from storage.quarantine import quarantine

log = logging.getLogger("mmem." + __name__)


def validate_rows(rows: list[dict]) -> ValidationReport:
    return validate(pa.Table.from_pylist(rows, schema=REMINDERS.schema), reminders_suite(), table_name=STAGE)


def table_version(lance_uri: str, name: str) -> int | None:
    """The table's latest version now (None where it does not exist yet)."""
    db = connect(lance_uri)
    return open_table(db, name).version if table_exists(db, name) else None


def write(lance_uri: str, outcome: Outcome, run: str, llm_before: int | None = None) -> dict:
    """Merge valid rows, drop stale rows of dialogs now quarantined, quarantine the rejects; tag what
    this run wrote with ``reminders-<run>`` (``llm_responses`` too when it moved past ``llm_before``,
    its version when the run started). Returns ``versions``, ``inserted``, ``updated``."""
    db = connect(lance_uri)
    res = merge(db, "reminders", pa.Table.from_pylist(outcome.rows, schema=REMINDERS.schema))
    bad = {int(r.key) for r in outcome.rejections if r.key.isdigit()}
    stale = sorted(bad & set(read(db, "reminders", columns=["image_id"]).column("image_id").to_pylist()))
    if stale:  # a dialog valid before and invalid now (another model, other options) loses its old row
        open_table(db, "reminders").delete(sql_in("image_id", stale))
        log.info("%d reminders of dialogs now quarantined deleted", len(stale))
    q = quarantine(db, STAGE, outcome.rejections, run)
    versions = {"reminders": open_table(db, "reminders").version, "quarantine": q.version,
                "llm_responses": open_table(db, "llm_responses").version}
    label = f"{STAGE}-{run}"
    if res.inserted or res.updated or stale:
        tag_run(db, "reminders", label, versions["reminders"])
    if versions["llm_responses"] != llm_before:  # this run's calls were merged
        tag_run(db, "llm_responses", label, versions["llm_responses"])
    return {"versions": versions, "inserted": res.inserted, "updated": res.updated}
