"""The memory-upkeep flow: what open stores do in the background, for stores nobody keeps open.

Purges expired transient memories, builds the indexes once the table is big enough, folds small
fragments, indexes new rows and removes old untagged versions, one process at a time (the store's
upkeep lock), beside live readers and writers. ``mmem serve`` deploys it hourly as
``memory-upkeep``; ``mmem memory maintain`` runs the same from the shell.
"""

from __future__ import annotations

from prefect import flow

from schemas.memory import MemoryConfig, UpkeepResult
from tasks.memory import maintain_task
from tasks.runtime import enforce_trust


@flow(name="memory-upkeep", log_prints=True)
def memory_upkeep_flow(config: MemoryConfig) -> UpkeepResult:
    """Upkeep of the ``memories`` table."""
    enforce_trust(config)
    return maintain_task(config)
