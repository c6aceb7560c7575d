"""The memory store's upkeep as a Prefect task (retried once: upkeep is safe to run again)."""

from __future__ import annotations

from prefect import task

from schemas.memory import MemoryConfig, UpkeepResult
from tasks.runtime import logger


@task(name="memory-maintain", retries=1, retry_delay_seconds=30)
def maintain_task(config: MemoryConfig) -> UpkeepResult:
    from memory.store import MemoryStore

    store = MemoryStore(config)
    done = store.maintain()  # upkeep never loads the embedding model
    logger().info("memories upkeep: %s", done)
    return UpkeepResult(**done, versions={"memories": store.table.version})
