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
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedConfig, PreTrainedModel

from schemas.embed import EMBED_DIM
from schemas.ingest import NUM_TURNS
from schemas.quarantine import Reason, Rejection

NUM_POSITIONS = NUM_TURNS + 1  # position 0 = the image (with its caption), 1..10 = the turns
MODEL_TYPE = "mmem_memory"
LLM_DIR = "llm"  # the frozen LM's folder inside a saved model, named relative to it
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
            llm = {k: v for k, v in self.llm_config.items() if k not in ("_name_or_path", "quantization_config")}
            self.llm_config = CONFIG_MAPPING[llm["model_type"]](**llm)
        super().__post_init__(**kwargs)

    @classmethod
    def from_config(cls, config: Any, **kwargs: Any) -> MemoryModelConfig:
        """The architecture a :class:`schemas.train.MemoryTrainConfig` asks for."""
        names = ("num_query_tokens", "qformer_hidden", "qformer_layers", "qformer_heads", "qformer_intermediate",
                 "qformer_cross_attention_frequency", "qformer_dropout", "prompt_template", "max_prompt_tokens",
                 "max_answer_tokens", "train_qformer", "train_llm_proj")
        return cls(**{n: getattr(config, n) for n in names}, train_retrieval=config.infonce_weight > 0, **kwargs)


MemoryArch = MemoryModelConfig  # the name the benchmarks and older code use


@dataclass
class MemoryBatch:
    """Tensors of one batch, on the model's device."""

    image: torch.Tensor  # (B, 1024)
    texts: torch.Tensor  # (B, 11, 1024): caption, turns 1..10
    memory_mask: torch.Tensor  # (B, 11) bool: positions < t
    prompt_ids: torch.Tensor  # (B, Lp) right-padded
    prompt_len: torch.Tensor  # (B,)
    answer_ids: torch.Tensor  # (B, La) right-padded, ends with eos
    answer_len: torch.Tensor  # (B,)
    target: torch.Tensor  # (B, 1024): turn t's own embedding (retrieval target)
    group: torch.Tensor  # (B,) dialog index: same dialog = positive pair


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
    _no_split_modules = ("Blip2QFormerLayer",)  # the LM adds its own when attached; the LM ties its own weights
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
            cross_attention_frequency=config.qformer_cross_attention_frequency, encoder_hidden_size=config.embed_dim,
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
            raise ValueError(f"the LM's hidden size is {llm.config.hidden_size}; this memory model projects to "
                             f"{expected}")
        self.llm = llm
        self._no_split_modules = set(self._no_split_modules) | set(getattr(llm, "_no_split_modules", None) or ())
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
        return {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items() if not k.startswith("llm.")}

    # --- saving and loading ---------------------------------------------------------------

    def save_pretrained(self, save_directory: str | os.PathLike, *, bundle_llm: bool = True, link_llm: bool = False,
                        **kwargs: Any) -> None:
        """``config.json`` + ``model.safetensors`` (the memory parts only) and, with ``bundle_llm``,
        the frozen LM's folder as ``llm/`` (its original files when it was read from a folder;
        ``link_llm`` hard-links them where the filesystem allows, instead of copying)."""
        folder = Path(save_directory)
        if bundle_llm:
            self.config.llm_name_or_path = LLM_DIR
        elif self.config.llm_name_or_path in (None, LLM_DIR):
            raise ValueError("bundle_llm=False needs config.llm_name_or_path to name the LM (a hub id or a path)")
        super().save_pretrained(folder, state_dict=self.memory_state_dict(), **kwargs)
        if bundle_llm:
            _write_llm(self, folder / LLM_DIR, link=link_llm)

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
        source = _llm_location(folder, model.config, llm)
        lm, tokenizer = load_llm(source, dev, load_in_4bit=model.config.llm_load_in_4bit)
        model.attach_llm(lm, tokenizer, source if Path(source).is_dir() else None)
        return (model.to(dev) if not model.config.llm_load_in_4bit else _to_device_except_llm(model, dev)).eval()

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

    def forward(self, batch: MemoryBatch, infonce_weight: float = 0.0, temperature: float = 0.07) -> MemoryOutput:
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
                          torch.where(in_answer, batch.answer_ids.gather(1, a_idx), torch.full_like(a_idx, pad)))
        labels = torch.where(in_answer, ids, torch.full_like(ids, IGNORE))
        n_soft = soft.shape[1]
        embeds = torch.cat([soft, tok_emb(ids)], dim=1)
        mask = torch.cat([torch.ones(soft.shape[:2], dtype=torch.long, device=soft.device),
                          (in_prompt | in_answer).long()], dim=1)
        labels = torch.cat([torch.full((soft.shape[0], n_soft), IGNORE, dtype=ids.dtype, device=ids.device), labels],
                           dim=1)
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


def multi_positive_infonce(z: torch.Tensor, targets: torch.Tensor, group: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over anchors of the mean log-likelihood of each positive among all targets in the batch."""
    logits = F.normalize(z, dim=-1) @ F.normalize(targets.float(), dim=-1).T / temperature
    positive = (group[:, None] == group[None, :]).float()
    log_prob = logits.log_softmax(dim=-1)
    return -((log_prob * positive).sum(1) / positive.sum(1)).mean()


# --- building ---------------------------------------------------------------------------------


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda was asked for but torch sees no CUDA device")
    return torch.device(device)


def load_llm(path: Path | str, device: torch.device, *, load_in_4bit: bool = False,
             dtype: torch.dtype | None = None):
    """The frozen causal LM and its tokenizer from a local folder (or a hub id already in the
    Hugging Face cache: a saved model may name one instead of bundling the LM)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = Path(path).is_dir() or Path(path).is_absolute() or str(path).startswith(".")
    path = _require_lm(Path(path)) if local else str(path)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if load_in_4bit:
        _require_cuda_for_4bit(device)
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


def _require_lm(path: Path) -> Path:
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"no causal LM at {path}: put a Hugging Face folder of LLaMA-3.2-1B (config.json, *.safetensors, "
            "tokenizer files) there, or use --tiny")
    return path


def _require_cuda_for_4bit(device: torch.device) -> None:
    if device.type != "cuda":
        raise ValueError("load_in_4bit needs CUDA (bitsandbytes); set load_in_4bit=false on this machine")


def preflight(config: Any) -> None:
    """The checks a run would otherwise fail at after reading its data: the local LM folder exists,
    and 4-bit has a CUDA device (the plan step runs them first)."""
    if config.llm is not None:
        _require_lm(Path(config.llm))
    elif not config.tiny:
        llm_path(config)  # raises: neither llm nor tiny
    if config.load_in_4bit:
        _require_cuda_for_4bit(resolve_device(config.device))


def llm_path(config: Any) -> Path:
    """The configured LM folder, or (``tiny``) a tiny random LLaMA written under the data root."""
    if config.llm is not None:
        return _require_lm(Path(config.llm))
    if not config.tiny:
        raise ValueError("train_memory needs llm (a local LLaMA-3.2-1B folder) or tiny=true")
    from training.tiny_llama import tiny_llama

    path = config.models_dir / f"tiny-llama-seed{config.seed}"
    return path if (path / "config.json").is_file() else tiny_llama(path, seed=config.seed)


def build_memory_model(config: Any, device: torch.device | None = None) -> MemoryModel:
    """The memory model for a :class:`schemas.train.MemoryTrainConfig` (deterministic from its seed)."""
    device = device or resolve_device(config.device)
    path = llm_path(config)
    llm, tokenizer = load_llm(path, device, load_in_4bit=config.load_in_4bit)
    arch = MemoryModelConfig.from_config(config, llm_config=_plain_llm_config(llm), llm_name_or_path=LLM_DIR,
                                         llm_load_in_4bit=config.load_in_4bit)
    torch.manual_seed(config.seed)
    model = MemoryModel(arch, llm, tokenizer)
    model._llm_source = path
    if config.init_from is not None:
        load_memory_weights(model, Path(config.init_from), strict=False)
    return model.to(device) if not config.load_in_4bit else _to_device_except_llm(model, device)


def _plain_llm_config(llm: nn.Module) -> dict[str, Any]:
    """The LM's architecture as the sub-config (without how this run happened to quantise it)."""
    cfg = llm.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "transformers_version"):
        cfg.pop(key, None)
    return cfg


def _to_device_except_llm(model: MemoryModel, device: torch.device) -> MemoryModel:
    for name, child in model.named_children():
        if name != "llm":
            child.to(device)
    model.query_tokens.data = model.query_tokens.data.to(device)
    return model


def _llm_location(folder: Path, config: MemoryModelConfig, override: str | os.PathLike | None) -> Path | str:
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


def _write_llm(model: MemoryModel, target: Path, *, link: bool) -> None:
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


def load_memory_weights(model: MemoryModel, source: Path, strict: bool = True) -> list[str]:
    """Load memory weights from a saved model's folder (``model.safetensors``, or the older
    ``memory_model.safetensors``) or a .safetensors file; returns the keys not found."""
    from safetensors.torch import load_file
    from transformers.utils import SAFE_WEIGHTS_NAME

    file = source
    if source.is_dir():
        file = source / SAFE_WEIGHTS_NAME if (source / SAFE_WEIGHTS_NAME).is_file() else source / LEGACY_WEIGHTS
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


def save_memory_model(model: MemoryModel, folder: Path, *, copy_llm: bool = True) -> None:
    """``model.save_pretrained(folder)``: config.json, model.safetensors and the LM under ``llm/``
    (copied; without ``copy_llm`` hard-linked to the folder it was read from where possible)."""
    model.save_pretrained(folder, link_llm=not copy_llm)


def load_memory_model(folder: Path, device: str | torch.device = "auto", llm: Path | None = None) -> MemoryModel:
    """A saved memory model (an artifact version folder) through ``AutoModel.from_pretrained``,
    ready for :meth:`MemoryModel.generate`; older artifacts (``memory_config.json``) load too."""
    folder = Path(folder)
    dev = resolve_device(device) if isinstance(device, str) else device
    if not (folder / "config.json").is_file():
        return MemoryModel.from_pretrained(folder, device=dev, llm=llm)  # the older layout
    return AutoModel.from_pretrained(folder, device=dev, llm=llm)


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
    config = MemoryModelConfig(**arch, llm_config=_plain_llm_config(lm), llm_name_or_path=LLM_DIR,
                               llm_load_in_4bit=four_bit)
    model = MemoryModel(config, lm, tokenizer)
    model._llm_source = path
    load_memory_weights(model, folder)
    return (model.to(device) if not config.llm_load_in_4bit else _to_device_except_llm(model, device)).eval()


AutoConfig.register(MODEL_TYPE, MemoryModelConfig, exist_ok=True)
AutoModel.register(MemoryModelConfig, MemoryModel, exist_ok=True)


# --- data: Lance embedding tables -> tensors on the device ------------------------------------


@dataclass
class MemoryData:
    """All samples of one split as device tensors; a batch is a gather (no decoding, no workers)."""

    image_ids: np.ndarray  # (D,) dialog order
    image: torch.Tensor  # (D, 1024)
    texts: torch.Tensor  # (D, 11, 1024)
    dialog: torch.Tensor  # (N,) index into the dialog arrays
    turn: torch.Tensor  # (N,) 1..10
    prompt_ids: torch.Tensor  # (N, Lp)
    prompt_len: torch.Tensor
    answer_ids: torch.Tensor  # (N, La)
    answer_len: torch.Tensor
    answers: list[str]  # reference answers, for evaluation

    def __len__(self) -> int:
        return int(self.dialog.shape[0])

    def batch(self, idx: torch.Tensor) -> MemoryBatch:
        idx = idx.to(self.dialog.device)
        d, t = self.dialog[idx], self.turn[idx]
        pos = torch.arange(NUM_POSITIONS, device=idx.device)[None]
        lp, la = self.prompt_len[idx], self.answer_len[idx]
        return MemoryBatch(
            image=self.image[d], texts=self.texts[d], memory_mask=pos < t[:, None],
            prompt_ids=self.prompt_ids[idx, : int(lp.max())], prompt_len=lp,
            answer_ids=self.answer_ids[idx, : int(la.max())], answer_len=la,
            target=self.texts[d, t], group=d,
        )

    def to(self, device: torch.device) -> MemoryData:
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        return MemoryData(**moved)


@dataclass
class LoadedTurns:
    """What :func:`read_memory_inputs` found: the rows and the Lance versions they were read at."""

    turns: Any  # pyarrow.Table
    captions: dict[int, str]  # image_id -> caption_hash
    image_vectors: dict[int, np.ndarray]
    text_vectors: dict[str, np.ndarray]
    versions: dict[str, int]


MEMORY_INPUTS = ("turns", "dialogs", "image_embeddings", "text_embeddings")


def read_memory_inputs(lance_uri: str, splits: list[str], pins: dict[str, int | str]) -> LoadedTurns:
    """Turns of ``splits`` plus the embedding vectors they need, at pinned (or latest) versions."""
    import pyarrow.compute as pc

    from storage.lance import connect, read, resolve_versions

    db = connect(lance_uri)
    versions = resolve_versions(db, MEMORY_INPUTS, pins)
    quoted = ", ".join(f"'{s}'" for s in splits)
    turns = read(db, "turns", version=versions["turns"], where=f"split IN ({quoted})",
                 columns=["image_id", "turn", "split", "question", "answer", "text_hash"])
    turns = turns.sort_by([("image_id", "ascending"), ("turn", "ascending")])
    dialogs = read(db, "dialogs", version=versions["dialogs"], columns=["image_id", "caption_hash"])
    captions = dict(zip(dialogs.column("image_id").to_pylist(), dialogs.column("caption_hash").to_pylist(), strict=True))
    ids = pc.unique(turns.column("image_id"))
    img = read(db, "image_embeddings", version=versions["image_embeddings"], columns=["image_id", "vector"])
    img = img.filter(pc.is_in(img.column("image_id"), value_set=ids))
    hashes = pa_unique_strings(turns.column("text_hash").to_pylist() + [captions.get(i) for i in ids.to_pylist()])
    txt = read(db, "text_embeddings", version=versions["text_embeddings"], columns=["text_hash", "vector"])
    txt = txt.filter(pc.is_in(txt.column("text_hash"), value_set=hashes))
    return LoadedTurns(turns, captions, _vectors(img, "image_id"), _vectors(txt, "text_hash"), versions)


def pa_unique_strings(values: list[str | None]):
    import pyarrow as pa

    return pa.array(sorted({v for v in values if v is not None}), pa.string())


def _vectors(table: Any, key: str) -> dict:
    if len(table) == 0:
        return {}
    flat = table.column("vector").combine_chunks().values.to_numpy(zero_copy_only=False)
    mat = flat.reshape(len(table), EMBED_DIM).astype(np.float32, copy=False)
    return dict(zip(table.column(key).to_pylist(), mat, strict=True))


def build_memory_data(
    loaded: LoadedTurns, split: str, tokenizer: Any, arch: MemoryArch, *, limit_dialogs: int | None = None,
    limit_samples: int | None = None, progress: Any = None,
) -> tuple[MemoryData, list[Rejection]]:
    """Samples (one per turn) of ``split``; a dialog missing any vector it needs is rejected whole."""
    t = loaded.turns.filter(loaded.turns.column("split").to_numpy(zero_copy_only=False) == split)
    image_ids = np.asarray(t.column("image_id").to_numpy())
    turn_no = np.asarray(t.column("turn").to_numpy()).astype(np.int64)
    hashes = t.column("text_hash").to_pylist()
    questions, answers = t.column("question").to_pylist(), t.column("answer").to_pylist()
    rejections: list[Rejection] = []
    dialog_rows: dict[int, list[int]] = {}
    for row, iid in enumerate(image_ids.tolist()):
        dialog_rows.setdefault(iid, []).append(row)
    kept: list[int] = []
    for iid, rows in dialog_rows.items():
        missing = []
        if iid not in loaded.image_vectors:
            missing.append("image")
        missing += [f"turn {turn_no[r]}" for r in rows if hashes[r] not in loaded.text_vectors]
        if missing:
            rejections.append(Rejection(str(iid), Reason.EMBEDDING_MISSING,
                                        {"image_id": iid, "split": split, "missing": missing},
                                        f"no stored embedding for {', '.join(missing)}"))
        else:
            kept.append(iid)
        if limit_dialogs is not None and len(kept) >= limit_dialogs:
            break
    zero = np.zeros(EMBED_DIM, np.float32)
    image = np.stack([loaded.image_vectors[i] for i in kept]) if kept else np.zeros((0, EMBED_DIM), np.float32)
    texts = np.zeros((len(kept), NUM_POSITIONS, EMBED_DIM), np.float32)
    sample_rows, sample_dialog = [], []
    for d, iid in enumerate(kept):
        texts[d, 0] = loaded.text_vectors.get(loaded.captions.get(iid), zero)
        for r in dialog_rows[iid]:
            texts[d, turn_no[r]] = loaded.text_vectors[hashes[r]]
            sample_rows.append(r)
            sample_dialog.append(d)
    if limit_samples is not None:
        sample_rows, sample_dialog = sample_rows[:limit_samples], sample_dialog[:limit_samples]
    prompts = [arch.prompt_template.format(question=questions[r]) for r in sample_rows]
    refs = [answers[r] for r in sample_rows]
    p_ids, p_len = tokenize(tokenizer, prompts, arch.max_prompt_tokens, special=True, progress=progress)
    a_ids, a_len = tokenize(tokenizer, [" " + a for a in refs], arch.max_answer_tokens, special=False,
                            eos=tokenizer.eos_token_id, progress=progress)
    data = MemoryData(
        image_ids=np.asarray(kept, dtype=np.int64), image=torch.from_numpy(image), texts=torch.from_numpy(texts),
        dialog=torch.tensor(sample_dialog, dtype=torch.long), turn=torch.from_numpy(turn_no[sample_rows]),
        prompt_ids=p_ids, prompt_len=p_len, answer_ids=a_ids, answer_len=a_len, answers=refs,
    )
    return data, rejections


def tokenize(tokenizer: Any, texts: list[str], max_len: int, *, special: bool, eos: int | None = None,
             progress: Any = None, chunk: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded id matrix and lengths; with ``eos``, every row ends with it (kept under truncation)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    room = max_len - (1 if eos is not None else 0)
    ids = torch.full((len(texts), max_len), pad, dtype=torch.long)
    lens = torch.zeros(len(texts), dtype=torch.long)
    for start in range(0, len(texts), chunk):
        enc = tokenizer(texts[start:start + chunk], add_special_tokens=special)["input_ids"]
        for i, row in enumerate(enc, start):
            row = row[:room] + ([eos] if eos is not None else [])
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            lens[i] = len(row)
        if progress is not None:
            progress(len(enc))
    return ids, lens
