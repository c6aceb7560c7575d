"""Which memories a read may return: one rule, as pyarrow expressions.

The same expression filters a Lance scan or search (pylance turns it into its own filter, using
the scalar indexes) and a pyarrow table already in memory (``Table.filter``), so the rule is
written once. The rules recall applies to rows it holds in memory take the builder of their terms
(``on``): :data:`ARROW` makes the expression, :class:`memory.columns.View` evaluates the same rule
on its numpy columns (an Arrow plan per call would cost more than the hundred rows it filters).
Expiry is part of it: an expired transient memory is never returned, whether or not upkeep has
purged it yet; the physical purge (:func:`expired`) can wait for upkeep.
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


class Arrow:
    """Builds a rule's terms as pyarrow expressions."""

    field = staticmethod(pc.field)
    time = staticmethod(_time)


ARROW = Arrow()


def owned(owner: str, on=ARROW) -> pc.Expression:
    return on.field("owner") == owner


def live(now: datetime, ttl_hours: float) -> pc.Expression:
    """Not an expired transient memory."""
    return (pc.field("kind") == DURABLE) | (pc.field("created_at") >= _time(cutoff(now, ttl_hours)))


def expired(now: datetime, ttl_hours: float) -> pc.Expression:
    """Transient memories past their time to live (sessions nobody ended): upkeep purges them."""
    return (pc.field("kind") == TRANSIENT) & (pc.field("created_at") < _time(cutoff(now, ttl_hours)))


def current(on=ARROW) -> pc.Expression:
    """Not superseded by a newer fact on its key."""
    return on.field("superseded_by").is_null()


def ids(memory_ids) -> pc.Expression:
    return pc.field("memory_id").isin(pa.array(list(memory_ids), pa.string()))


def visible(owner: str, model: str, session: str | None, now: datetime, ttl_hours: float,
            on=ARROW) -> pc.Expression:
    """What recall may return: the owner's current durable facts embedded by ``model``, and the
    live transient memories of ``session`` (``on``: see the module's docstring)."""
    rule = owned(owner, on) & (on.field("model") == model) & current(on)
    kept = on.field("kind") == DURABLE
    if session:
        recent = on.field("created_at") >= on.time(cutoff(now, ttl_hours))
        kept = kept | ((on.field("session_id") == session) & recent)
    return rule & kept
