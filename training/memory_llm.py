"""The memory model's frozen causal LM: where it is (a local folder, the tiny one, or a folder
inside a saved model), loading it (optionally 4-bit), and writing it into a saved model.

The checks here run in the plan step too (:func:`preflight`), so a missing LM folder or 4-bit
without CUDA fails before any data is read.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from embed.device import resolve_device

if TYPE_CHECKING:
    from training.memory_net import MemoryModel, MemoryModelConfig

LLM_DIR = "llm"  # the frozen LM's folder inside a saved model, named relative to it


def load_llm(path: Path | str, device: torch.device, *, load_in_4bit: bool = False,
             dtype: torch.dtype | None = None):
    """The frozen causal LM and its tokenizer from a local folder (or a hub id already in the
    Hugging Face cache: a saved model may name one instead of bundling the LM)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = Path(path).is_dir() or Path(path).is_absolute() or str(path).startswith(".")
    path = require_lm(Path(path)) if local else str(path)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if load_in_4bit:
        require_cuda_for_4bit(device)
        try:
            import bitsandbytes  # noqa: F401
            from transformers import BitsAndBytesConfig
        except ImportError as exc:
            raise ImportError("load_in_4bit needs bitsandbytes: pip install -e '.[gpu]'") from exc
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
        kwargs["device_map"] = {"": device.index or 0}
    llm = AutoModelForCausalLM.from_pretrained(path, local_files_only=local, **kwargs)
    if not load_in_4bit:
        llm = llm.to(device)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local)
    return llm.eval(), tokenizer


def require_lm(path: Path) -> Path:
    """``path``, if it holds a Hugging Face model folder; else an error that says what to put there."""
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"no causal LM at {path}: put a Hugging Face folder of LLaMA-3.2-1B (config.json, *.safetensors, "
            "tokenizer files) there, or use --tiny")
    return path


def require_cuda_for_4bit(device: torch.device) -> None:
    if device.type != "cuda":
        raise ValueError("load_in_4bit needs CUDA (bitsandbytes); set load_in_4bit=false on this machine")


def preflight(config: Any) -> None:
    """The checks a run would otherwise fail at after reading its data: the local LM folder exists,
    and 4-bit has a CUDA device (the plan step runs them first)."""
    if config.llm is not None:
        require_lm(Path(config.llm))
    elif not config.tiny:
        llm_path(config)  # raises: neither llm nor tiny
    if config.load_in_4bit:
        require_cuda_for_4bit(resolve_device(config.device))


def llm_path(config: Any) -> Path:
    """The configured LM folder, or (``tiny``) a tiny random LLaMA written under the data root."""
    if config.llm is not None:
        return require_lm(Path(config.llm))
    if not config.tiny:
        raise ValueError("train_memory needs llm (a local LLaMA-3.2-1B folder) or tiny=true")
    from training.tiny_llama import tiny_llama

    path = config.models_dir / f"tiny-llama-seed{config.seed}"
    return path if (path / "config.json").is_file() else tiny_llama(path, seed=config.seed)


def plain_llm_config(llm: nn.Module) -> dict[str, Any]:
    """The LM's architecture as the sub-config (without how this run happened to quantise it)."""
    cfg = llm.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "transformers_version"):
        cfg.pop(key, None)
    return cfg


def to_device_except_llm(model: MemoryModel, device: torch.device) -> MemoryModel:
    """Every part but a 4-bit LM onto ``device`` (bitsandbytes placed that one when it loaded it)."""
    for name, child in model.named_children():
        if name != "llm":
            child.to(device)
    model.query_tokens.data = model.query_tokens.data.to(device)
    return model


def llm_location(folder: Path, config: MemoryModelConfig, override: str | os.PathLike | None) -> Path | str:
    """Where the frozen LM of a saved model is: ``override``, else ``llm_name_or_path`` read
    relative to the saved model's folder (a bundled LM), else as a hub id or absolute path."""
    if override is not None:
        return Path(override)
    name = config.llm_name_or_path
    if not name:
        raise ValueError(f"{folder}/config.json names no LM (llm_name_or_path); pass llm=PATH")
    inside = folder / name
    if inside.is_dir() or not (Path(name).is_absolute() or "/" in name):
        return inside
    return Path(name) if Path(name).is_absolute() else name


def write_llm(model: MemoryModel, target: Path, *, link: bool) -> None:
    """The LM's folder: the files it was read from (byte for byte), or ``save_pretrained``."""
    shutil.rmtree(target, ignore_errors=True)
    source = model._llm_source
    if source is not None and Path(source).is_dir():
        def link_or_copy(src: str, dst: str) -> None:
            if link:
                try:
                    os.link(src, dst)
                    return
                except OSError:
                    pass
            shutil.copy2(src, dst)

        shutil.copytree(source, target, copy_function=link_or_copy,
                        ignore=shutil.ignore_patterns(".cache", ".git*", "*.lock"))
        return
    model.llm.save_pretrained(target)
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(target)


