"""Deployments: one per flow plus the whole pipeline, served by one long-lived process.

``mmem serve [--profile FILE]`` registers them with the Prefect server the environment points
at (``PREFECT_API_URL``; ``mmem server start`` runs a local one) and executes their runs, so a
researcher can start, schedule and re-run any stage from the UI with the form that the flow's
config renders. Parameters default to the profile's values. The pipeline carries a weekly cron
schedule as an example, paused until someone switches it on in the UI. SFT runs on each new
validated ``reminders`` version, evaluation on each new artifact its variants use
(deployments/triggers.py). ``memory-upkeep`` runs hourly.

Anyone who reaches the Prefect API can start a run with any parameters, so before serving, the
process writes its allow-list (``schemas.config.Trusted``): the data root, Dask scheduler, Ollama
hosts and the Secret block bound to each host that its own profile and environment name, plus
the ``--allow-*`` values it was given. A run naming anything else is refused when its parameters
are validated, before any work, with a message naming the parameter.
"""

from __future__ import annotations

from pathlib import Path

from prefect import serve
from prefect.client.schemas.schedules import CronSchedule
from prefect.deployments.runner import EntrypointType, RunnerDeployment

from deployments.triggers import evaluate_on_new_artifacts, sft_on_new_reminders
from flows.embed import embed_flow
from flows.evaluate import evaluate_flow
from flows.ingest import ingest_flow
from flows.memory import memory_upkeep_flow
from flows.pipeline import pipeline_flow
from flows.reminders import reminders_flow
from flows.train import train_memory_flow, train_sft_flow
from schemas.config import Trusted
from schemas.evaluate import load_variants
from schemas.memory import MemoryConfig
from schemas.pipeline import PipelineConfig

EXAMPLE_CRON = "0 3 * * 0"  # Sundays 03:00 UTC
UPKEEP_CRON = "17 * * * *"  # memories: hourly


def deploy(flow, name: str, config, **options) -> RunnerDeployment:
    """``flow``'s deployment ``name`` with ``config`` as its default parameters. The entrypoint is a
    module path (``flows.embed.embed_flow``): Prefect loads a file-path entrypoint as a script with
    its folder first on ``sys.path``, where ``flows/embed.py`` would shadow the ``embed`` package."""
    return flow.to_deployment(name=name, parameters={"config": config.model_dump(mode="json")}, tags=["mmem"],
                              entrypoint_type=EntrypointType.MODULE_PATH, **options)


def build_deployments(profile: Path | None = None, data_root: Path | None = None) -> list[RunnerDeployment]:
    cfg = PipelineConfig.load(profile, data_root=data_root)
    evaluate = cfg.stage("evaluate")
    deployments = [
        deploy(pipeline_flow, "pipeline", cfg, schedules=[CronSchedule(cron=EXAMPLE_CRON, timezone="UTC")],
               paused=True, description="The whole DAG: ingest -> embed -> reminders -> train -> evaluate."),
        deploy(embed_flow, "embed", cfg.stage("embed")),
        deploy(reminders_flow, "reminders", cfg.stage("reminders")),
        deploy(train_sft_flow, "train-sft", cfg.stage("train_sft"), triggers=[sft_on_new_reminders()]),
        deploy(train_memory_flow, "train-memory", cfg.stage("train_memory")),
        deploy(evaluate_flow, "evaluate", evaluate, triggers=evaluate_on_new_artifacts(
            evaluate.model_dump(mode="json"), load_variants(evaluate.variants))),
        deploy(memory_upkeep_flow, "memory-upkeep", MemoryConfig.load(profile, data_root=cfg.data_root),
               schedules=[CronSchedule(cron=UPKEEP_CRON, timezone="UTC")],
               description="Upkeep of the memories table for stores nobody keeps open."),
    ]
    if cfg.inputs:
        first = cfg.inputs[0]
        from schemas.ingest import IngestConfig

        ingest_cfg = IngestConfig(data_root=cfg.data_root, visdial=first.visdial, images=first.images,
                                  coco=first.coco)
        deployments.insert(1, deploy(ingest_flow, "ingest", ingest_cfg))
    return deployments


def trust_profile(profile: Path | None = None, data_root: Path | None = None, *, ollama_hosts=(),
                  dask_addresses=(), data_roots=()) -> Trusted:
    """The allow-list of this serving process: what its profile and environment name (every stage's
    config, each variant's host), plus the extra values given, plus any allow-list it inherited."""
    cfg = PipelineConfig.load(profile, data_root=data_root)
    evaluate = cfg.stage("evaluate")
    hosts = [*ollama_hosts, *(v.host for v in load_variants(evaluate.variants) if v.host)]
    own = Trusted.of(cfg, ollama_hosts=hosts, dask_addresses=dask_addresses, data_roots=data_roots)
    inherited = Trusted.current()
    return own if inherited is None else inherited.merged(own)


def serve_all(profile: Path | None = None, data_root: Path | None = None, *, allow_ollama_hosts=(),
              allow_dask_addresses=(), allow_data_roots=()) -> None:
    """Write this process's allow-list (its runs inherit it), then register and serve."""
    trusted = trust_profile(profile, data_root, ollama_hosts=allow_ollama_hosts,
                            dask_addresses=allow_dask_addresses, data_roots=allow_data_roots)
    trusted.export()
    serve(*build_deployments(profile, data_root))
