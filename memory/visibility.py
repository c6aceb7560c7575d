"""Which memories a read may return: one rule, as pyarrow expressions.

The same expression filters a Lance scan or search (pylance turns it into its own filter, using
the scalar indexes) and a pyarrow table already in memory (``Table.filter``), so the rule is
written once. Expiry is part of it: an expired transient memory is never returned, whether or not
upkeep has purged it yet; the physical purge (:func:`expired`) can wait for upkeep.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import pyarrow as pa
import pyarrow.compute as pc

from schemas.memory import DURABLE, TRANSIENT

_TS = pa.timestamp("us", tz="UTC")


def _time(t: datetime) -> pc.Expression:
    return pc.scalar(pa.scalar(t, _TS))


def cutoff(now: datetime, ttl_hours: float) -> datetime:
    """Transient memories created before this have expired."""
    return now - timedelta(hours=ttl_hours)


def owned(owner: str) -> pc.Expression:
    return pc.field("owner") == owner


def live(now: datetime, ttl_hours: float) -> pc.Expression:
    """Not an expired transient memory."""
    return (pc.field("kind") == DURABLE) | (pc.field("created_at") >= _time(cutoff(now, ttl_hours)))


def expired(now: datetime, ttl_hours: float) -> pc.Expression:
    """Transient memories past their time to live (sessions nobody ended): upkeep purges them."""
    return (pc.field("kind") == TRANSIENT) & (pc.field("created_at") < _time(cutoff(now, ttl_hours)))


def current() -> pc.Expression:
    """Not superseded by a newer fact on its key."""
    return pc.field("superseded_by").is_null()


def ids(memory_ids) -> pc.Expression:
    return pc.field("memory_id").isin(pa.array(list(memory_ids), pa.string()))


def visible(owner: str, model: str, session: str | None, now: datetime, ttl_hours: float) -> pc.Expression:
    """What recall may return: the owner's current durable facts embedded by ``model``, and the
    live transient memories of ``session``."""
    rule = owned(owner) & (pc.field("model") == model) & current()
    kept = pc.field("kind") == DURABLE
    if session:
        recent = pc.field("created_at") >= _time(cutoff(now, ttl_hours))
        kept = kept | ((pc.field("session_id") == session) & recent)
    return rule & kept
