"""A local Hugging Face checkpoint (a tiny random Gemma3 in the tests, a fine-tuned LoRA adapter
later) as a backend, through transformers' processor and the model's forward pass."""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import random
import threading
import time
from pathlib import Path

from llmcalls.server.protocol import MAX_IMAGE_PIXELS, BadRequest, Generation, Limits


class HFBackend:
    """A local checkpoint (full model or PEFT adapter) through transformers.

    Fitting a request to the model: ``num_predict`` is clamped to ``limits.max_predict`` and
    ``num_ctx`` to ``limits.max_ctx`` and the model's context length. The prompt keeps at most
    ``max(num_ctx - num_predict, num_ctx // 2)`` tokens: a longer one is TRUNCATED, keeping its end
    (the open question and the generation prompt) and its first token (BOS), as Ollama does; it is
    refused (400) only when the cut would split an image's tokens. Generation stops at
    ``num_predict`` tokens or when prompt + answer fill ``num_ctx``. Message texts are cut to what
    can still reach the kept end before tokenizing, so a big body never becomes a big tokenization.

    Fairness: a forward pass is not re-entrant, so generations take turns on the model. Each turn
    runs one generation for ``limits.slice_s`` (at least one step: a prefill chunk or one token) in
    a worker thread, and turns are granted first come first served (an asyncio lock wakes its
    waiters in order; a generation that used its slice queues again behind the others). So every
    request in flight gets an equal share of the model, and a short request is never queued behind
    the whole of a long one. Each request keeps its own KV cache and random generator, so its
    answer does not depend on what else is running."""

    family = "gemma3"
    PREFILL_CHUNK = 256  # prompt tokens per step of a text-only prefill (an image prompt goes in one)

    def __init__(self, path: str | Path, device: str = "cpu", limits: Limits | None = None) -> None:
        path = Path(path)
        if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
            raise FileNotFoundError(
                f"no Hugging Face checkpoint at {path} (expected config.json or adapter_config.json); "
                "build a tiny one with training.tiny_models.tiny_gemma3(path) or point --model at a saved "
                "model"
            )
        self.kind = f"hf:{path.name}"
        self.device = device
        self.limits = limits or Limits()
        self._turns = asyncio.Lock()  # the order of turns (FIFO)
        self._model_lock = threading.Lock()  # the mutual exclusion itself (a cancelled turn's thread runs on)
        self.model, self.processor, self.vision = _load_checkpoint(path, device)
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        config = getattr(self.model.config, "text_config", self.model.config)
        self.context_length = int(getattr(config, "max_position_embeddings", 0) or self.limits.max_ctx)
        self.max_token_chars = max((len(t) for t in self.tokenizer.get_vocab()), default=64)
        eos = self.model.generation_config.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            self.eos.add(self.tokenizer.eos_token_id)
        self.image_token_id = getattr(self.processor, "image_token_id", None)

    async def generate(self, messages: list[dict], options: dict) -> Generation:
        job = await self._turn(_Decoding, self, messages, options)
        while not await self._turn(job.advance, self.limits.slice_s):
            pass
        return job.result()

    async def _turn(self, fn, *args):
        async with self._turns:
            return await asyncio.to_thread(self._locked, fn, *args)

    def _locked(self, fn, *args):
        with self._model_lock:
            return fn(*args)


def _int_option(options: dict, name: str, default: int) -> int:
    value = options.get(name)
    return default if value is None else int(value)


class _Decoding:
    """One request's generation, advanced a time slice at a time by ``HFBackend``."""

    def __init__(self, backend: HFBackend, messages: list[dict], options: dict) -> None:
        import torch

        self.b, self.torch = backend, torch
        limits = backend.limits
        ctx = max(16, min(_int_option(options, "num_ctx", limits.default_ctx), limits.max_ctx,
                          backend.context_length))
        predict = _int_option(options, "num_predict", limits.default_predict)
        predict = limits.max_predict if predict <= 0 else min(predict, limits.max_predict)
        keep = max(ctx - predict, ctx // 2)
        self.ctx, self.predict = ctx, predict

        inputs = self._encode(messages, keep_chars=(keep + 1) * backend.max_token_chars)
        ids = inputs["input_ids"]
        if ids.shape[1] > keep:
            inputs = self._truncate(inputs, keep)
        self.inputs = {k: v.to(backend.device) if hasattr(v, "to") else v for k, v in inputs.items()}
        self.prompt = self.inputs["input_ids"]
        self.fed = 0  # prompt tokens already in the cache
        self.cache = None
        self.logits = None
        self.new: list[int] = []
        self.text = ""
        self.done = False
        temperature = float(options.get("temperature", 0.8))
        self.sample = temperature > 0
        self.generator = torch.Generator(device=backend.device)
        seed = options.get("seed")
        self.generator.manual_seed(int(seed) if seed is not None else random.getrandbits(63))
        if self.sample:
            from transformers.generation.logits_process import (
                LogitsProcessorList,
                TemperatureLogitsWarper,
                TopKLogitsWarper,
                TopPLogitsWarper,
            )

            top_k = int(options.get("top_k", 40))  # 0 or less: no top-k cut (as Ollama)
            self.warpers = LogitsProcessorList([
                TemperatureLogitsWarper(temperature),
                *([TopKLogitsWarper(top_k)] if top_k > 0 else []),
                TopPLogitsWarper(min(1.0, max(1e-6, float(options.get("top_p", 0.9))))),
            ])

    def _encode(self, messages: list[dict], keep_chars: int) -> dict:
        """The chat-templated, tokenized prompt; texts longer than ``keep_chars`` lose their start
        first (those characters could not reach the kept end of the prompt anyway)."""
        from PIL import Image

        b = self.b
        images, hf_messages = [], []
        for m in messages:
            parts = []
            for img in (m.get("images") or []) if b.vision else []:
                try:
                    im = Image.open(io.BytesIO(base64.b64decode(img, validate=True)))
                    if im.width * im.height > MAX_IMAGE_PIXELS:
                        raise BadRequest(f"an image of {im.width}x{im.height} pixels is larger than this "
                                         "server takes")
                    images.append(im.convert("RGB"))
                except (binascii.Error, OSError, ValueError, Image.DecompressionBombError) as exc:
                    if isinstance(exc, BadRequest):
                        raise
                    raise BadRequest("an image is not base64 of a PNG/JPEG/... file") from None
                parts.append({"type": "image"})
            text = m.get("content") or ""
            parts.append({"type": "text", "text": text[-keep_chars:]})
            hf_messages.append({"role": m.get("role") or "user", "content": parts})
        text = b.processor.apply_chat_template(hf_messages, add_generation_prompt=True, tokenize=False)
        kwargs = {"images": [images]} if images else {}
        return dict(b.processor(text=[text], return_tensors="pt", **kwargs))

    def _truncate(self, inputs: dict, keep: int) -> dict:
        ids = inputs["input_ids"]
        n = ids.shape[1]
        bos = self.b.tokenizer.bos_token_id
        head = 1 if bos is not None and int(ids[0, 0]) == bos else 0
        cut = slice(head, n - keep + head)  # the tokens dropped
        if "pixel_values" in inputs and self.b.image_token_id is not None and \
                bool((ids[:, cut] == self.b.image_token_id).any()):
            raise BadRequest(f"the prompt ({n} tokens) does not fit num_ctx={self.ctx} with num_predict="
                             f"{self.predict} without cutting an image: raise num_ctx or send less")
        out = {}
        for k, v in inputs.items():
            if hasattr(v, "shape") and v.ndim == 2 and v.shape[1] == n:
                v = self.torch.cat([v[:, :head], v[:, cut.stop:]], dim=1)
            out[k] = v
        return out

    def advance(self, budget_s: float) -> bool:
        """Run prefill chunks or decoding steps for about ``budget_s`` (at least one); True when done."""
        torch = self.torch
        t_end = time.perf_counter() + budget_s
        with torch.inference_mode():
            while not self.done:
                if self.fed < self.prompt.shape[1]:
                    self._prefill()
                else:
                    self._step()
                if time.perf_counter() >= t_end:
                    break
        if self.done:  # decoded here, under the model lock: a fast tokenizer is not safe across threads
            self.text = self.b.tokenizer.decode(self.new, skip_special_tokens=True)
            self.cache = self.logits = None  # free the KV cache as soon as the answer is complete
        return self.done

    def _prefill(self) -> None:
        n = self.prompt.shape[1]
        if "pixel_values" in self.inputs or self.b.PREFILL_CHUNK >= n:
            out = self.b.model(**self.inputs, use_cache=True)
            self.fed = n
        else:
            end = min(n, self.fed + self.b.PREFILL_CHUNK)
            out = self.b.model(input_ids=self.prompt[:, self.fed:end], past_key_values=self.cache,
                               attention_mask=self._mask(end), use_cache=True)
            self.fed = end
        self.cache, self.logits = out.past_key_values, out.logits[:, -1]

    def _step(self) -> None:
        torch = self.torch
        scores = self.logits.float()
        if self.sample:
            scores = self.warpers(self.prompt, scores)
            token = torch.multinomial(scores.softmax(-1), 1, generator=self.generator)
        else:
            token = scores.argmax(-1, keepdim=True)
        tid = int(token)
        if tid in self.b.eos:
            self.done = True
            return
        self.new.append(tid)
        length = self.prompt.shape[1] + len(self.new)
        if len(self.new) >= self.predict or length >= self.ctx:
            self.done = True
            return
        out = self.b.model(input_ids=token, past_key_values=self.cache, attention_mask=self._mask(length),
                           use_cache=True)
        self.cache, self.logits = out.past_key_values, out.logits[:, -1]

    def _mask(self, length: int):
        return self.torch.ones(1, length, dtype=self.torch.long, device=self.prompt.device)

    def result(self) -> Generation:
        return Generation(self.text, int(self.prompt.shape[1]), len(self.new))


def _load_checkpoint(path: Path, device: str):
    """(model, processor, has_vision) for a full checkpoint or a PEFT adapter over one."""
    import transformers

    base = path
    adapter = path / "adapter_config.json"
    if adapter.is_file():
        base = Path(json.loads(adapter.read_text())["base_model_name_or_path"])
    config = transformers.AutoConfig.from_pretrained(base)
    vision = hasattr(config, "vision_config")
    auto = transformers.AutoModelForImageTextToText if vision else transformers.AutoModelForCausalLM
    model = auto.from_pretrained(base)
    if adapter.is_file():
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, path)
    loader = transformers.AutoProcessor if vision else transformers.AutoTokenizer
    try:
        processor = loader.from_pretrained(path)
    except (OSError, ValueError):
        processor = loader.from_pretrained(base)
    return model.to(device).eval(), processor, vision
