"""What each variant is asked: one request per held-out sample, in the variant's prompt style.

A request (model, messages, options) is the response cache's key, so the prompt text, the image's
content hash and the generation options decide whether an answer is asked for again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from evaluation.generation import render
from evaluation.models import ResolvedModel
from evaluation.samples import Sample
from llmcalls.requests import ImageRef, LLMRequest
from reminders.prompts import conversation_text, system_prompt
from schemas.evaluate import EvaluateConfig, Variant
from schemas.quarantine import Reason, Rejection
from schemas.reminders import load_prompt_data
from storage.artifacts import ArtifactStore

BASE_INSTRUCTION = "Answer the last question about the image with one short sentence."


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
        return [{"role": "system", "content": system["prompt"]},
                {"role": "user", "content": f"conversation:\n{conv}"}]
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


def memory_request(request_model: str, prompt: str, image_id: int, turn: int, embeddings: str,
                   options: dict) -> LLMRequest:
    """The cache key of one memory-model answer: the model's content id, its question prompt, the
    dialog turn whose memory it reads, and the embedding tables' versions that memory comes from."""
    return LLMRequest(request_model, ({"role": "user", "content": prompt,
                                       "memory": f"visdial:{image_id}:{turn}",
                                       "embeddings": embeddings},), options)


def ranking_inputs(model: ResolvedModel, samples: list[Sample]) -> tuple[list[str], list[list[str]]]:
    """Each turn's context (the dialog up to its question, in the checkpoint's chat format) and options."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model.path)
    base = Variant(name="ranking", backend="hf", model=str(model.path), prompt="base")
    contexts = [render(tok, prompt_messages(base, s, {})) for s in samples]
    return contexts, [list(s.options) for s in samples]
