"""Writing a run's results: shard rows buffered and merged into their tables on the key (nothing is
appended twice), the run's tag on what it changed, its rejections into the quarantine, and the
counts of the run as its :class:`schemas.embed.EmbedResult`. One writer per run: the flow."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pyarrow as pa

from embed.model import StreamStats
from embed.plan import OUTPUT, Plan, output_versions
from embed.shard import ShardResult
from schemas.embed import EmbedResult
from schemas.quarantine import Rejection
from storage.index import ensure_vector_index
from storage.lance import MergeResult, connect, merge, tag, versions_text
from storage.quarantine import quarantine, reason_counts

log = logging.getLogger("mmem." + __name__)


class Writer:
    """Buffers shard results and merges them into their table every ``merge_rows`` rows.

    ``storage.lance.merge`` compares against the table to write only what changed, so fewer,
    larger merges are much cheaper than one per shard. ``merge_fn`` is that merge (the flow passes
    it wrapped as a task).
    """

    def __init__(self, db, merge_rows: int, merge_fn: Callable[..., MergeResult] = merge) -> None:
        self.db, self.merge_rows, self.merge_fn = db, merge_rows, merge_fn
        self.buffers: dict[str, list[pa.Table]] = {}
        self.merged: dict[str, MergeResult] = {}
        self.inserted: dict[str, int] = {}
        self.updated: dict[str, int] = {}
        self.seconds = 0.0  # spent merging into Lance

    def add(self, result: ShardResult) -> None:
        buf = self.buffers.setdefault(result.table, [])
        buf.append(result.rows)
        if sum(len(t) for t in buf) >= self.merge_rows:
            self.flush(result.table)

    def flush(self, name: str | None = None) -> None:
        for table in [name] if name else list(self.buffers):
            rows = self.buffers.pop(table, [])
            if not rows:
                continue
            t0 = time.perf_counter()
            res = self.merge_fn(self.db, table, pa.concat_tables(rows))
            self.seconds += time.perf_counter() - t0
            self.merged[table] = res
            self.inserted[table] = self.inserted.get(table, 0) + res.inserted
            self.updated[table] = self.updated.get(table, 0) + res.updated


@dataclass
class Collected:
    """What the shards of a run gave, as they come in (computed or served from their cache)."""

    writer: Writer
    rejections: list[Rejection] = field(default_factory=list)
    computed: int = 0
    cached: int = 0
    workers: set[str] = field(default_factory=set)
    streams: dict[str, StreamStats] = field(default_factory=dict)  # per kind, computed shards only
    started: float = field(default_factory=time.perf_counter)
    done_at: dict[str, float] = field(default_factory=dict)  # per kind: seconds in, when its last shard came

    def add(self, res: ShardResult, cached: bool) -> int:
        """Count ``res`` and hand its rows to the writer; returns the rows it settled (for progress)."""
        if cached:
            self.cached += 1
        else:
            self.computed += 1
            self.workers.add(res.worker)
            log_shard(res)
            total = self.streams.setdefault(res.kind, StreamStats())
            total.samples += res.stream.samples
            total.input_wait_s += res.stream.input_wait_s
            total.forward_s += res.stream.forward_s
            for width, rows in res.stream.widths.items():
                total.widths[width] = total.widths.get(width, 0) + rows
        self.writer.add(res)
        self.done_at[res.kind] = round(time.perf_counter() - self.started, 2)
        self.rejections += res.rejections
        return len(res.rows) + len(res.rejections)


def log_shard(res: ShardResult) -> None:
    """One line per computed shard: a shard that mostly waited on its input is decode-bound."""
    st = res.stream
    log.info("%s shard %d: %d rows in %.1f s on %s (waited %.1f s for input, forwards %.1f s)",
             res.kind, res.index, st.samples, res.seconds, res.worker, st.input_wait_s, st.forward_s)


def finish(db, merged: dict[str, tuple[int, int]], rejections: list[Rejection], label: str) -> dict[str, int]:
    """Tag the tables a run changed (``merged``: table -> (inserted, updated)) with ``label``, write
    its rejections into the quarantine; returns the versions after the run."""
    for name, (inserted, updated) in merged.items():
        if inserted or updated:
            tag(db, name, label)
    q = quarantine(db, "embed", rejections, label)
    return {**output_versions(db), "quarantine": q.version}


def wrote_text(read_versions: dict[str, int], written: dict[str, int],
               merged: dict[str, tuple[int, int]]) -> str:
    """The run's one line of lineage: the versions read and written, and the rows merged per table."""
    rows = ", ".join(f"{n} +{merged.get(n, (0, 0))[0]} inserted, {merged.get(n, (0, 0))[1]} updated"
                     for n in written if n != "quarantine")
    return f"embed read {versions_text(read_versions)}; wrote {versions_text(written)} ({rows})"


def summary(p: Plan, c: Collected, written: dict[str, int] | None = None) -> EmbedResult:
    """The run's counts, with ``read_versions`` (inputs) and ``versions`` (the embeddings tables
    after the run: what train_memory reads)."""
    w = c.writer
    streams = {f"{kind}_{k}": round(v, 2) for kind, st in c.streams.items()
               for k, v in (("input_wait_s", st.input_wait_s), ("forward_s", st.forward_s))}
    return EmbedResult(
        read_versions=dict(p.read_versions), versions=dict(written or {}),
        model=p.fingerprint, images=p.images, texts=p.texts, shards=p.shards,
        shards_up_to_date=p.shards - len(p.todo), shards_cached=c.cached, shards_computed=c.computed,
        workers=len(c.workers),
        **{f"{name}_inserted": w.inserted.get(name, 0) for name in OUTPUT.values()},
        **{f"{name}_updated": w.updated.get(name, 0) for name in OUTPUT.values()},
        merge_seconds=round(w.seconds, 3), **streams, stream_done_seconds=dict(c.done_at),
        text_widths=dict(sorted(c.streams["text"].widths.items())) if "text" in c.streams else {},
        quarantined=len(c.rejections),
        **{f"quarantined_{k}": v for k, v in reason_counts(c.rejections).items()},
    )


def index_tables(lance_uri: str, min_rows: int, tables: list[str] | None = None,
                 accelerator: str | None = None) -> tuple[dict[str, str], dict[str, int]]:
    """Build (or extend) the vector index of the output tables (or only ``tables``, which must exist:
    the others may be being created meanwhile) once they are large enough; the action per table and
    the versions after (an index build is a new version). ``accelerator``: where a new index's
    partitions are trained (the embed device when it is a GPU)."""
    db = connect(lance_uri)
    actions = {name: ensure_vector_index(db, name, min_rows=min_rows, accelerator=accelerator).action
               for name in tables or OUTPUT.values()}
    if tables:
        return actions, {name: db.open_table(name).version for name in tables}
    return actions, output_versions(db)
