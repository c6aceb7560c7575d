"""Whether a deployment trigger fires on an event, asked of the Prefect server's own matcher (the
trigger and event tests share it)."""

from __future__ import annotations

TRIGGER_FIELDS = {"match", "match_related", "after", "expect", "for_each", "posture", "threshold", "within"}


def covers(trigger, event) -> bool:
    """Whether the server's trigger matcher fires ``trigger`` on ``event`` (as read from the API)."""
    from prefect.server.events.schemas.automations import EventTrigger
    from prefect.server.events.schemas.events import ReceivedEvent

    server = EventTrigger(**trigger.model_dump(include=TRIGGER_FIELDS))
    return server.covers(ReceivedEvent(**event.model_dump()))
