"""The memory model, as users and the training run use it: build one for a training config, save
it, load a saved one. Importing this module registers the model with ``transformers``
(``AutoConfig`` / ``AutoModel``, model type ``mmem_memory``), so ``AutoModel.from_pretrained(folder)``
loads a saved model after ``import training.memory_model``.

Where the parts live: the model itself in :mod:`training.memory_net`, its data (Lance vectors ->
device tensors) in :mod:`training.memory_data`, the frozen LM in :mod:`training.memory_llm`, the
training loop in :mod:`training.memory_loop`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoModel

from embed.device import resolve_device
from training.memory_llm import LLM_DIR, llm_path, load_llm, plain_llm_config, to_device_except_llm
from training.memory_net import MemoryModel, MemoryModelConfig, load_memory_weights


def build_memory_model(config: Any, device: torch.device | None = None) -> MemoryModel:
    """The memory model for a :class:`schemas.train.MemoryTrainConfig` (deterministic from its seed)."""
    device = device or resolve_device(config.device)
    path = llm_path(config)
    llm, tokenizer = load_llm(path, device, load_in_4bit=config.load_in_4bit)
    arch = MemoryModelConfig.from_config(config, llm_config=plain_llm_config(llm), llm_name_or_path=LLM_DIR,
                                         llm_load_in_4bit=config.load_in_4bit)
    torch.manual_seed(config.seed)
    model = MemoryModel(arch, llm, tokenizer)
    model._llm_source = path
    if config.init_from is not None:
        load_memory_weights(model, Path(config.init_from), strict=False)
    return model.to(device) if not config.load_in_4bit else to_device_except_llm(model, device)


def save_memory_model(model: MemoryModel, folder: Path, *, copy_llm: bool = True) -> None:
    """``model.save_pretrained(folder)``: config.json, model.safetensors and the LM under ``llm/``
    (copied; without ``copy_llm`` hard-linked to the folder it was read from where possible)."""
    model.save_pretrained(folder, link_llm=not copy_llm)


def load_memory_model(
    folder: Path, device: str | torch.device = "auto", llm: Path | None = None
) -> MemoryModel:
    """A saved memory model (an artifact version folder) through ``AutoModel.from_pretrained``,
    ready for :meth:`MemoryModel.generate`; older artifacts (``memory_config.json``) load too."""
    folder = Path(folder)
    dev = resolve_device(device)
    if not (folder / "config.json").is_file():
        return MemoryModel.from_pretrained(folder, device=dev, llm=llm)  # the older layout
    return AutoModel.from_pretrained(folder, device=dev, llm=llm)
