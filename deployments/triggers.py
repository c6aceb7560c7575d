"""Deployment triggers that chain the stages through Prefect events, so they work from the UI.

- new validated ``reminders`` version -> SFT: the ``reminders`` flow writes the table only after
  its Great Expectations gate passes, so each *Completed* run of it is a new validated version;
  the SFT deployment runs on that Prefect event (``train_sft_flow`` then picks the newest version
  that passes the suite).
- new model artifact -> evaluate: the train flows emit ``mmem.artifact.created`` (resource
  labels ``mmem.artifact.name`` / ``.version`` / ``.ref`` / ``.kind`` / ``.path``) when they
  publish a new version. :func:`evaluate_on_new_artifacts` gives the evaluation deployment one
  trigger per artifact its variants use; the run it starts evaluates only those variants
  (``only``) and is labelled with the version that fired (``run_label``, templated from the event).
  The variants load the artifact's ``latest``, which is the version that fired unless another one
  was published in between (pinning it needs an evaluate parameter that takes the version).

Use: ``train_sft_flow.to_deployment("train-sft", triggers=[sft_on_new_reminders()], ...)`` and
``evaluate_flow.to_deployment("evaluate", triggers=evaluate_on_new_artifacts(config, variants))``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prefect.events import DeploymentEventTrigger

from schemas.train import ARTIFACT_CREATED_EVENT

REMINDERS_FLOW = "reminders"  # @flow(name=...) of flows/reminders.py
FLOW_RUN_COMPLETED = "prefect.flow-run.Completed"
ARTIFACT_REF = "{{ event.resource['mmem.artifact.ref'] }}"
ARTIFACT_NAME = "{{ event.resource['mmem.artifact.name'] }}"
ARTIFACT_VERSION = "{{ event.resource['mmem.artifact.version'] }}"
# run_label of an automatic evaluation: the artifact version whose event started it
TRIGGERED_RUN_LABEL = f"on-{ARTIFACT_NAME}-v{ARTIFACT_VERSION}"


def sft_on_new_reminders(
    parameters: dict[str, Any] | None = None, *, enabled: bool = True
) -> DeploymentEventTrigger:
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
    parameters: dict[str, Any] | None = None, *, artifacts: str = "*", enabled: bool = True,
    name: str = "evaluate-on-new-model-artifact",
) -> DeploymentEventTrigger:
    """Run the evaluation deployment when a new model artifact version is published.

    ``parameters`` replace the deployment's own (top-level keys: pass the whole ``config``) and may
    use the ``ARTIFACT_*`` Jinja templates of the event in string values; ``artifacts`` narrows the
    names (``memory-model``).
    """
    return DeploymentEventTrigger(
        name=name,
        enabled=enabled,
        expect={ARTIFACT_CREATED_EVENT},
        match={"prefect.resource.id": "mmem.artifact.*", "mmem.artifact.name": artifacts},
        parameters=parameters,
    )


def evaluate_on_new_artifacts(
    config: dict[str, Any], variants: Iterable[Any]
) -> list[DeploymentEventTrigger]:
    """One trigger per artifact that a variant of ``variants`` uses (``Variant.artifact``).

    ``config`` is the evaluation deployment's ``config`` parameter (JSON); the run a trigger
    starts keeps it but evaluates only the variants of the artifact that fired (within the
    config's own ``only``), loads exactly the version that fired (``artifact_versions``) and is
    labelled ``on-<name>-v<N>``. An artifact no
    variant uses starts no evaluation.
    """
    wanted = config.get("only")
    by_artifact: dict[str, list[str]] = {}
    for v in variants:
        if v.artifact and (not wanted or v.name in wanted):
            by_artifact.setdefault(v.artifact, []).append(v.name)
    return [
        evaluate_on_new_artifact({"config": {**config, "only": names, "run_label": TRIGGERED_RUN_LABEL,
                                             "artifact_versions": {artifact: ARTIFACT_VERSION}}},
                                 artifacts=artifact, name=f"evaluate-on-new-{artifact}")
        for artifact, names in sorted(by_artifact.items())
    ]
