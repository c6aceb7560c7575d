"""The evaluate stage's Prefect tasks: thin wrappers around ``evaluation/`` (options, retries,
caching, result storage, the LLM host's slots), their cache keys and result storage.

Generation is resumable through the response cache (per request), not through Prefect's cache.
Scoring and option ranking are cached on their input content and on the scoring code
(:func:`scoring_code_version`), so an unchanged variant is not scored twice.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator
from pathlib import Path

from prefect import task
from prefect.cache_policies import INPUTS, NO_CACHE, TASK_SOURCE

from evaluation import data as D
from evaluation import generate as G
from evaluation import models, prompts, rows
from evaluation import scoring as S
from evaluation.generate import MemoryRun
from evaluation.models import ResolvedModel
from schemas.evaluate import EvaluateConfig
from storage.artifacts import fingerprint
from tasks.runtime import CheckedResults, enforce_trust
from tasks.runtime.secrets import host_auth
from tasks.runtime.slots import ensure_limit, hold_slots, slots_dir


class MetricResults(CheckedResults):
    """Where the cached metric tasks persist their values: read back only as JSON of ``dict[str, float]``."""

    _block_type_name = "mmem evaluate metric results"
    result_model = dict[str, float]


# resolved by name when a metric task runs; load_task (the flow's first step) saves it
METRIC_RESULTS = "mmem-evaluate-metric-results/metrics"


def save_metric_results() -> None:
    """The metric tasks' storage: Prefect's local storage folder, as before, in a folder of its own."""
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH

    folder = Path(PREFECT_LOCAL_STORAGE_PATH.value()).expanduser() / "mmem-metrics"
    MetricResults(basepath=str(folder.resolve())).save(METRIC_RESULTS.split("/")[1], overwrite=True)


def scoring_code_version() -> str:
    """A hash of the scoring modules (``evaluation.scoring.SCORING_MODULES``) and the metric
    packages' versions: part of the score caches' keys, so changing what decides a score, or
    upgrading sacrebleu, invalidates cached scores, while moving or editing the rest of
    ``evaluation/`` does not (Prefect's TASK_SOURCE only sees the task function's own source)."""
    from importlib.metadata import version

    parts = {}
    for name in S.SCORING_MODULES:
        origin = Path(importlib.util.find_spec(name).origin)
        parts[origin.name] = origin.read_text(encoding="utf-8")
    parts |= {pkg: version(pkg) for pkg in S.SCORING_PACKAGES}
    return fingerprint(parts)


def _memory_rank_key(context, parameters: dict) -> str:
    """The ranking's cache key: the model's content id, the samples, the requests (which name the
    embedding versions), the annotations and the scoring code; not the loaded tensors themselves."""
    run: MemoryRun = parameters["run"]
    return fingerprint(parameters["model_id"], [r.request_hash for r in run.requests],
                       parameters["dense_path"], parameters["code"], "rank_memory")


def _shared_slots(config: EvaluateConfig):
    """A shared server's slots: a Prefect global concurrency limit per host, shared with the
    reminders stage and other runs, held (and given back when this process dies) while its calls last."""

    @contextlib.contextmanager
    def hold(host: str) -> Iterator[int]:
        name, slots = ensure_limit(config, host)
        with hold_slots(slots_dir(config), name, slots):
            yield slots

    return hold


# --- the tasks ------------------------------------------------------------------------------------


@task(name="load-held-out", cache_policy=NO_CACHE)
def load_task(config: EvaluateConfig) -> D.EvalData:
    enforce_trust(config)  # the evaluate flow's first step: nothing read or asked before the check
    save_metric_results()
    return D.load_eval_data(config)


resolve_task = task(models.resolve_model, name="resolve-variant-model", cache_policy=NO_CACHE)
requests_task = task(prompts.build_requests, name="build-eval-prompts", cache_policy=NO_CACHE)
ranking_inputs_task = task(prompts.ranking_inputs, name="ranking-contexts", cache_policy=NO_CACHE)


@task(name="served-model-digest", cache_policy=NO_CACHE)
def served_version_task(config: EvaluateConfig, model: ResolvedModel) -> ResolvedModel:
    return models.served_version(config, model, host_auth(config))


@task(name="generate-ollama", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=10)
def generate_ollama_task(config: EvaluateConfig, model: ResolvedModel, requests: list,
                         label: str) -> tuple[dict[str, str], dict[str, dict]]:
    return G.generate_ollama(config, model, requests, label, host_auth(config),
                             hold_slots=_shared_slots(config))


generate_in_process_task = task(G.generate_in_process, name="generate-in-process", cache_policy=NO_CACHE)
prepare_memory_task = task(G.prepare_memory, name="load-memory-model", cache_policy=NO_CACHE)
generate_memory_task = task(G.generate_memory, name="generate-memory-model", cache_policy=NO_CACHE)


# Scores are pure functions of their (content-hashed) inputs and the scoring code: cached across runs.
@task(name="score-generations", cache_policy=INPUTS + TASK_SOURCE, result_storage=METRIC_RESULTS,
      result_serializer="json")
def score_task(hypotheses: list[str], references: list[str], backbone_path: str | None,
               backbone_layers: int | None, batch_size: int, device: str, code: str) -> dict[str, float]:
    """All generation metrics (``code`` is :func:`scoring_code_version`, only for the cache key)."""
    return S.score_generations(hypotheses, references, backbone_path, backbone_layers, batch_size, device)


@task(name="rank-answer-options", cache_policy=INPUTS + TASK_SOURCE, result_storage=METRIC_RESULTS,
      result_serializer="json")
def rank_task(model_path: str, model_id: str, contexts: list[str], options: list[list[str]],
              gt_index: list[int], keys: list[tuple[int, int]], dense_path: str | None, option_batch: int,
              device: str, code: str) -> dict[str, float]:
    """VisDial ranking of a local causal LM (``model_id`` and ``code`` key the cache on the
    checkpoint's content and on the scoring code)."""
    return S.rank_options(model_path, model_id, contexts, options, gt_index, keys, dense_path, option_batch,
                          device)


@task(name="rank-answer-options-memory", cache_key_fn=_memory_rank_key, result_storage=METRIC_RESULTS,
      result_serializer="json")
def rank_memory_task(run: MemoryRun, model_id: str, dense_path: str | None, option_batch: int,
                     code: str) -> dict[str, float]:
    return S.rank_memory(run, model_id, dense_path, option_batch)


write_task = task(rows.write, name="write-evaluations", retries=2, retry_delay_seconds=2,
                  cache_policy=NO_CACHE)
report_task = task(rows.render_report, name="render-evaluation-report", cache_policy=NO_CACHE)
