"""The report's Extraction-Memorization model: ImageBind embeddings in, the turn's answer out.

For a sample (dialog, turn t) the memory is the image and what was said before turn t:
position 0 carries [image ; caption] (VisDial's history starts with the caption), position k
(1..t-1) carries [image ; turn k's "Q: .. A: .." text], each as stored ImageBind-Huge vectors.
``imagebind_fc`` maps the 2048-d pair to 1024, ``turn_pe`` adds the position, a LayerNorm
follows, and a Q-Former (``transformers``' ``Blip2QFormerModel``) reads the memory through
cross-attention with learned query tokens. ``llm_proj`` turns its outputs into soft prompt
tokens for a frozen causal LM, which sees them before the question of turn t (as text) and is
trained to produce turn t's answer. Turn t's own embedding never enters the memory: it contains
the answer. The optional retrieval objective pulls a pooled memory towards the embedding of the
turn it answers (multi-positive InfoNCE: every turn of the same dialog in the batch is a positive).

Only ``imagebind_fc`` and ``turn_pe`` train by default, as in the report; the Q-Former (with its
query tokens) and ``llm_proj`` can be switched on. Training reads vectors from Lance tables, never
images: a batch is a gather from tensors that live on the training device.

The model is a ``transformers`` ``PreTrainedModel`` (config ``model_type`` ``mmem_memory``,
registered with ``AutoConfig`` / ``AutoModel`` when this module is imported). A saved model is
``config.json`` (the LM's config as a sub-config, the LM's folder named relative to the saved
one), ``model.safetensors`` with every weight except the frozen LM's, and the LM's own folder
``llm/`` (its files as it was read, so the frozen weights are stored once and never rewritten).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedConfig, PreTrainedModel

from embed.device import resolve_device
from schemas.embed import EMBED_DIM
from training.memory_data import NUM_POSITIONS, MemoryBatch
from training.memory_llm import (
    LLM_DIR,
    llm_location,
    load_llm,
    plain_llm_config,
    to_device_except_llm,
    write_llm,
)

MODEL_TYPE = "mmem_memory"
LEGACY_WEIGHTS = "memory_model.safetensors"  # the layout before the model was a PreTrainedModel
LEGACY_ARCH = "memory_config.json"
IGNORE = -100


class MemoryModelConfig(PreTrainedConfig):
    """Everything needed to rebuild the model: the memory parts' shape, what trains, and the frozen
    LM (its config as a sub-config; where its weights are as ``llm_name_or_path``: a folder relative
    to the saved model, or a hub id / absolute path when it is not bundled)."""

    model_type = MODEL_TYPE
    sub_configs: ClassVar[dict[str, type]] = {"llm_config": AutoConfig}

    num_query_tokens: int = 32
    qformer_hidden: int = 768
    qformer_layers: int = 12
    qformer_heads: int = 12
    qformer_intermediate: int = 3072
    qformer_cross_attention_frequency: int = 2
    qformer_dropout: float = 0.1
    prompt_template: str = "Question: {question} Answer:"
    max_prompt_tokens: int = 48
    max_answer_tokens: int = 24
    train_qformer: bool = False
    train_llm_proj: bool = False
    train_retrieval: bool = False
    embed_dim: int = EMBED_DIM
    num_positions: int = NUM_POSITIONS
    llm_config: dict | PreTrainedConfig | None = None
    llm_name_or_path: str | None = None
    llm_load_in_4bit: bool = False
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        if isinstance(self.llm_config, dict):
            from transformers import CONFIG_MAPPING

            # where this copy of the LM was read from is no part of the model (and no absolute path
            # may end up in config.json: a moved folder must still load)
            llm = {k: v for k, v in self.llm_config.items()
                   if k not in ("_name_or_path", "quantization_config")}
            self.llm_config = CONFIG_MAPPING[llm["model_type"]](**llm)
        super().__post_init__(**kwargs)

    @classmethod
    def from_config(cls, config: Any, **kwargs: Any) -> MemoryModelConfig:
        """The architecture a :class:`schemas.train.MemoryTrainConfig` asks for."""
        names = ("num_query_tokens", "qformer_hidden", "qformer_layers", "qformer_heads",
                 "qformer_intermediate", "qformer_cross_attention_frequency", "qformer_dropout",
                 "prompt_template", "max_prompt_tokens", "max_answer_tokens", "train_qformer",
                 "train_llm_proj")
        return cls(**{n: getattr(config, n) for n in names}, train_retrieval=config.infonce_weight > 0,
                   **kwargs)


MemoryArch = MemoryModelConfig  # the name the benchmarks and older code use


@dataclass
class MemoryOutput:
    loss: torch.Tensor
    ce: torch.Tensor
    infonce: torch.Tensor | None
    answer_tokens: int


class MemoryModel(PreTrainedModel):
    """A Hugging Face model: ``save_pretrained`` writes ``config.json`` and ``model.safetensors``
    (every weight but the frozen LM's) and the LM's own folder under ``llm/``;
    ``AutoModel.from_pretrained`` (once this module is imported) restores all of it.

    ``llm`` is attached after the memory parts are built: ``from_pretrained`` loads it from its
    own folder (``from_pretrained`` of the LM class), so it is never drawn at random and
    then overwritten, and never stored twice.
    """

    config_class = MemoryModelConfig
    base_model_prefix = ""  # no headless variant: the whole model is the base model
    main_input_name = "image"
    # the LM adds its own when attached; the LM ties its own weights
    _no_split_modules = ("Blip2QFormerLayer",)
    supports_gradient_checkpointing = False

    def __init__(self, config: MemoryModelConfig, llm: nn.Module | None = None, tokenizer: Any = None, *,
                 attach_llm: bool = True) -> None:
        super().__init__(config)
        from transformers import Blip2QFormerConfig, Blip2QFormerModel

        self.tokenizer = tokenizer
        self.imagebind_fc = nn.Linear(2 * config.embed_dim, config.embed_dim)
        self.turn_pe = nn.Embedding(config.num_positions, config.embed_dim)
        self.ln_memory = nn.LayerNorm(config.embed_dim)
        qcfg = Blip2QFormerConfig(
            hidden_size=config.qformer_hidden, num_hidden_layers=config.qformer_layers,
            num_attention_heads=config.qformer_heads, intermediate_size=config.qformer_intermediate,
            cross_attention_frequency=config.qformer_cross_attention_frequency,
            encoder_hidden_size=config.embed_dim,
            hidden_dropout_prob=config.qformer_dropout, attention_probs_dropout_prob=config.qformer_dropout,
        )
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, config.qformer_hidden))
        self.qformer = Blip2QFormerModel(qcfg)
        if llm is None and attach_llm:
            if config.llm_config is None:
                raise ValueError("MemoryModelConfig.llm_config is needed to build the frozen LM")
            from transformers import AutoModelForCausalLM

            llm = AutoModelForCausalLM.from_config(config.llm_config)
        hidden = llm.config.hidden_size if llm is not None else config.llm_config.hidden_size
        self.llm_proj = nn.Linear(config.qformer_hidden, hidden)
        self.retrieval_proj = nn.Linear(config.qformer_hidden, config.embed_dim)
        self.llm: nn.Module | None = None
        self._llm_source: Path | None = None  # the local folder the LM was read from (bundled on save)
        self.post_init()
        if llm is not None:
            self.attach_llm(llm, tokenizer)
        else:
            self.set_trainable()

    @property
    def arch(self) -> MemoryModelConfig:
        return self.config

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """PyTorch's own initialisation for the memory layers, N(0, 0.02) for the query tokens (the
        Q-Former and the LM bring their own)."""
        if module is self:
            nn.init.normal_(self.query_tokens, std=self.config.initializer_range)
        elif isinstance(module, (nn.Linear, nn.Embedding, nn.LayerNorm)):
            module.reset_parameters()

    def attach_llm(self, llm: nn.Module, tokenizer: Any = None, source: Path | None = None) -> MemoryModel:
        """Make ``llm`` the frozen LM (after ``from_pretrained`` has loaded the memory parts)."""
        expected = self.llm_proj.out_features
        if llm.config.hidden_size != expected:
            raise ValueError(f"the LM's hidden size is {llm.config.hidden_size}; this memory model projects "
                             f"to {expected}")
        self.llm = llm
        own = getattr(llm, "_no_split_modules", None) or ()
        self._no_split_modules = set(self._no_split_modules) | set(own)
        if tokenizer is not None:
            self.tokenizer = tokenizer
        self._llm_source = source
        self.llm.requires_grad_(False)
        self.set_trainable()
        self.train(self.training)
        return self

    def get_input_embeddings(self) -> nn.Module:
        return self.llm.get_input_embeddings()

    # --- which parts learn ----------------------------------------------------------------

    def trainable_modules(self) -> dict[str, nn.Module | nn.Parameter]:
        parts: dict[str, Any] = {"imagebind_fc": self.imagebind_fc, "turn_pe": self.turn_pe}
        if self.config.train_qformer:
            parts |= {"qformer": self.qformer, "query_tokens": self.query_tokens}
        if self.config.train_llm_proj:
            parts["llm_proj"] = self.llm_proj
        if self.config.train_retrieval:
            parts["retrieval_proj"] = self.retrieval_proj
        return parts

    def set_trainable(self) -> None:
        for name, p in self.named_parameters():
            if not name.startswith("llm."):
                p.requires_grad_(False)
        for part in self.trainable_modules().values():
            part.requires_grad_(True)

    def train(self, mode: bool = True) -> MemoryModel:
        """Frozen parts stay in eval mode (no dropout), as frozen parts should."""
        super().train(mode)
        if self.llm is not None:
            self.llm.eval()
        if not self.config.train_qformer:
            self.qformer.eval()
        return self

    def memory_state_dict(self) -> dict[str, torch.Tensor]:
        """Every weight except the frozen LM's (that one is saved in its own folder)."""
        return {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()
                if not k.startswith("llm.")}

    # --- saving and loading ---------------------------------------------------------------

    def save_pretrained(self, save_directory: str | os.PathLike, *, bundle_llm: bool = True,
                        link_llm: bool = False, **kwargs: Any) -> None:
        """``config.json`` + ``model.safetensors`` (the memory parts only) and, with ``bundle_llm``,
        the frozen LM's folder as ``llm/`` (its original files when it was read from a folder;
        ``link_llm`` hard-links them where the filesystem allows, instead of copying)."""
        folder = Path(save_directory)
        if bundle_llm:
            self.config.llm_name_or_path = LLM_DIR
        elif self.config.llm_name_or_path in (None, LLM_DIR):
            raise ValueError("bundle_llm=False needs config.llm_name_or_path to name the LM "
                             "(a hub id or a path)")
        super().save_pretrained(folder, state_dict=self.memory_state_dict(), **kwargs)
        if bundle_llm:
            write_llm(self, folder / LLM_DIR, link=link_llm)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *model_args: Any,
                        device: str | torch.device = "cpu", llm: str | os.PathLike | None = None,
                        **kwargs: Any) -> MemoryModel:
        """The memory parts from ``model.safetensors``, then the frozen LM from ``llm`` or the folder
        the config names (relative to the saved model), on ``device``."""
        folder = Path(pretrained_model_name_or_path)
        dev = resolve_device(device) if isinstance(device, str) else device
        if not (folder / "config.json").is_file() and (folder / LEGACY_ARCH).is_file():
            return _load_legacy(folder, dev, llm)
        kwargs.pop("attach_llm", None)
        model = super().from_pretrained(folder, *model_args, attach_llm=False, **kwargs)
        source = llm_location(folder, model.config, llm)
        lm, tokenizer = load_llm(source, dev, load_in_4bit=model.config.llm_load_in_4bit)
        model.attach_llm(lm, tokenizer, source if Path(source).is_dir() else None)
        placed = model.to(dev) if not model.config.llm_load_in_4bit else to_device_except_llm(model, dev)
        return placed.eval()

    # --- forward --------------------------------------------------------------------------

    def encode_memory(self, batch: MemoryBatch) -> torch.Tensor:
        """Q-Former outputs (B, num_query_tokens, qformer_hidden) for the batch's memories."""
        b = batch.image.shape[0]
        pairs = torch.cat([batch.image[:, None, :].expand(b, NUM_POSITIONS, EMBED_DIM), batch.texts], dim=-1)
        pos = torch.arange(NUM_POSITIONS, device=pairs.device)
        memory = self.ln_memory(self.imagebind_fc(pairs) + self.turn_pe(pos)[None])
        queries = self.query_tokens.expand(b, -1, -1)
        out = self.qformer(query_embeds=queries, encoder_hidden_states=memory,
                           encoder_attention_mask=batch.memory_mask.long())
        return out.last_hidden_state

    def soft_prompt(self, q_out: torch.Tensor) -> torch.Tensor:
        return self.llm_proj(q_out).to(self.llm.get_input_embeddings().weight.dtype)

    def forward(self, batch: MemoryBatch, infonce_weight: float = 0.0,
                temperature: float = 0.07) -> MemoryOutput:
        q_out = self.encode_memory(batch)
        soft = self.soft_prompt(q_out)
        embeds, mask, labels = self._train_sequence(soft, batch)
        hidden = self.llm.base_model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        # Only positions that predict an answer token go through the LM head (a 128k vocabulary
        # for every prompt position would dominate time and memory).
        targets = labels[:, 1:]
        where = targets != IGNORE
        logits = self.llm.get_output_embeddings()(hidden[:, :-1][where]).float()
        ce = F.cross_entropy(logits, targets[where])
        loss, nce = ce, None
        if infonce_weight > 0:
            nce = multi_positive_infonce(self.retrieval_proj(q_out.mean(dim=1).float()), batch.target,
                                         batch.group, temperature)
            loss = ce + infonce_weight * nce
        return MemoryOutput(loss, ce.detach(), None if nce is None else nce.detach(), int(where.sum()))

    def _train_sequence(self, soft: torch.Tensor, batch: MemoryBatch):
        """[soft prompt][question prompt][answer][right padding], its mask and its labels."""
        tok_emb = self.llm.get_input_embeddings()
        text_len = batch.prompt_len + batch.answer_len
        width = int(text_len.max())
        j = torch.arange(width, device=soft.device)[None]
        in_prompt = j < batch.prompt_len[:, None]
        in_answer = ~in_prompt & (j < text_len[:, None])
        p_idx = j.clamp(max=batch.prompt_ids.shape[1] - 1).expand_as(in_prompt)
        a_idx = (j - batch.prompt_len[:, None]).clamp(0, batch.answer_ids.shape[1] - 1)
        pad = self.pad_id
        ids = torch.where(in_prompt, batch.prompt_ids.gather(1, p_idx),
                          torch.where(in_answer, batch.answer_ids.gather(1, a_idx),
                                      torch.full_like(a_idx, pad)))
        labels = torch.where(in_answer, ids, torch.full_like(ids, IGNORE))
        n_soft = soft.shape[1]
        embeds = torch.cat([soft, tok_emb(ids)], dim=1)
        mask = torch.cat([torch.ones(soft.shape[:2], dtype=torch.long, device=soft.device),
                          (in_prompt | in_answer).long()], dim=1)
        soft_labels = torch.full((soft.shape[0], n_soft), IGNORE, dtype=ids.dtype, device=ids.device)
        labels = torch.cat([soft_labels, labels], dim=1)
        return embeds, mask, labels

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    @torch.no_grad()
    def generate(self, batch: MemoryBatch, max_new_tokens: int = 24, **kwargs: Any) -> list[str]:
        """Greedy answers for the batch's questions (turn t's answer is not used)."""
        soft = self.soft_prompt(self.encode_memory(batch))
        b, n_soft, _ = soft.shape
        width = int(batch.prompt_len.max())
        # left padding: [pad..][soft prompt][question], so every row ends where generation starts
        total = n_soft + width
        j = torch.arange(total, device=soft.device)[None]
        lead = (width - batch.prompt_len)[:, None]
        src = (j - lead).clamp(min=0)
        in_soft = (j >= lead) & (src < n_soft)
        in_prompt = src >= n_soft
        p_idx = (src - n_soft).clamp(0, batch.prompt_ids.shape[1] - 1)
        tok_emb = self.llm.get_input_embeddings()(batch.prompt_ids.gather(1, p_idx))
        s_idx = src.clamp(max=n_soft - 1)
        soft_g = soft.gather(1, s_idx[..., None].expand(b, total, soft.shape[-1]))
        embeds = torch.where(in_soft[..., None], soft_g, torch.where(in_prompt[..., None], tok_emb,
                                                                     torch.zeros_like(tok_emb)))
        mask = (in_soft | in_prompt).long()
        tok = self.tokenizer
        out = self.llm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max_new_tokens,
                                do_sample=False, pad_token_id=self.pad_id, **kwargs)
        return [s.strip() for s in tok.batch_decode(out, skip_special_tokens=True)]


def multi_positive_infonce(z: torch.Tensor, targets: torch.Tensor, group: torch.Tensor,
                           temperature: float) -> torch.Tensor:
    """Mean over anchors of the mean log-likelihood of each positive among all targets in the batch."""
    logits = F.normalize(z, dim=-1) @ F.normalize(targets.float(), dim=-1).T / temperature
    positive = (group[:, None] == group[None, :]).float()
    log_prob = logits.log_softmax(dim=-1)
    return -((log_prob * positive).sum(1) / positive.sum(1)).mean()



def load_memory_weights(model: MemoryModel, source: Path, strict: bool = True) -> list[str]:
    """Load memory weights from a saved model's folder (``model.safetensors``, or the older
    ``memory_model.safetensors``) or a .safetensors file; returns the keys not found."""
    from safetensors.torch import load_file
    from transformers.utils import SAFE_WEIGHTS_NAME

    file = source
    if source.is_dir():
        current = source / SAFE_WEIGHTS_NAME
        file = current if current.is_file() else source / LEGACY_WEIGHTS
    if not file.is_file():
        raise FileNotFoundError(f"no memory-model weights at {file}")
    state = load_file(str(file))
    own = model.memory_state_dict()
    unknown = sorted(set(state) - set(own))
    if unknown:
        raise ValueError(f"{file} has weights this model does not: {unknown[:5]}")
    shapes = [k for k in state if state[k].shape != own[k].shape]
    if shapes:
        raise ValueError(f"{file}: shapes differ for {shapes[:5]}")
    missing = sorted(set(own) - set(state))
    if strict and missing:
        raise ValueError(f"{file} lacks weights {missing[:5]}")
    model.load_state_dict(state, strict=False)
    return missing


def _load_legacy(folder: Path, device: torch.device, llm: str | os.PathLike | None) -> MemoryModel:
    """An artifact written before the model was a ``PreTrainedModel``: ``memory_config.json`` (with
    the LM's path, relative or absolute) and ``memory_model.safetensors``."""
    arch = json.loads((folder / LEGACY_ARCH).read_text())
    llm_info = arch.pop("llm", None) or {}
    recorded = Path(llm_info.get("path") or LLM_DIR)
    path = Path(llm) if llm else (recorded if recorded.is_absolute() else folder / recorded)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{folder} is a memory model in the older layout whose LM ({path}) is gone: pass llm=PATH to the "
            "same LM, or retrain it (mmem train memory) to get a self-contained Hugging Face folder")
    four_bit = bool(llm_info.get("load_in_4bit"))
    lm, tokenizer = load_llm(path, device, load_in_4bit=four_bit)
    config = MemoryModelConfig(**arch, llm_config=plain_llm_config(lm), llm_name_or_path=LLM_DIR,
                               llm_load_in_4bit=four_bit)
    model = MemoryModel(config, lm, tokenizer)
    model._llm_source = path
    load_memory_weights(model, folder)
    return (model.to(device) if not config.llm_load_in_4bit else to_device_except_llm(model, device)).eval()


AutoConfig.register(MODEL_TYPE, MemoryModelConfig, exist_ok=True)
AutoModel.register(MemoryModelConfig, MemoryModel, exist_ok=True)

