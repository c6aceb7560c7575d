"""A training run, once planned (:mod:`training.plan`): read the pinned inputs, build the data
(quarantining what cannot be trained on), train (resuming from the plan's checkpoints) and publish
the result as an artifact version whose manifest records inputs, config, code and metrics.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from urllib.parse import unquote, urlparse

import pyarrow as pa

from ingest.roots import ImageRoots
from schemas.train import MemoryTrainConfig, SftConfig
from storage.artifacts import ArtifactStore, ArtifactVersion
from storage.lance import connect, read, sql_in, table_exists
from storage.progress import Progress
from storage.quarantine import quarantine, reason_counts
from training.plan import TrainPlan

log = logging.getLogger("mmem." + __name__)


def stored_image_paths(lance_uri: str, image_ids: list[int]) -> dict[int, Path]:
    """image_id -> file, from the ``images`` table (the root ingest recorded, found as every stage
    finds it: :class:`ingest.roots.ImageRoots`, + the relative path)."""
    db = connect(lance_uri)
    if not table_exists(db, "images") or not image_ids:
        return {}
    tbl = read(db, "images", where=sql_in("image_id", sorted(set(image_ids))))
    if "root" not in tbl.column_names:
        return {}
    roots = ImageRoots(Path(lance_uri).parent)
    out = {}
    for r in tbl.select(["image_id", "split", "root", "path"]).to_pylist():
        root = roots.find(r["split"], r["root"], r["path"])
        if root:
            out[r["image_id"]] = Path(root) / r["path"]
    return out


def local_image_urls(rows: pa.Table, data_root: Path) -> pa.Table:
    """``rows`` with each ``image_url`` recorded relative to the data root made absolute (a relative
    one would otherwise be looked up from the working directory)."""
    if "image_url" not in rows.column_names:
        return rows
    urls = [u if not u or urlparse(u).scheme else str(data_root / unquote(u))
            for u in rows.column("image_url").to_pylist()]
    return rows.set_column(rows.column_names.index("image_url"), "image_url", pa.array(urls, pa.string()))


def run_sft(config: SftConfig, plan: TrainPlan, run_id: str | None = None) -> ArtifactVersion:
    """Train the LoRA adapter (resuming from the plan's checkpoints) and publish it as a version;
    rejected dialogs go to the quarantine table under ``run_id``."""
    from transformers import TrainerCallback

    from training.sft import base_path, build_examples, drop_too_long, load_processor, save_adapter, train_sft

    db = connect(config.lance_uri)
    rows = local_image_urls(read(db, "reminders", version=plan.inputs["reminders"]["version"]),
                            config.data_root)
    data = build_examples(rows, config, stored_image_paths(config.lance_uri,
                                                           rows.column("image_id").to_pylist()))
    data = drop_too_long(data, load_processor(base_path(config)), config.max_seq_length)
    quarantine(db, "train_sft", data.rejections, run_id)
    log.info("SFT data: %d train / %d held-out dialogs, %d quarantined %s", len(data.train),
             len(data.held_out),
             len(data.rejections), reason_counts(data.rejections))

    class ProgressCallback(TrainerCallback):  # the Trainer's steps as a progress bar (+ run log lines)
        bar: Progress | None = None

        def on_train_begin(self, args, state, control, **kw):
            self.bar = Progress(state.max_steps, "train sft")
            self.bar(state.global_step)

        def on_step_end(self, args, state, control, **kw):
            self.bar(1)

        def on_train_end(self, args, state, control, **kw):
            self.bar.close()

    ckpt = plan.checkpoints(config)
    run = train_sft(config, data, ckpt, callbacks=[ProgressCallback()])
    log.info("SFT backend %s (%s); metrics %s", run.backend, run.backend_reason, run.metrics)
    art = ArtifactStore(config.artifacts_dir).publish(
        config.artifact, lambda folder: save_adapter(run, folder, data, copy_base=config.tiny),
        kind="lora-adapter", inputs=plan.inputs, config=config.model_dump(mode="json"), code=plan.code,
        metrics=run.metrics, fingerprint_=plan.fingerprint,
        extra={"backend": run.backend, "backend_reason": run.backend_reason,
               "resumed_from_step": run.resumed_from,
               "base": {"path": str(run.base), "tiny": config.tiny},
               "data": {"train": len(data.train), "held_out": len(data.held_out),
                        "quarantined": len(data.rejections)}},
    )
    shutil.rmtree(ckpt, ignore_errors=True)  # the version holds the result now
    return art


def run_memory(config: MemoryTrainConfig, plan: TrainPlan, run_id: str | None = None) -> ArtifactVersion:
    """Train the memory model (resuming from the plan's checkpoints) and publish it as a version;
    dialogs missing a vector go to the quarantine table under ``run_id``."""
    from embed.device import resolve_device
    from training.memory_data import build_memory_data, read_memory_inputs
    from training.memory_loop import total_steps, train_memory
    from training.memory_model import build_memory_model, save_memory_model

    device = resolve_device(config.device)
    model = build_memory_model(config, device)
    pins = {n: i["version"] for n, i in plan.inputs.items()}
    loaded = read_memory_inputs(config.lance_uri, [config.split, config.eval_split], pins)
    with Progress(len(loaded.turns) * 2, "tokenize turns") as bar:
        train, rejections = build_memory_data(loaded, config.split, model.tokenizer, model.arch,
                                              limit_dialogs=config.limit, progress=bar)
        evaluation = None
        if config.eval_limit and config.eval_split != config.split:
            evaluation, more = build_memory_data(loaded, config.eval_split, model.tokenizer, model.arch,
                                                 limit_samples=config.eval_limit, progress=bar)
            rejections += more
    quarantine(connect(config.lance_uri), "train_memory", rejections, run_id)
    log.info("memory data: %d train samples (%d dialogs), %d eval samples; %d dialogs quarantined %s; "
             "device %s",
             len(train), len(train.image_ids), len(evaluation) if evaluation else 0, len(rejections),
             reason_counts(rejections), device)

    ckpt = plan.checkpoints(config)
    with Progress(total_steps(len(train), config), "train memory") as bar:
        result = train_memory(model, train.to(device), evaluation.to(device) if evaluation else None, config,
                              ckpt,
                              device=device, progress=bar)
    log.info("memory model: %d steps (resumed from %d); metrics %s", result.steps, result.resumed_from,
             result.metrics)

    def write(folder: Path) -> None:
        save_memory_model(model, folder, copy_llm=config.tiny)
        (folder / "history.json").write_text(json.dumps(result.history))
        split = {"train": train.image_ids.tolist(),
                 "eval": evaluation.image_ids.tolist() if evaluation else []}
        (folder / "data_split.json").write_text(json.dumps(split))

    art = ArtifactStore(config.artifacts_dir).publish(
        config.artifact, write, kind="memory-model", inputs=plan.inputs,
        config=config.model_dump(mode="json"),
        code=plan.code, metrics=result.metrics, fingerprint_=plan.fingerprint,
        extra={"resumed_from_step": result.resumed_from, "device": str(device),
               "trainable": sorted(model.trainable_modules()),
               "data": {"train_samples": len(train), "eval_samples": len(evaluation) if evaluation else 0,
                        "quarantined": len(rejections)}},
    )
    shutil.rmtree(ckpt, ignore_errors=True)
    return art
