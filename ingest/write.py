"""Write what :mod:`ingest.clean` kept: merge the tables (only what changed), tag the new
versions, quarantine the rejections and index the join keys."""

from __future__ import annotations

import logging
import time

from ingest.clean import IngestOutput
from storage.index import JOIN_KEYS, SCALAR_MIN_ROWS, ensure_scalar_indexes
from storage.lance import connect, merge, open_table, tag
from storage.quarantine import quarantine

log = logging.getLogger("mmem." + __name__)


def write(
    lance_uri: str, out: IngestOutput, run_label: str, scalar_min_rows: int = SCALAR_MIN_ROWS
) -> dict[str, int]:
    """Merge every table (writes only what changed), tag the resulting versions, and index the join
    keys of tables past ``scalar_min_rows``."""
    db = connect(lance_uri)
    t0 = time.perf_counter()
    results = {"images": [merge(db, "images", out.images)], "dialogs": [], "turns": []}
    for chunk in out.row_chunks():
        for name in ("dialogs", "turns"):
            results[name].append(merge(db, name, chunk[name]))
    versions = {}
    for name, res in results.items():
        inserted, updated = sum(r.inserted for r in res), sum(r.updated for r in res)
        version = res[-1].version if res else open_table(db, name).version
        log.info("%s: +%d inserted, %d updated -> version %d", name, inserted, updated, version)
        if inserted or updated:
            tag(db, name, run_label)
        versions[name] = version
    versions["quarantine"] = quarantine(db, "ingest", out.rejections, run_label).version
    for name in JOIN_KEYS:  # the join keys' BTREE indexes, once the tables are large enough
        if state := {c: a for c, a in ensure_scalar_indexes(db, name, min_rows=scalar_min_rows).items()
                     if a != "none"}:
            log.info("%s scalar indexes: %s", name, state)
    out.seconds["write"] = time.perf_counter() - t0
    return versions
