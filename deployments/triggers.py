"""Deployment triggers that chain the stages through Prefect events, so they work from the UI.

- new validated ``reminders`` version -> SFT: the ``reminders`` flow writes the table only after
  its Great Expectations gate passes, so each *Completed* run of it is a new validated version;
  the SFT deployment runs on that Prefect event (``train_sft_flow`` then picks the newest version
  that passes the suite).
- new model artifact -> evaluate: the train flows emit ``mmem.artifact.created`` (resource
  labels ``mmem.artifact.name`` / ``.version`` / ``.ref`` / ``.kind`` / ``.path``) when they
  publish a new version; the evaluation deployment runs on it, with the artifact reference
  templated into its parameters.

Use: ``train_sft_flow.to_deployment("train-sft", triggers=[sft_on_new_reminders()], ...)`` and
``evaluate_flow.to_deployment("evaluate", triggers=[evaluate_on_new_artifact(...)])``.
"""

from __future__ import annotations

from typing import Any

from prefect.events import DeploymentEventTrigger

from schemas.train import ARTIFACT_CREATED_EVENT

REMINDERS_FLOW = "reminders"  # @flow(name=...) of flows/reminders.py
FLOW_RUN_COMPLETED = "prefect.flow-run.Completed"
ARTIFACT_REF = "{{ event.resource['mmem.artifact.ref'] }}"


def sft_on_new_reminders(parameters: dict[str, Any] | None = None, *, enabled: bool = True) -> DeploymentEventTrigger:
    """Run the SFT deployment when a ``reminders`` flow run completes (its gate passed, its rows
    are written). ``parameters`` default to the deployment's own."""
    return DeploymentEventTrigger(
        name="sft-on-new-validated-reminders",
        enabled=enabled,
        expect={FLOW_RUN_COMPLETED},
        match_related={"prefect.resource.role": "flow", "prefect.resource.name": REMINDERS_FLOW},
        parameters=parameters,
    )


def evaluate_on_new_artifact(
    parameters: dict[str, Any] | None = None, *, artifacts: str = "*", enabled: bool = True
) -> DeploymentEventTrigger:
    """Run the evaluation deployment when a new model artifact version is published.

    ``parameters`` may use ``ARTIFACT_REF`` (a Jinja template of the event) wherever the evaluate
    flow's config names the model artifact; ``artifacts`` narrows the names (``memory-model``).
    """
    return DeploymentEventTrigger(
        name="evaluate-on-new-model-artifact",
        enabled=enabled,
        expect={ARTIFACT_CREATED_EVENT},
        match={"prefect.resource.id": "mmem.artifact.*", "mmem.artifact.name": artifacts},
        parameters=parameters,
    )
