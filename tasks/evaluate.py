"""Evaluate steps: held-out dialogs -> prompts per variant -> (cached) answers -> metrics -> rows.

Every generation goes through the reminders' response cache (``llm_responses``, keyed by the
request hash): Ollama variants through the same client, journals and shard runner as the
reminders stage; in-process checkpoints write the same rows (``backend = hf:<name>``). So a
re-run, or a run killed half-way, makes only the calls that are not cached yet. Scoring and
option ranking are Prefect tasks cached on their input content, so an unchanged variant is not
scored twice. The pure functions are what the tests call; the ``@task`` wrappers are at the bottom.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from prefect import task
from prefect.cache_policies import INPUTS, NO_CACHE, TASK_SOURCE

from evaluation import metrics as M
from evaluation import ranking as R
from evaluation.generation import generate, load_causal_lm, pick_device, render
from evaluation.report import bar_charts, markdown_table, reference_table
from evaluation.samples import Sample, build_samples, held_out
from schemas.config import Trusted
from schemas.evaluate import (
    DEFAULT_BATCH,
    EVALUATIONS,
    MEMORY_CUDA_BATCH,
    EvaluateConfig,
    Variant,
    format_dataset_version,
    parse_dataset_version,
)
from schemas.quarantine import Reason, Rejection
from schemas.reminders import ANY_TAG_RE, REMINDER_RE, RemindersConfig, load_prompt_data
from storage.artifacts import ArtifactError, ArtifactStore, file_hashes, fingerprint
from storage.lance import connect, merge, open_table, read, table_exists, tag_run
from storage.quarantine import quarantine
from tasks.llm_client import OK, ImageRef, Journal, LLMRequest, LLMResult, ResponseCache
from tasks.llm_slots import hold_slots
from tasks.reminders import (
    check_server,
    conversation_text,
    ensure_limit,
    parse_response,
    run_shard,
    slots_dir,
    system_prompt,
)
from tasks.runtime import CheckedResults, Progress, enforce_trust, logger
from tasks.secrets import HostAuth, host_auth

STAGE = "evaluate"
BASE_INSTRUCTION = "Answer the last question about the image with one short sentence."
TINY_PREFIX = "tiny:"


class GenerationIncomplete(RuntimeError):
    """Some requests still failed after their retries; their finished neighbours are cached, so a
    re-run of the flow makes only the missing calls."""


class VariantUnavailable(LookupError):
    """A variant's model or artifact does not exist (skipped when the variant is not required)."""


# --- the held-out data -------------------------------------------------------------------------


@dataclass
class EvalData:
    dialogs: pa.Table  # the held-out split's dialogs that no training split shares
    turns: pa.Table
    images: pa.Table
    dataset_version: str  # the Lance versions read, e.g. "dialogs@v3,turns@v3"
    rejections: list[Rejection] = field(default_factory=list)


class MetricResults(CheckedResults):
    """Where the cached metric tasks persist their values: read back only as JSON of ``dict[str, float]``."""

    _block_type_name = "mmem evaluate metric results"
    result_model = dict[str, float]


# resolved by name when a metric task runs; load_eval_data (the flow's first step) saves it
METRIC_RESULTS = "mmem-evaluate-metric-results/metrics"


def save_metric_results() -> None:
    """The metric tasks' storage: Prefect's local storage folder, as before, in a folder of its own."""
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH

    folder = Path(PREFECT_LOCAL_STORAGE_PATH.value()).expanduser() / "mmem-metrics"
    MetricResults(basepath=str(folder.resolve())).save(METRIC_RESULTS.split("/")[1], overwrite=True)


def load_eval_data(config: EvaluateConfig) -> EvalData:
    """The ``config.split`` dialogs, minus any whose image a training split also holds."""
    enforce_trust(config)  # the evaluate flow's first step: nothing read or asked before the check
    save_metric_results()
    db = connect(config.lance_uri)
    missing = [n for n in ("dialogs", "turns") if not table_exists(db, n)]
    if missing:
        raise FileNotFoundError(f"tables {missing} are missing under {config.lance_uri}: run `mmem ingest` first")
    versions = {n: open_table(db, n).version for n in ("dialogs", "turns")}
    dialogs = read(db, "dialogs", columns=["image_id", "split", "caption"], version=versions["dialogs"])
    split = pc.equal(dialogs.column("split"), config.split)
    held, others = dialogs.filter(split), dialogs.filter(pc.invert(split))
    if len(held) == 0:
        raise ValueError(f"no dialogs in split {config.split!r} under {config.lance_uri}")
    trained = set(others.filter(pc.is_in(others.column("split"), pa.array(config.train_splits)))
                  .column("image_id").to_pylist())
    if table_exists(db, "reminders"):
        rem = read(db, "reminders", columns=["image_id", "split"])
        trained |= set(rem.filter(pc.is_in(rem.column("split"), pa.array(config.train_splits)))
                       .column("image_id").to_pylist())
    leaked = pc.is_in(held.column("image_id"), pa.array(sorted(trained), pa.int64()))
    rejections = [
        Rejection(str(r["image_id"]), Reason.SEEN_IN_TRAINING, r,
                  f"image {r['image_id']} is also in the training split(s) {config.train_splits}")
        for r in held.filter(leaked).to_pylist()
    ]
    held = held.filter(pc.invert(leaked))
    ids = pa.array(held.column("image_id").to_pylist(), pa.int64())
    turns = read(db, "turns", version=versions["turns"], where=f"split = '{config.split}'")
    turns = turns.filter(pc.is_in(turns.column("image_id"), ids))
    images = read(db, "images") if table_exists(db, "images") else pa.table({"image_id": pa.array([], pa.int64())})
    images = images.filter(pc.is_in(images.column("image_id"), ids))
    version = ",".join(f"{n}@v{v}" for n, v in versions.items())
    return EvalData(held, turns, images, version, rejections)


def samples_for(data: EvalData, variant: Variant, limit: int | None) -> list[Sample]:
    return build_samples(data.dialogs, data.turns, which=variant.turns, limit=limit)


def without_training_data(data: EvalData, model: ResolvedModel) -> EvalData:
    """``data`` minus the dialogs the model's artifact says it trained on (``data_split.json``'s
    ``train`` ids, written by the training flows), each quarantined as ``seen_in_training``; the
    result's ``rejections`` are only these new ones."""
    split_file = model.path / "data_split.json" if model.path is not None else None
    if split_file is None or not split_file.is_file():
        return dataclasses.replace(data, rejections=[])
    trained = json.loads(split_file.read_text()).get("train", [])
    samples = build_samples(data.dialogs, data.turns, which="last")
    kept, rejections = held_out(samples, trained, f"the training data of {model.artifact or model.path}")
    if not rejections:
        return dataclasses.replace(data, rejections=[])
    ids = pa.array([s.image_id for s in kept], pa.int64())
    return EvalData(data.dialogs.filter(pc.is_in(data.dialogs.column("image_id"), ids)),
                    data.turns.filter(pc.is_in(data.turns.column("image_id"), ids)), data.images,
                    data.dataset_version, rejections)


# --- which model answers -----------------------------------------------------------------------


@dataclass(frozen=True)
class ResolvedModel:
    """What a variant's requests go to: ``request_model`` is hashed into every cache key."""

    request_model: str
    path: Path | None = None  # a local checkpoint folder (hf, or served by the flow)
    artifact: str | None = None  # name:vN of the artifact store
    host: str | None = None
    label: str = ""  # what the ``model`` column records
    private: bool = False  # served by this flow run alone (a loopback server it started)
    version: str | None = None  # what ``model_artifact`` records: the artifact ref, else the checkpoint's
    # content fingerprint (as in ``request_model``), else the served model's digest (:func:`served_version`)


def resolve_model(config: EvaluateConfig, variant: Variant) -> ResolvedModel:
    """The checkpoint/artifact/served model of ``variant``; raises :class:`VariantUnavailable`."""
    artifact, path = None, None
    if variant.artifact:
        try:
            version = config.artifact_versions.get(variant.artifact) or variant.artifact_version or "latest"
            art = ArtifactStore(config.artifacts_dir).get(variant.artifact, version)
        except ArtifactError as exc:
            raise VariantUnavailable(f"variant {variant.name}: {exc}") from None
        artifact, path = art.ref, art.path
    if variant.model and variant.model.startswith(TINY_PREFIX):
        path = tiny_checkpoint(config, variant.model[len(TINY_PREFIX):])
    elif variant.model and (variant.backend != "ollama" or variant.serve == "checkpoint"):
        path = Path(variant.model) if Path(variant.model).is_absolute() else config.data_root / variant.model
    if path is not None and not path.exists():
        raise VariantUnavailable(f"variant {variant.name}: no checkpoint at {path}")
    if variant.backend != "ollama":  # keyed on the checkpoint's content, not on its folder's name
        fp = fingerprint({k: v["sha256"] for k, v in file_hashes(path).items() if k != "manifest.json"})
        name = artifact or path.name
        return ResolvedModel(f"{variant.backend}:{name}@{fp[:12]}", path, artifact, label=str(path),
                             version=artifact or f"{path.name}@{fp[:12]}")
    host = variant.host or config.host
    trusted = Trusted.current()
    if trusted is not None and variant.serve is None:  # a variants file may name any host: the same check
        trusted.check_host(f"variants ({variant.name}.host)", host)
    return ResolvedModel(variant.model, path, artifact, host, label=f"{variant.model} @ {host}", version=artifact)


def served_version(config: EvaluateConfig, model: ResolvedModel) -> ResolvedModel:
    """``model`` with ``version`` set to the served model's digest (``name@sha256:...``, from the
    server's ``/api/tags`` through the official client) when no artifact names it already. A server
    that does not answer leaves it unset, with a warning: the answers may all come from the cache."""
    if model.version or not model.host:
        return model
    import httpx
    import ollama

    from tasks.llm_client import full_name

    auth = None if model.private else host_auth(config).header(model.host)  # only the host it is bound to
    headers = {"Authorization": auth.get_secret_value()} if auth is not None else None
    try:
        listed = ollama.Client(host=model.host, timeout=min(30.0, config.timeout_s), headers=headers).list()
    except (ConnectionError, httpx.HTTPError, ollama.ResponseError) as exc:
        logger().warning("no digest for %s: the server at %s does not answer (%s)", model.request_model,
                         model.host, exc)
        return model
    want = full_name(model.request_model)
    digest = next((m.digest for m in listed.models if m.model and full_name(m.model) == want and m.digest), None)
    if digest is None:
        logger().warning("no digest for %s: the server at %s does not list it", want, model.host)
        return model
    return dataclasses.replace(model, version=f"{want}@sha256:{digest.removeprefix('sha256:')}")


def tiny_checkpoint(config: EvaluateConfig, kind: str) -> Path:
    """A tiny random-weight model of a real architecture, built once under the cache (demo, tests)."""
    folder = config.cache_dir / "tiny" / f"{kind}-seed0"
    if not (folder / "config.json").is_file():
        if kind == "llama":
            from training.tiny_llama import tiny_llama as build
        elif kind == "gemma3":
            from training.tiny_models import tiny_gemma3 as build
        else:
            raise VariantUnavailable(f"unknown tiny model {kind!r} (known: tiny:llama, tiny:gemma3)")
        build(folder, seed=0)
    return folder


@contextlib.contextmanager
def served(config: EvaluateConfig, variant: Variant, model: ResolvedModel) -> Iterator[ResolvedModel]:
    """For ``serve = ...`` variants: the model behind ``mmem llm serve``'s server on a loopback port."""
    if variant.serve is None:
        yield model
        return
    from training.llm_server import make_state, running_server

    if variant.serve == "teacher":
        state = make_state(teacher=True, name=variant.model)
    else:
        state = make_state(model.path, name=variant.model, device=pick_device(config.device))
    with running_server(state) as url:
        # the label names what answered, not the port it happened to get (rows compare equal across runs)
        yield ResolvedModel(model.request_model, model.path, model.artifact, url,
                            f"{variant.model} (served by the flow: {variant.serve})", private=True,
                            version=model.version)


# --- prompts -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prompts:
    requests: list[LLMRequest]
    samples: list[Sample]  # the samples the requests belong to (same order)
    rejections: list[Rejection]


def prompt_messages(variant: Variant, sample: Sample, system: dict[str, str]) -> list[dict]:
    """base: the dialog and an instruction; prompt: the reminders' <reminder> prompt (system text +
    few-shot examples); sft: the fine-tuning chat format (its system prompt, then the dialog)."""
    conv, _ = conversation_text([*sample.history, (sample.question, sample.answer)])
    if variant.prompt == "base":
        return [{"role": "user", "content": f"conversation:\n{conv}\n\n{BASE_INSTRUCTION}"}]
    if variant.prompt == "prompt":
        return [{"role": "system", "content": system["prompt"]}, {"role": "user", "content": f"conversation:\n{conv}"}]
    return [{"role": "system", "content": system["sft"]}, {"role": "user", "content": conv}]


def system_texts(config: EvaluateConfig, model: ResolvedModel) -> dict[str, str]:
    """The <reminder> system prompt, and the SFT one (from the artifact's manifest when it has one)."""
    from schemas.train import SftConfig

    instructions, examples = load_prompt_data(config.reminder_examples)
    sft = SftConfig.model_fields["system_prompt"].default
    if model.artifact:
        manifest = ArtifactStore(config.artifacts_dir).get_ref(model.artifact).manifest
        sft = manifest.get("config", {}).get("system_prompt") or sft
    return {"prompt": system_prompt(instructions, examples), "sft": sft}


def build_requests(config: EvaluateConfig, variant: Variant, model: ResolvedModel, samples: list[Sample],
                   images: pa.Table) -> Prompts:
    """One request per sample; Ollama variants carry the image (a sample without one is quarantined)."""
    system = system_texts(config, model)
    options = generation_options(config, variant)
    where = {r["image_id"]: r for r in images.to_pylist()} if variant.sends_images else {}
    requests, kept, rejections = [], [], []
    for s in samples:
        messages = prompt_messages(variant, s, system)
        if variant.sends_images:
            img = where.get(s.image_id)
            root = config.image_roots.get(s.split) or (img or {}).get("root")
            path = Path(root) / img["path"] if img and root else None
            if path is None or not path.is_file():
                rejections.append(Rejection(f"{variant.name}:{s.image_id}", Reason.IMAGE_MISSING,
                                            {"image_id": s.image_id, "variant": variant.name},
                                            f"no image file for {s.image_id} (root {root}); set image_roots"))
                continue
            messages[-1] = {**messages[-1], "images": (ImageRef(str(path), img["sha256"]),)}
        requests.append(LLMRequest(model.request_model, tuple(messages), options))
        kept.append(s)
    return Prompts(requests, kept, rejections)


def generation_options(config: EvaluateConfig, variant: Variant) -> dict:
    """Greedy, seeded, bounded: part of every request's cache key."""
    options = {"temperature": 0.0, "seed": 0, "num_predict": variant.max_new_tokens or config.max_new_tokens}
    if variant.backend == "ollama":
        options["num_ctx"] = config.num_ctx
    return options | variant.options


# --- generation through the response cache -------------------------------------------------------


def generation_batch_size(config: EvaluateConfig, variant: Variant, device: str) -> int:
    """Samples per generate() call: the config's (``--batch-size``) when set, else the variant's, else
    ``MEMORY_CUDA_BATCH`` for a memory variant on CUDA, else ``DEFAULT_BATCH``."""
    if config.batch_size:
        return config.batch_size
    if variant.batch_size:
        return variant.batch_size
    return MEMORY_CUDA_BATCH if variant.backend == "memory" and device.startswith("cuda") else DEFAULT_BATCH


def shard_step(config: EvaluateConfig, batch_size: int) -> int:
    """Requests per journal shard of in-process generation: ``shard_size`` rounded up to whole
    batches, so a shard never cuts a batch short (a shard smaller than the batch would cap it)."""
    return -(-max(config.shard_size, batch_size) // batch_size) * batch_size



def response_cache(config: EvaluateConfig) -> ResponseCache:
    return ResponseCache(config.lance_uri, config.cache_dir / "llm_journal")


def generate_ollama(config: EvaluateConfig, model: ResolvedModel, requests: list[LLMRequest],
                    label: str) -> dict[str, str]:
    """Answers by request hash: cached ones, plus new calls through the reminders' shard runner."""
    cache = response_cache(config)
    cache.recover()
    hashes = [r.request_hash for r in requests]
    answers = cache.lookup(hashes)
    todo = list({r.request_hash: r for r in requests if r.request_hash not in answers}.values())
    logger().info("%s: %d requests, %d cached, %d to make", label, len(hashes), len(answers), len(todo))
    if todo:
        values = {"data_root": config.data_root, "ollama_host": model.host, "model": model.request_model,
                  "timeout_s": config.timeout_s, "max_attempts": config.max_attempts,
                  "concurrency": config.concurrency}
        # a server this flow started on a loopback port is its own (no allow-list entry, no token)
        client = RemindersConfig.model_construct(**values) if model.private else RemindersConfig(**values)
        auth = HostAuth() if model.private else host_auth(config)  # each host gets only its own token
        backend = check_server(client, auth)
        # A shared server's slots are a Prefect global concurrency limit, shared with the reminders
        # stage and other runs; a server this flow started for itself (`serve`) needs none.
        name, slots = ensure_limit(client) if not model.private else (None, config.concurrency)
        with hold_slots(slots_dir(client), name, slots) if name else contextlib.nullcontext(), \
                Progress(len(todo), f"{label}: generate") as bar:
            for i in range(0, len(todo), config.shard_size):
                shard = todo[i : i + config.shard_size]
                path = cache.journal_path(label, i // config.shard_size)
                try:
                    asyncio.run(run_shard(i // config.shard_size, shard, client, path, slots, backend, auth))
                finally:
                    cache.merge(path)
                bar(len(shard))
        answers = cache.lookup(hashes)
    return _complete(answers, hashes, label)


def generate_in_process(config: EvaluateConfig, model: ResolvedModel, requests: list[LLMRequest],
                        label: str, batch_size: int = DEFAULT_BATCH) -> dict[str, str]:
    """Answers by request hash from a local checkpoint; every new answer is written to the cache
    (journal first, merged per shard), so an interrupted run resumes where it stopped."""
    cache = response_cache(config)
    cache.recover()
    hashes = [r.request_hash for r in requests]
    answers = cache.lookup(hashes)
    todo = list({r.request_hash: r for r in requests if r.request_hash not in answers}.values())
    logger().info("%s: %d requests, %d cached, %d to generate in-process", label, len(hashes), len(answers),
                  len(todo))
    if todo:
        lm, tok = load_causal_lm(model.path, config.device)
        backend = f"hf:{model.path.name}"
        step = shard_step(config, batch_size)
        with Progress(len(todo), f"{label}: generate") as bar:
            for i in range(0, len(todo), step):
                shard = todo[i : i + step]
                prompts = [render(tok, [_text_only(m) for m in r.messages]) for r in shard]
                t0 = time.perf_counter()
                texts = generate(lm, tok, prompts, batch_size=batch_size,
                                 max_new_tokens=int(shard[0].options["num_predict"]), progress=bar)
                per = (time.perf_counter() - t0) / len(shard)
                path = cache.journal_path(label, i // step)
                with Journal(path) as journal:
                    for req, text in zip(shard, texts, strict=True):
                        journal.append(LLMResult(req.request_hash, OK, response=text, attempts=1, latency_s=per,
                                                 backend=backend).row(req, "in-process"))
                cache.merge(path)
        answers = cache.lookup(hashes)
    return _complete(answers, hashes, label)


def _text_only(message: dict) -> dict:
    return {k: v for k, v in message.items() if k != "images"}


def _complete(answers: dict[str, dict], hashes: list[str], label: str) -> dict[str, str]:
    missing = [h for h in hashes if h not in answers]
    if missing:
        raise GenerationIncomplete(f"{label}: {len(missing)} of {len(hashes)} requests have no answer after their "
                                   "retries; re-run the flow to make only those calls")
    return {h: answers[h]["response"] or "" for h in hashes}


def hypothesis(response: str) -> tuple[str, bool]:
    """The answer to score, and whether the response followed the <reminder> format: the final
    answer after a valid reminder, else the text with any reminder block removed."""
    parsed = parse_response(response.strip())
    if not isinstance(parsed[0], Reason):
        return parsed[1], True
    return ANY_TAG_RE.sub(" ", REMINDER_RE.sub(" ", response)).strip(), False


# --- the memory model -------------------------------------------------------------------------------


@dataclass
class MemoryRun:
    """A loaded memory model, its held-out samples as tensors, and the requests that key them."""

    model: object  # training.memory_model.MemoryModel
    data: object  # training.memory_model.MemoryData, on the model's device
    samples: list[Sample]  # aligned with ``data``
    requests: list[LLMRequest]
    rejections: list[Rejection]
    batch_size: int = DEFAULT_BATCH  # samples per generate() call (:func:`generation_batch_size`)
    dataset_version: str = ""  # the embedding tables' Lance versions read, e.g. "image_embeddings@v2,..."


def prepare_memory(config: EvaluateConfig, variant: Variant, model: ResolvedModel, data: EvalData) -> MemoryRun:
    """Load the memory model and the held-out turns' stored embeddings (every turn of each dialog)."""
    from evaluation.memory_eval import sample_keys
    from training.memory_model import build_memory_data, load_memory_model, read_memory_inputs

    mm = load_memory_model(model.path, config.device)
    loaded = read_memory_inputs(config.lance_uri, [config.split], {})
    held = pa.array(data.dialogs.column("image_id").to_pylist(), pa.int64())
    loaded.turns = loaded.turns.filter(pc.is_in(loaded.turns.column("image_id"), held))
    mdata, rejections = build_memory_data(loaded, config.split, mm.tokenizer, mm.arch, limit_dialogs=config.limit)
    mdata = mdata.to(next(mm.parameters()).device)
    by_key = {s.key: s for s in build_samples(data.dialogs, data.turns, which="all")}
    samples = [by_key[k] for k in sample_keys(mdata)]
    embeddings = ",".join(f"{n}@v{loaded.versions[n]}" for n in ("image_embeddings", "text_embeddings"))
    options = generation_options(config, variant)
    requests = [memory_request(model.request_model, mm.arch.prompt_template.format(question=s.question), s.image_id,
                               s.turn, embeddings, options) for s in samples]
    device = str(next(mm.parameters()).device)
    return MemoryRun(mm, mdata, samples, requests, rejections, generation_batch_size(config, variant, device),
                     embeddings)


def memory_request(request_model: str, prompt: str, image_id: int, turn: int, embeddings: str,
                   options: dict) -> LLMRequest:
    """The cache key of one memory-model answer: the model's content id, its question prompt, the
    dialog turn whose memory it reads, and the embedding tables' versions that memory comes from."""
    return LLMRequest(request_model, ({"role": "user", "content": prompt, "memory": f"visdial:{image_id}:{turn}",
                                       "embeddings": embeddings},), options)


def generate_memory(config: EvaluateConfig, model: ResolvedModel, run: MemoryRun, label: str) -> dict[str, str]:
    """Answers by request hash: cached ones, plus the memory model's for the rest (journaled per
    shard of whole ``run.batch_size`` batches). benchmarks/eval_bench.py times this function."""
    from evaluation.memory_eval import memory_generate

    cache = response_cache(config)
    cache.recover()
    hashes = [r.request_hash for r in run.requests]
    answers = cache.lookup(hashes)
    todo = [i for i, h in enumerate(hashes) if h not in answers]
    logger().info("%s: %d samples, %d cached, %d to generate (batch %d)", label, len(hashes), len(answers),
                  len(todo), run.batch_size)
    step = shard_step(config, run.batch_size)
    with Progress(len(todo), f"{label}: generate") as bar:
        for lo in range(0, len(todo), step):
            idx = todo[lo : lo + step]
            t0 = time.perf_counter()
            texts = memory_generate(run.model, run.data, indices=idx, batch_size=run.batch_size,
                                    max_new_tokens=int(run.requests[0].options["num_predict"]), progress=bar)
            per = (time.perf_counter() - t0) / len(idx)
            path = cache.journal_path(label, lo // step)
            with Journal(path) as journal:
                for i, text in zip(idx, texts, strict=True):
                    req = run.requests[i]
                    journal.append(LLMResult(req.request_hash, OK, response=text, attempts=1, latency_s=per,
                                             backend=f"memory:{model.artifact or model.path.name}").row(req, "in-process"))
            cache.merge(path)
    if todo:
        answers = cache.lookup(hashes)
    return _complete(answers, hashes, label)


def rank_memory(run: MemoryRun, model_id: str, dense_path: str | None, option_batch: int, code: str) -> dict[str, float]:
    """VisDial ranking metrics of the memory model over its samples' 100 options."""
    from evaluation.memory_eval import memory_option_scores

    with Progress(len(run.samples), f"rank options ({model_id})") as bar:
        scores = memory_option_scores(run.model, run.data, [list(s.options) for s in run.samples],
                                      option_batch=option_batch, progress=bar)
    dense = R.load_dense_annotations(Path(dense_path)) if dense_path else None
    return R.ranking_metrics(scores, np.asarray([s.gt_index for s in run.samples]),
                             keys=[s.key for s in run.samples], dense=dense)


def _memory_rank_key(context, parameters: dict) -> str:
    """The ranking's cache key: the model's content id, the samples, the requests (which name the
    embedding versions), the annotations and the scoring code; not the loaded tensors themselves."""
    run: MemoryRun = parameters["run"]
    return fingerprint(parameters["model_id"], [r.request_hash for r in run.requests], parameters["dense_path"],
                       parameters["code"], "rank_memory")


# --- scoring ---------------------------------------------------------------------------------------


def scoring_code_version() -> str:
    """A hash of the scoring code and the metric packages' versions: part of the score caches' keys,
    so changing ``evaluation/`` or upgrading sacrebleu invalidates cached scores (Prefect's
    TASK_SOURCE only sees the task function's own source)."""
    from importlib.metadata import version

    import evaluation

    folder = Path(evaluation.__file__).parent
    parts = {p.name: p.read_text(encoding="utf-8") for p in sorted(folder.glob("*.py"))}
    parts |= {pkg: version(pkg) for pkg in ("rouge-score", "sacrebleu", "bert-score", "transformers", "torch")}
    return fingerprint(parts)


def score_generations(hypotheses: list[str], references: list[str], backbone_path: str | None,
                      backbone_layers: int | None, batch_size: int, device: str, code: str) -> dict[str, float]:
    """All generation metrics (``code`` is :func:`scoring_code_version`, only for the cache key)."""
    backbone = M.Backbone(Path(backbone_path), backbone_layers) if backbone_path else None
    return M.generation_metrics(hypotheses, references, backbone, bertscore_batch_size=batch_size,
                                device=None if device == "auto" else device)


def rank_options(model_path: str, model_id: str, contexts: list[str], options: list[list[str]], gt_index: list[int],
                 keys: list[tuple[int, int]], dense_path: str | None, option_batch: int, device: str,
                 code: str) -> dict[str, float]:
    """VisDial ranking metrics of a local causal LM (``model_id`` and ``code`` key the cache on the
    checkpoint's content and on the scoring code)."""
    lm, tok = load_causal_lm(model_path, device)
    scorer = R.lm_option_scorer(lm, tok, option_batch=option_batch)
    scores = np.full((len(contexts), max((len(o) for o in options), default=0)), -np.inf)
    with Progress(len(contexts), f"rank options ({model_id})") as bar:
        for i in range(0, len(contexts), 32):
            scores[i : i + 32] = scorer(contexts[i : i + 32], options[i : i + 32])
            bar(len(contexts[i : i + 32]))
    dense = R.load_dense_annotations(Path(dense_path)) if dense_path else None
    return R.ranking_metrics(scores, np.asarray(gt_index), keys=keys, dense=dense)


def ranking_inputs(model: ResolvedModel, samples: list[Sample]) -> tuple[list[str], list[list[str]]]:
    """Each turn's context (the dialog up to its question, in the checkpoint's chat format) and options."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model.path)
    base = Variant(name="ranking", backend="hf", model=str(model.path), prompt="base")
    contexts = [render(tok, prompt_messages(base, s, {})) for s in samples]
    return contexts, [list(s.options) for s in samples]


# --- rows, writing, the report ---------------------------------------------------------------------


def metric_rows(run: str, variant: Variant, model: ResolvedModel, dataset_version: str, split: str,
                values: dict[str, float], n: dict[str, int], backbone: str | None) -> list[dict]:
    now = datetime.now(UTC)
    return [
        {"run_id": run, "variant": variant.name, "metric": metric, "value": float(value), "n": n.get(metric, 0),
         "model_artifact": model.version or model.artifact, "dataset_version": dataset_version,
         "backbone": backbone if metric == "bertscore_f1" else None, "created_at": now, "split": split,
         "model": model.label, "prompt": variant.prompt}
        for metric, value in values.items()
    ]


def write(lance_uri: str, rows: list[dict], rejections: list[Rejection], run: str) -> dict[str, int]:
    db = connect(lance_uri)
    typed = [{**r, "dataset_version": parse_dataset_version(r["dataset_version"])} for r in rows]
    res = merge(db, "evaluations", pa.Table.from_pylist(typed, schema=EVALUATIONS.schema))
    if res.inserted or res.updated:  # the run's rows, as lineage (quarantine tags its own writes)
        tag_run(db, "evaluations", f"{STAGE}-{run}", res.version)
    # nothing to quarantine: no merge (storage.lance.merge of 0 rows into a non-empty table fails on
    # an untyped empty mask, and there is nothing to write anyway)
    if rejections:
        q_version = quarantine(db, STAGE, rejections, run).version
    else:
        q_version = open_table(db, "quarantine").version if table_exists(db, "quarantine") else 0
    return {"evaluations_version": res.version, "inserted": res.inserted, "updated": res.updated,
            "quarantine_version": q_version}


def render_report(rows: list[dict], out_dir: Path, run: str) -> tuple[str, list[Path]]:
    """The run's Markdown (table, notes, the report's numbers beside ours) and its PNG charts."""
    charts = bar_charts(rows, out_dir, prefix=f"evaluate-{run[:8]}")
    md = markdown_table(rows, title=f"Evaluation run {run}")
    ref = reference_table(rows)
    if ref:
        md += "\n### Next to the report's published numbers\n\n" + ref
    (out_dir / "evaluation.md").write_text(md + "\n" + "\n".join(f"![{p.stem}]({p.name})" for p in charts) + "\n",
                                           encoding="utf-8")
    # The Prefect artifact carries the charts inline (a UI cannot read this machine's files).
    inline = "\n".join(f"![{p.stem}](data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()})\n\n"
                        f"`{p}`" for p in charts)
    return md + "\n" + inline + "\n", charts


# --- Prefect task wrappers -----------------------------------------------------------------------

load_task = task(load_eval_data, name="load-held-out", cache_policy=NO_CACHE)
resolve_task = task(resolve_model, name="resolve-variant-model", cache_policy=NO_CACHE)
requests_task = task(build_requests, name="build-eval-prompts", cache_policy=NO_CACHE)
# Generation is resumable through the response cache (per request), not through Prefect's cache.
generate_ollama_task = task(generate_ollama, name="generate-ollama", cache_policy=NO_CACHE, retries=1,
                            retry_delay_seconds=10)
generate_in_process_task = task(generate_in_process, name="generate-in-process", cache_policy=NO_CACHE)
# Scores are pure functions of their (content-hashed) inputs and this code: cached across runs.
score_task = task(score_generations, name="score-generations", cache_policy=INPUTS + TASK_SOURCE,
                  result_storage=METRIC_RESULTS, result_serializer="json")
rank_task = task(rank_options, name="rank-answer-options", cache_policy=INPUTS + TASK_SOURCE,
                 result_storage=METRIC_RESULTS, result_serializer="json")
prepare_memory_task = task(prepare_memory, name="load-memory-model", cache_policy=NO_CACHE)
generate_memory_task = task(generate_memory, name="generate-memory-model", cache_policy=NO_CACHE)
rank_memory_task = task(rank_memory, name="rank-answer-options-memory", cache_key_fn=_memory_rank_key,
                        result_storage=METRIC_RESULTS, result_serializer="json")
write_task = task(write, name="write-evaluations", retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE)
report_task = task(render_report, name="render-evaluation-report", cache_policy=NO_CACHE)


# --- past runs ------------------------------------------------------------------------------------


def read_runs(lance_uri: str, runs: list[str] | None = None, latest: int = 1) -> tuple[list[str], list[dict]]:
    """(run ids, their rows): the given runs (a unique prefix is enough), else the ``latest`` runs."""
    db = connect(lance_uri)
    if not table_exists(db, "evaluations"):
        raise FileNotFoundError(f"no evaluations table under {lance_uri}: run `mmem evaluate run` first")
    rows = [{**r, "dataset_version": format_dataset_version(r["dataset_version"])}  # as the report names it
            for r in read(db, "evaluations").to_pylist()]
    started: dict[str, datetime] = {}
    for r in rows:
        started[r["run_id"]] = min(started.get(r["run_id"], r["created_at"]), r["created_at"])
    if runs:
        chosen = []
        for want in runs:
            hits = [run for run in started if run == want] or [run for run in started if run.startswith(want)]
            if len(hits) != 1:
                raise KeyError(f"run {want!r} matches {len(hits)} runs; known: {sorted(started)}")
            chosen.append(hits[0])
    else:
        chosen = sorted(started, key=started.get)[-latest:]
    order = {run: i for i, run in enumerate(chosen)}
    picked = sorted((r for r in rows if r["run_id"] in order), key=lambda r: order[r["run_id"]])
    return chosen, picked
