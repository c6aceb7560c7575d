"""Batched greedy generation with a local Hugging Face causal LM, in-process.

Used for variants that name a local checkpoint instead of a served model, and by the speed
benchmark. Prompts are sorted by length so each batch pads little, left-padded (decoder-only
models continue from the right edge), and run through ``generate`` with its key/value cache;
greedy decoding makes a response a function of (checkpoint, prompt, options), which is what the
response cache keys on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from embed.device import resolve_device

Messages = list[dict[str, Any]]


def load_causal_lm(path: Path | str, device: str | None = None):
    """(model, tokenizer) from a local folder; bf16 on CUDA, fp32 on CPU. Fails clearly if absent."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no Hugging Face checkpoint at {folder} (config.json missing)")
    device = str(resolve_device(device))
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    return model, tokenizer


def render(tokenizer, messages: Messages) -> str:
    """The prompt text: the checkpoint's chat template when it has one, else the user text."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return (tokenizer.bos_token or "") + "\n\n".join(_text(m["content"]) for m in messages) + "\n"


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content if p.get("type") == "text")


def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    batch_size: int = 16,
    max_new_tokens: int = 64,
    progress: Callable[[int], None] | None = None,
) -> list[str]:
    """Greedy continuations of ``prompts`` (already rendered), in the order given."""
    import torch

    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[str] = [""] * len(prompts)
    for lo in range(0, len(order), batch_size):
        idx = order[lo : lo + batch_size]
        enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True,
                        add_special_tokens=False)
        enc = {k: v.to(device) for k, v in enc.items()}
        with torch.inference_mode():
            ids = model.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                pad_token_id=tokenizer.pad_token_id,
            )
        texts = tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        for i, text in zip(idx, texts, strict=True):
            out[i] = text.strip()
        if progress is not None:
            progress(len(idx))
    return out
