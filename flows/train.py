"""The train flows: LoRA SFT of Gemma3 on ``reminders``, and the ImageBind memory model.

Each flow only composes: pin the inputs (the plan), train unless the same inputs, config and code
already produced a version (one run per fingerprint at a time: see ``training.plan.exclusive``),
and publish the version (Prefect link + markdown artifact, and the ``mmem.artifact.created`` event
that starts evaluation through a deployment trigger).
"""

from __future__ import annotations

from prefect import flow

from schemas.train import MemoryTrainConfig, SftConfig, TrainResult
from tasks.runtime import logger
from tasks.train import announce_task, plan_memory_task, plan_sft_task, train_memory_task, train_sft_task
from training.plan import TrainPlan, exclusive


def _train_unless_up_to_date(config, plan: TrainPlan, train) -> TrainResult:
    """An artifact trained on the same inputs, config and code is reused, not trained again; a run
    with the same fingerprint in progress elsewhere is waited for, then reused."""
    with exclusive(config, plan) as locked:
        if locked.existing is not None:
            logger().info(
                "up to date: %s was trained on the same inputs, config and code", locked.existing.ref
            )
            art, created = locked.existing, False
        else:
            art, created = train(locked), True
    announce_task(art, created)
    return TrainResult.of(art, created, locked.fingerprint)


@flow(name="train-sft", log_prints=True)
def train_sft_flow(config: SftConfig) -> TrainResult:
    """LoRA-tune Gemma3 on the newest validated ``reminders`` (or the pinned version)."""
    plan = plan_sft_task(config)
    return _train_unless_up_to_date(config, plan, lambda p: train_sft_task(config, p))


@flow(name="train-memory-model", log_prints=True)
def train_memory_flow(config: MemoryTrainConfig) -> TrainResult:
    """Train the Extraction-Memorization model on the stored ImageBind embeddings."""
    plan = plan_memory_task(config)
    return _train_unless_up_to_date(config, plan, lambda p: train_memory_task(config, p))
