"""The evaluate flow: every variant answers the held-out dialogs; its answers are scored (ROUGE,
BLEU, BERTScore, and VisDial's option ranking where the model gives log-likelihoods); the scores
become ``evaluations`` rows, a Markdown table and PNG charts. Composition only.
"""

from __future__ import annotations

from prefect import flow

from embed.device import resolve_device
from evaluation.data import EvalData, samples_for, without_training_data
from evaluation.generate import generation_batch_size
from evaluation.metrics import Backbone, resolve_backbone
from evaluation.models import ResolvedModel, VariantUnavailable, served
from evaluation.report import run_folder
from evaluation.rows import hypothesis, metric_rows
from schemas.evaluate import EvaluateConfig, EvaluateResult, Variant, load_variants
from tasks.evaluate import (
    generate_in_process_task,
    generate_memory_task,
    generate_ollama_task,
    load_task,
    prepare_memory_task,
    rank_memory_task,
    rank_task,
    ranking_inputs_task,
    report_task,
    requests_task,
    resolve_task,
    score_task,
    scoring_code_version,
    served_version_task,
    write_task,
)
from tasks.runtime import logger, publish_markdown, publish_table, run_id


@flow(name="evaluate", log_prints=True)
def evaluate_flow(config: EvaluateConfig) -> EvaluateResult:
    """Evaluate the variants of ``config.variants`` on the held-out ``config.split``.

    Returns the run id, each variant's metrics, the variants skipped, where the report is, and the
    table versions read and written.
    """
    run = config.run_label or run_id()
    reports = run_folder(config.reports_dir, run)  # refuses a label that is no plain name, before any work
    log = logger()
    variants = _select(load_variants(config.variants), config.only)
    data = load_task(config)
    log.info("held-out split %r read at %s (%d dialogs)", config.split, data.dataset_version,
             len(data.dialogs))
    backbone = resolve_backbone(config.bertscore_model, config.bertscore_layers) if config.bertscore else None
    code = scoring_code_version()
    rows, rejections, skipped, results, hosts = [], list(data.rejections), {}, {}, {}
    read_versions = dict(data.versions)
    for v in variants:
        try:
            model = resolve_task(config, v)
        except VariantUnavailable as exc:
            if v.required:
                raise
            log.warning("skipping variant %s: %s", v.name, exc)
            skipped[v.name] = str(exc)
            continue
        values, n, dropped, model, read_at, also_read = _evaluate_variant(config, v, model, data, backbone,
                                                                          code, f"{run}-{v.name}", hosts)
        read_versions |= also_read
        rejections += dropped
        rows += metric_rows(run, v, model, read_at, config.split, values, n,
                            backbone.label if backbone else None)
        results[v.name] = values
        log.info("%s (model %s, data %s): %s", v.name, model.version or model.label, read_at,
                 {k: round(x, 4) for k, x in values.items()})
    versions = write_task(config.lance_uri, rows, rejections, run)
    md, charts = report_task(rows, reports, run)
    publish_markdown("evaluation", md, f"Evaluation run {run}: metrics per variant")
    publish_table("evaluation-rows", [{k: r[k] for k in ("variant", "metric", "value", "n", "backbone")}
                                      for r in rows], f"evaluations rows of run {run}")
    return EvaluateResult(
        run_id=run, flow_run_id=run_id(), metrics=results, skipped=skipped, quarantined=len(rejections),
        dataset_version=data.dataset_version, report=str(reports / "evaluation.md"),
        charts=[str(p) for p in charts], hosts=hosts, **versions, read_versions=read_versions,
        versions={"evaluations": versions["evaluations_version"],
                  "quarantine": versions["quarantine_version"]})


def _evaluate_variant(config: EvaluateConfig, v: Variant, model: ResolvedModel, data: EvalData,
                      backbone: Backbone | None, code: str, label: str,
                      hosts: dict[str, dict]) -> tuple[dict, dict, list, ResolvedModel, str, dict[str, int]]:
    """(metric values, samples behind each metric, rejections, the model with its recorded version,
    the dataset versions read, the tables it read besides the held-out data's) of one variant; an
    Ollama variant's figures per host go into ``hosts`` under its name."""
    dense = str(config.dense_annotations) if config.dense_annotations else None
    data = without_training_data(data, model)
    ranked: dict[str, float] = {}
    read_at, also_read = data.dataset_version, {}
    if v.backend == "memory":
        prepared = prepare_memory_task(config, v, model, data)
        read_at = f"{read_at},{prepared.dataset_version}"  # its answers come from the stored embeddings
        also_read = dict(prepared.versions or {})
        logger().info("%s reads %s", v.name, read_at)
        answers = generate_memory_task(config, model, prepared, label)
        requests, samples = prepared.requests, prepared.samples
        dropped = data.rejections + prepared.rejections
        if v.ranking:
            ranked = rank_memory_task(prepared, model.request_model, dense, config.option_batch, code)
            rounds = len(samples)
    else:
        with served(config, v, model) as model_at:
            prompts = requests_task(config, v, model_at, samples_for(data, v, config.limit), data.images)
            if v.backend == "hf":
                batch = generation_batch_size(config, v, str(resolve_device(config.device)))
                answers = generate_in_process_task(config, model_at, prompts.requests, label, batch)
            else:
                answers, figures = generate_ollama_task(config, model_at, prompts.requests, label)
                if figures:
                    hosts[v.name] = figures
                model = served_version_task(config, model_at)  # the digest of what answered
        requests, samples, dropped = prompts.requests, prompts.samples, data.rejections + prompts.rejections
        if v.ranking:  # VisDial ranks every round of a dialog, whatever turns the generation used
            every = samples_for(data, v.model_copy(update={"turns": "all"}), config.limit)
            contexts, options = ranking_inputs_task(model, every)
            ranked = rank_task(str(model.path), model.request_model, contexts, options,
                               [s.gt_index for s in every], [s.key for s in every], dense,
                               config.option_batch, config.device, code)
            rounds = len(every)
    parsed = [hypothesis(answers[r.request_hash]) for r in requests]
    hyps, refs = [h for h, _ in parsed], [s.answer for s in samples]
    values = dict(score_task(hyps, refs, str(backbone.path) if backbone else None,
                             backbone.num_layers if backbone else None, config.bertscore_batch_size,
                             config.device, code))
    values["reminder_format_rate"] = sum(ok for _, ok in parsed) / max(len(parsed), 1)
    n = dict.fromkeys(values, len(hyps))
    if ranked:
        ranked = dict(ranked)
        ndcg_rounds = int(ranked.pop("ndcg_rounds", 0))
        values |= ranked
        n |= dict.fromkeys(ranked, rounds) | ({"ndcg": ndcg_rounds} if "ndcg" in ranked else {})
    return values, n, dropped, model, read_at, also_read


def _select(variants: list[Variant], only: list[str] | None) -> list[Variant]:
    if not only:
        return variants
    unknown = sorted(set(only) - {v.name for v in variants})
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; the file has {[v.name for v in variants]}")
    return [v for v in variants if v.name in only]
