"""The variants' answers, through the reminders' response cache (``llm_responses``, keyed by the
request hash) and the one fill loop (:mod:`llmcalls.fill`): cached answers are looked up, the rest
are asked shard by shard, each shard journaled and merged as it ends. Ollama variants go through
the same client and shard runner as the reminders stage; in-process checkpoints and the memory
model write the same rows (``backend = hf:<name>`` / ``memory:<name>``). So a re-run, or a run
killed half-way, makes only the calls that are not cached yet. Each generator is a ``produce``
callback: how one shard's unanswered requests get their answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from evaluation.data import EvalData
from evaluation.generation import generate, load_causal_lm, render
from evaluation.models import ResolvedModel
from evaluation.prompts import generation_options, memory_request
from evaluation.samples import Sample, build_samples
from llmcalls.auth import HostAuth
from llmcalls.cache import Journal, ResponseCache
from llmcalls.fill import Produce, plan_fill, run_fill
from llmcalls.requests import OK, LLMRequest, LLMResult
from llmcalls.shard import Endpoint, check_server, hosts_summary, run_shard
from schemas.config import host_url
from schemas.evaluate import DEFAULT_BATCH, MEMORY_CUDA_BATCH, EvaluateConfig, Variant
from schemas.quarantine import Rejection
from storage.progress import Progress, ProgressFn

log = logging.getLogger("mmem." + __name__)

# How a run holds a shared server's slots while it asks: given the host, a context that yields how
# many requests may be in flight (the task glue's global concurrency limit).
SlotHolder = Callable[[str], AbstractContextManager[int]]
# Everything a generator needs before its first shard (a loaded model, a checked server, held
# slots), set up only when some shard needs answers: given the progress bar, a context that yields
# the shards' ``produce``.
Start = Callable[[ProgressFn], AbstractContextManager[Produce]]


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


def answers(config: EvaluateConfig, requests: list[LLMRequest], label: str, shard_size: int,
            start: Start) -> dict[str, str]:
    """Each request's answer by hash: cached ones, plus those the shards ``start`` yields a
    ``produce`` for make; raises ``llmcalls.fill.FillIncomplete`` when some still have none."""
    fill = plan_fill(response_cache(config), requests, label, shard_size)
    if fill.needed:
        with Progress(len(fill.requests) - fill.cached, f"{label}: generate") as bar, start(bar) as produce:
            run_fill(fill, produce)
    return fill.responses()


def generate_ollama(config: EvaluateConfig, model: ResolvedModel, requests: list[LLMRequest], label: str,
                    auth: HostAuth, hold_slots: SlotHolder | None = None
                    ) -> tuple[dict[str, str], dict[str, dict]]:
    """Answers by request hash, new ones through the reminders' shard runner (``auth``: which host
    gets which token; ``hold_slots`` for a shared server; one this flow started needs neither), and
    each host's figures for the requests sent (:func:`llmcalls.shard.hosts_summary`; none if all
    were cached). A variant served at the config's default host spreads over all the config's hosts."""
    auth = HostAuth() if model.private else auth  # a server this flow started gets no token
    hosts = config.hosts if not model.private and model.host == config.host else [model.host]

    @contextlib.contextmanager
    def start(bar: ProgressFn) -> Iterator[Produce]:
        endpoint = Endpoint(model.host, timeout_s=config.timeout_s, max_attempts=config.max_attempts,
                            hosts=tuple(hosts) if len(hosts) > 1 else ())
        backend = check_server(endpoint, model.request_model, auth=auth)
        with contextlib.ExitStack() as held:
            caps = {url: held.enter_context(hold_slots(url)) if hold_slots is not None and not model.private
                    else config.concurrency for url in (host_url(h) for h in hosts)}
            workers = sum(caps.values())
            shards, done = itertools.count(), []

            def produce(todo: list[LLMRequest], journal: Path) -> None:
                done.append(asyncio.run(run_shard(next(shards), todo, endpoint, journal, workers, backend,
                                                  auth=auth, caps=caps if len(caps) > 1 else None)))
                bar(len(todo))

            yield produce
            figures.update(hosts_summary(done))
            for url, h in figures.items():  # each host's share, for the logs and the run's result
                log.info("%s: host %s: %d ok, %d errors, p50 %s s, p95 %s s, %d at once (learned), out %d "
                         "times", label, url, h["ok"], h["errors"], h["p50_s"], h["p95_s"], h["concurrency"],
                         h["downs"])

    figures: dict[str, dict] = {}
    return answers(config, requests, label, config.shard_size, start), figures


def generate_in_process(config: EvaluateConfig, model: ResolvedModel, requests: list[LLMRequest],
                        label: str, batch_size: int = DEFAULT_BATCH) -> dict[str, str]:
    """Answers by request hash from a local checkpoint (loaded only when some are missing), journaled
    and merged per shard of whole batches, so an interrupted run resumes where it stopped."""

    @contextlib.contextmanager
    def start(bar: ProgressFn) -> Iterator[Produce]:
        lm, tok = load_causal_lm(model.path, config.device)

        def produce(todo: list[LLMRequest], journal: Path) -> None:
            prompts = [render(tok, [_text_only(m) for m in r.messages]) for r in todo]
            t0 = time.perf_counter()
            texts = generate(lm, tok, prompts, batch_size=batch_size,
                             max_new_tokens=int(todo[0].options["num_predict"]), progress=bar)
            _journal(journal, todo, texts, (time.perf_counter() - t0) / len(todo), f"hf:{model.path.name}")

        yield produce

    return answers(config, requests, label, shard_step(config, batch_size), start)


def _journal(path: Path, requests: list[LLMRequest], texts: list[str], latency_s: float,
             backend: str) -> None:
    """One shard's in-process answers, as the response cache's journal rows."""
    with Journal(path) as journal:
        for req, text in zip(requests, texts, strict=True):
            journal.append(LLMResult(req.request_hash, OK, response=text, attempts=1, latency_s=latency_s,
                                     backend=backend).row(req, "in-process"))


def _text_only(message: dict) -> dict:
    return {k: v for k, v in message.items() if k != "images"}


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
    versions: dict[str, int] | None = None  # the same versions, by table


def prepare_memory(config: EvaluateConfig, variant: Variant, model: ResolvedModel,
                   data: EvalData) -> MemoryRun:
    """Load the memory model and the held-out turns' stored embeddings (every turn of each dialog)."""
    from evaluation.memory_eval import sample_keys
    from training.memory_data import build_memory_data, read_memory_inputs
    from training.memory_model import load_memory_model

    mm = load_memory_model(model.path, config.device)
    loaded = read_memory_inputs(config.lance_uri, [config.split], {})
    held = pa.array(data.dialogs.column("image_id").to_pylist(), pa.int64())
    loaded.turns = loaded.turns.filter(pc.is_in(loaded.turns.column("image_id"), held))
    mdata, rejections = build_memory_data(loaded, config.split, mm.tokenizer, mm.arch,
                                          limit_dialogs=config.limit)
    mdata = mdata.to(next(mm.parameters()).device)
    by_key = {s.key: s for s in build_samples(data.dialogs, data.turns, which="all")}
    samples = [by_key[k] for k in sample_keys(mdata)]
    read_at = {n: loaded.versions[n] for n in ("image_embeddings", "text_embeddings")}
    embeddings = ",".join(f"{n}@v{v}" for n, v in read_at.items())
    options = generation_options(config, variant)
    requests = [memory_request(model.request_model, mm.arch.prompt_template.format(question=s.question),
                               s.image_id, s.turn, embeddings, options) for s in samples]
    device = str(next(mm.parameters()).device)
    return MemoryRun(mm, mdata, samples, requests, rejections, generation_batch_size(config, variant, device),
                     embeddings, read_at)


def generate_memory(config: EvaluateConfig, model: ResolvedModel, run: MemoryRun,
                    label: str) -> dict[str, str]:
    """Answers by request hash: cached ones, plus the memory model's for the rest (journaled per
    shard of whole ``run.batch_size`` batches). benchmarks/eval_bench.py times this function."""
    from evaluation.memory_eval import memory_generate

    index = {r.request_hash: i for i, r in reversed(list(enumerate(run.requests)))}  # the first of repeats

    @contextlib.contextmanager
    def start(bar: ProgressFn) -> Iterator[Produce]:
        def produce(todo: list[LLMRequest], journal: Path) -> None:
            t0 = time.perf_counter()
            texts = memory_generate(run.model, run.data, indices=[index[r.request_hash] for r in todo],
                                    batch_size=run.batch_size,
                                    max_new_tokens=int(todo[0].options["num_predict"]), progress=bar)
            _journal(journal, todo, texts, (time.perf_counter() - t0) / len(todo),
                     f"memory:{model.artifact or model.path.name}")

        yield produce

    return answers(config, run.requests, label, shard_step(config, run.batch_size), start)
