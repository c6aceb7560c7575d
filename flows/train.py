"""The train flows: LoRA SFT of Gemma3 on ``reminders``, and the ImageBind memory model.

Each flow only composes: pin the inputs (the plan), train unless the same inputs, config and code
already produced a version, and publish the version (Prefect link + markdown artifact, and the
``mmem.artifact.created`` event that starts evaluation through a deployment trigger).
"""

from __future__ import annotations

from prefect import flow

from schemas.train import MemoryTrainConfig, SftConfig
from tasks.runtime import logger
from tasks.train import (
    TrainPlan,
    announce_task,
    plan_memory_task,
    plan_sft_task,
    train_memory_task,
    train_sft_task,
)


def _result(plan: TrainPlan, art, created: bool) -> dict:
    return {"artifact": art.ref, "name": art.name, "version": art.version, "path": str(art.path),
            "created": created, "fingerprint": plan.fingerprint, "inputs": art.manifest["inputs"],
            "metrics": art.manifest["metrics"]}


def _train_unless_up_to_date(plan, train) -> dict:
    """An artifact trained on the same inputs, config and code is reused, not trained again."""
    if plan.existing is not None:
        logger().info("up to date: %s was trained on the same inputs, config and code", plan.existing.ref)
        art, created = plan.existing, False
    else:
        art, created = train(), True
    announce_task(art, created)
    return _result(plan, art, created)


@flow(name="train-sft", log_prints=True)
def train_sft_flow(config: SftConfig) -> dict:
    """LoRA-tune Gemma3 on the newest validated ``reminders`` (or the pinned version)."""
    plan = plan_sft_task(config)
    return _train_unless_up_to_date(plan, lambda: train_sft_task(config, plan))


@flow(name="train-memory-model", log_prints=True)
def train_memory_flow(config: MemoryTrainConfig) -> dict:
    """Train the Extraction-Memorization model on the stored ImageBind embeddings."""
    plan = plan_memory_task(config)
    return _train_unless_up_to_date(plan, lambda: train_memory_task(config, plan))
