"""LoRA SFT of Gemma3 (vision + language) on the ``reminders`` rows, in the report's chat format.

One config (:class:`schemas.train.SftConfig`) drives two backends: unsloth's ``FastVisionModel``
(CUDA only; imported lazily, it patches transformers on import) and transformers + peft + trl's
``SFTTrainer`` everywhere else. Both train the same LoRA (r, alpha, dropout; attention and MLP
modules of the vision and the language layers) on the same examples in the same order.

A sample is the report's conversation: system (the instructions) / user (the dialog text with
its last answer dropped, then the image) / assistant (the ``<reminder>...</reminder>`` response);
the loss covers the assistant's tokens only. Train and held-out rows are split by dialog
(``image_id`` hash), never by row. Checkpoints and resume are the HF Trainer's: its sampler is
seeded, and on resume it restores the RNG states and skips the batches already seen, so a
resumed run sees the same data order as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from schemas.quarantine import Reason, Rejection

log = logging.getLogger("mmem." + __name__)

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj", "out_proj")  # Gemma3 text: o_proj; SigLIP: out_proj
MLP = ("gate_proj", "up_proj", "down_proj", "fc1", "fc2")  # Gemma3 text: gated MLP; SigLIP: fc1/fc2
LAYERS = {"language": "language_model", "vision": "vision_tower"}
SPLIT_FILE = "data_split.json"
BASE_DIR = "base"


# --- data -----------------------------------------------------------------------------------


def held_out(image_id: int, fraction: float) -> bool:
    """Whether a dialog is in the held-out part: a hash of its id, so a dialog never straddles the
    split and adding rows does not move others."""
    if fraction <= 0:
        return False
    h = int.from_bytes(hashlib.sha256(f"sft-holdout:{image_id}".encode()).digest()[:8], "big")
    return h / 2**64 < fraction


def chat_messages(conversation: str, response: str, system_prompt: str) -> list[dict[str, Any]]:
    """The report's format: system / user (conversation text, then the image) / assistant."""
    return [
        {"role": "system", "content": [{"type": "text", "text": system_prompt}]},
        {"role": "user", "content": [{"type": "text", "text": conversation}, {"type": "image"}]},
        {"role": "assistant", "content": [{"type": "text", "text": response}]},
    ]


def resolve_image(image_url: str | None, split: str | None, image_id: int, roots: dict[str, Path],
                  stored: dict[int, Path]) -> Path | None:
    """A local file for the row's image: its ``file://`` URL or path, else the configured or
    ingested image root (a remote URL is matched by file name under the split's root)."""
    candidates: list[Path] = []
    if image_url:
        parsed = urlparse(image_url)
        if parsed.scheme == "file":
            candidates.append(Path(unquote(parsed.path)))
        elif parsed.scheme in ("", None):
            candidates.append(Path(image_url))
        if split in roots:
            candidates.append(Path(roots[split]) / Path(unquote(parsed.path)).name)
    if image_id in stored:
        candidates.append(stored[image_id])
    return next((p for p in candidates if p.is_file()), None)


@dataclass
class SftExample:
    image_id: int
    messages: list[dict[str, Any]]
    image: Path


@dataclass
class SftData:
    train: list[SftExample]
    held_out: list[SftExample]
    rejections: list[Rejection] = field(default_factory=list)

    def split_ids(self) -> dict[str, list[int]]:
        return {"train": [e.image_id for e in self.train], "held_out": [e.image_id for e in self.held_out]}


def build_examples(rows: Any, config: Any, stored_images: dict[int, Path] | None = None) -> SftData:
    """``reminders`` rows (Arrow) of the train split -> chat examples, split by dialog."""
    stored_images = stored_images or {}
    records = sorted((r for r in rows.to_pylist() if (r.get("split") or "train") == "train"),
                     key=lambda r: r["image_id"])
    if config.limit:
        records = records[: config.limit]
    train, held, rejections = [], [], []
    for r in records:
        path = resolve_image(r.get("image_url"), r.get("split"), r["image_id"], config.images_root,
                             stored_images)
        if path is None:
            rejections.append(Rejection(str(r["image_id"]), Reason.IMAGE_MISSING, r,
                                        f"no local image for {r.get('image_url')!r}; set images_root"))
            continue
        ex = SftExample(r["image_id"], chat_messages(r["conversation"], r["response"], config.system_prompt),
                        path)
        (held if held_out(r["image_id"], config.val_fraction) else train).append(ex)
    return SftData(train, held, rejections)


def drop_too_long(data: SftData, processor: Any, max_len: int) -> SftData:
    """Quarantine examples whose full conversation exceeds ``max_len`` tokens: truncation would cut
    the image tokens (the image follows the conversation text) or the answer."""
    # the processor expands the one image marker into image_seq_length soft tokens, an end-of-image
    # token and newlines
    per_image = int(getattr(processor, "image_seq_length", 0) or 0) + 4
    tok = getattr(processor, "tokenizer", processor)

    def keep(ex: SftExample, rejections: list[Rejection]) -> bool:
        text = processor.apply_chat_template(ex.messages, tokenize=False)
        n = len(tok(text, add_special_tokens=False)["input_ids"]) + per_image
        if n <= max_len:
            return True
        rejections.append(Rejection(str(ex.image_id), Reason.TOO_LONG, {"image_id": ex.image_id, "tokens": n},
                                    f"{n} tokens > max_seq_length {max_len}"))
        return False

    rejections = list(data.rejections)
    train = [e for e in data.train if keep(e, rejections)]
    held = [e for e in data.held_out if keep(e, rejections)]
    return SftData(train, held, rejections)


def chat_dataset(examples: list[SftExample]):
    """A ``datasets.Dataset`` in TRL's prompt-completion form (system + user / assistant) with an
    ``images`` column, which both backends' collators take: the prompt is masked out of the loss,
    and the image files are decoded only when a batch is collated."""
    from datasets import Dataset, Image, Sequence

    ds = Dataset.from_dict({
        "prompt": [e.messages[:-1] for e in examples],
        "completion": [e.messages[-1:] for e in examples],
        "images": [[str(e.image)] for e in examples],
    })
    return ds.cast_column("images", Sequence(Image()))


# --- model ----------------------------------------------------------------------------------


def choose_backend(requested: str, cuda: bool) -> tuple[str, str]:
    """The backend to use and why (the flow logs the reason)."""
    import importlib.util

    has_unsloth = importlib.util.find_spec("unsloth") is not None
    if requested == "unsloth":
        if not cuda:
            raise RuntimeError("backend=unsloth needs a CUDA device; use backend=peft (or auto) here")
        if not has_unsloth:
            raise ImportError("backend=unsloth needs unsloth: pip install -e '.[gpu]'")
        return "unsloth", "asked for"
    if requested == "peft":
        return "peft", "asked for"
    if cuda and has_unsloth:
        return "unsloth", "auto: CUDA present and unsloth installed"
    if cuda:
        return "peft", "auto: CUDA present but unsloth is not installed (pip install -e '.[gpu]')"
    return "peft", "auto: no CUDA device"


def lora_target_regex(config: Any) -> str:
    """peft ``target_modules`` equal to unsloth's finetune_{vision,language}_layers x {attention,mlp}."""
    layers = [LAYERS[k] for k, on in (("vision", config.finetune_vision_layers),
                                      ("language", config.finetune_language_layers)) if on]
    modules = ((ATTENTION if config.finetune_attention_modules else ())
               + (MLP if config.finetune_mlp_modules else ()))
    if not layers or not modules:
        raise ValueError("LoRA needs at least one of vision/language layers and one of attention/MLP modules")
    return rf".*\.({'|'.join(layers)})\..*\.({'|'.join(modules)})"


def base_path(config: Any) -> Path:
    """The configured Gemma3 folder, or (``tiny``) a tiny random Gemma3 written under the data root."""
    if config.base is not None:
        path = Path(config.base)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"no Gemma3 model at {path}: put a Hugging Face folder of gemma-3-4b-it "
                                    "(config.json, *.safetensors, processor files) there, or use --tiny")
        return path
    if not config.tiny:
        raise ValueError("train_sft needs base (a local gemma-3-4b-it folder) or tiny=true")
    from training.tiny_models import tiny_gemma3

    path = config.models_dir / f"tiny-gemma3-seed{config.seed}"
    return path if (path / "config.json").is_file() else tiny_gemma3(path, seed=config.seed)


def load_processor(base: Path):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(base, local_files_only=True)


def load_peft_model(config: Any, base: Path, cuda: bool):
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForImageTextToText, AutoProcessor

    kwargs: dict[str, Any] = {"dtype": torch.bfloat16 if cuda else torch.float32}
    quantized = config.load_in_4bit and cuda
    if quantized:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=True)
        kwargs["device_map"] = {"": 0}
    elif config.load_in_4bit:
        log.info("load_in_4bit ignored: no CUDA device, the base stays in float32")
    model = AutoModelForImageTextToText.from_pretrained(base, local_files_only=True, **kwargs)
    if quantized:
        model = prepare_model_for_kbit_training(model,
                                                use_gradient_checkpointing=config.gradient_checkpointing)
    torch.manual_seed(config.seed)  # the LoRA A matrices are drawn here
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      bias="none",
                      target_modules=lora_target_regex(config), task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    processor = AutoProcessor.from_pretrained(base, local_files_only=True)
    return model, processor


def load_unsloth_model(config: Any, base: Path):
    import os

    # a local folder only; unsloth must not look for hub variants
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from unsloth import FastVisionModel  # lazy: patches transformers, CUDA only

    model, processor = FastVisionModel.from_pretrained(
        str(base), load_in_4bit=config.load_in_4bit, max_seq_length=config.max_seq_length,
        use_exact_model_name=True, random_state=config.seed,
        use_gradient_checkpointing="unsloth" if config.gradient_checkpointing else False,
    )
    model = FastVisionModel.get_peft_model(
        model, finetune_vision_layers=config.finetune_vision_layers,
        finetune_language_layers=config.finetune_language_layers,
        finetune_attention_modules=config.finetune_attention_modules,
        finetune_mlp_modules=config.finetune_mlp_modules, r=config.lora_r, lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout, bias="none", random_state=config.seed, use_rslora=False,
        loftq_config=None,
    )
    FastVisionModel.for_training(model)
    return model, processor


# --- training ---------------------------------------------------------------------------------


def sft_arguments(config: Any, output_dir: Path, backend: str, cuda: bool):
    from trl import SFTConfig

    extra: dict[str, Any] = {}
    if backend == "unsloth":  # unsloth's collator renders and masks; TRL must not prepare the data
        extra = {"dataset_text_field": "", "dataset_kwargs": {"skip_prepare_dataset": True}}
    return SFTConfig(
        output_dir=str(output_dir), per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size, gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.learning_rate, num_train_epochs=config.epochs, max_steps=config.max_steps or -1,
        warmup_steps=config.warmup_steps, weight_decay=config.weight_decay,
        lr_scheduler_type=config.lr_scheduler,
        optim=config.optim, seed=config.seed, data_seed=config.seed, logging_steps=config.logging_steps,
        save_strategy="steps", save_steps=config.save_steps, save_total_limit=config.keep_checkpoints,
        eval_strategy="no", report_to=[], max_length=config.max_seq_length, remove_unused_columns=False,
        gradient_checkpointing=config.gradient_checkpointing and backend == "peft",
        bf16=cuda, use_cpu=not cuda, dataloader_num_workers=0, disable_tqdm=True, **extra,
    )


def trainer_class(cuda: bool):
    """TRL's SFTTrainer; without CUDA, with the model's own loss (TRL's fused LM head is a Triton
    kernel that needs a GPU)."""
    from transformers import Trainer
    from trl import SFTTrainer

    if cuda:
        return SFTTrainer

    class PlainLossSFTTrainer(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return Trainer.compute_loss(self, model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)

    return PlainLossSFTTrainer


@dataclass
class SftRun:
    model: Any
    processor: Any
    backend: str
    backend_reason: str
    base: Path
    metrics: dict[str, float]
    resumed_from: int
    log_history: list[dict[str, Any]]


def last_complete_checkpoint(output_dir: Path) -> str | None:
    """The newest ``checkpoint-N`` the Trainer finished writing (its ``trainer_state.json`` is
    written last); newer ones a kill cut short are removed, so resume never loads half a save."""
    from transformers.trainer import TRAINER_STATE_NAME
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    found = sorted((int(p.name.rsplit("-", 1)[1]), p)
                   for p in Path(output_dir).glob(f"{PREFIX_CHECKPOINT_DIR}-*")
                   if p.is_dir() and p.name.rsplit("-", 1)[1].isdigit())
    for _, path in reversed(found):
        if (path / TRAINER_STATE_NAME).is_file():
            return str(path)
        log.warning("removing %s: the run that wrote it stopped before it was complete", path)
        shutil.rmtree(path, ignore_errors=True)
    return None


def train_sft(config: Any, data: SftData, output_dir: Path, *, callbacks: Sequence[Any] = ()) -> SftRun:
    """Train (resuming from the newest checkpoint in ``output_dir``) and return the trained model."""
    import torch

    if not data.train:
        raise ValueError("no training examples: is the reminders table empty for the train split?")
    cuda = torch.cuda.is_available() and config.device != "cpu"
    backend, why = choose_backend(config.backend, cuda)
    log.info("SFT backend: %s (%s)", backend, why)
    base = base_path(config)
    if backend == "unsloth":
        model, processor = load_unsloth_model(config, base)
    else:
        model, processor = load_peft_model(config, base, cuda)
    args = sft_arguments(config, output_dir, backend, cuda)
    kwargs: dict[str, Any] = {}
    if backend == "unsloth":
        from unsloth.trainer import UnslothVisionDataCollator

        kwargs["data_collator"] = UnslothVisionDataCollator(model, processor,
                                                            max_seq_length=config.max_seq_length)
    trainer = trainer_class(cuda)(
        model=model, args=args, train_dataset=chat_dataset(data.train),
        eval_dataset=chat_dataset(data.held_out) if data.held_out else None,
        processing_class=processor, callbacks=list(callbacks), **kwargs,
    )
    output_dir.mkdir(parents=True, exist_ok=True)
    last = last_complete_checkpoint(output_dir)
    resumed = int(Path(last).name.split("-")[-1]) if last else 0
    if last:
        log.info("resuming SFT from %s", last)
    result = trainer.train(resume_from_checkpoint=last)
    metrics = {k: float(v) for k, v in result.metrics.items() if isinstance(v, (int, float))}
    metrics["train_loss"] = float(result.training_loss)
    metrics["train_examples"] = float(len(data.train))
    if data.held_out:
        metrics |= {k: float(v) for k, v in trainer.evaluate().items() if isinstance(v, (int, float))}
    return SftRun(trainer.model, processor, backend, why, base, metrics, resumed,
                  list(trainer.state.log_history))


def base_reference(base: Path, *, bundled: bool) -> str:
    """What ``adapter_config.json`` names as the base: the bundled copy (a folder relative to the
    adapter) or the hub id of the local base, so the adapter never names a data root's path.

    A base inside a Hugging Face cache (``models--org--name/snapshots/<rev>``) is ``org/name``; a
    folder named like a Gemma 3 checkpoint (``gemma-3-4b-it``) is ``google/<name>``; anything else
    stays a path (logged: that adapter loads only where the path exists)."""
    if bundled:
        return BASE_DIR
    parts = Path(base).resolve().parts
    for i, part in enumerate(parts[:-2]):
        if part.startswith("models--") and parts[i + 1] == "snapshots":
            return part.removeprefix("models--").replace("--", "/")
    name = Path(base).resolve().name
    if name.lower().startswith("gemma-3-"):
        return f"google/{name}"
    log.warning("the base %s has no hub id; adapter_config.json names this path", base)
    return str(Path(base).resolve())


def save_adapter(run: SftRun, folder: Path, data: SftData, *, copy_base: bool) -> None:
    """The LoRA adapter and the processor in HF format, which dialogs it saw, and (tiny) the base;
    ``base_model_name_or_path`` names the bundled base (``base``, relative to the adapter folder) or
    the hub id of the base (:func:`base_reference`)."""
    folder.mkdir(parents=True, exist_ok=True)
    run.model.save_pretrained(folder)
    run.processor.save_pretrained(folder)
    (folder / SPLIT_FILE).write_text(json.dumps(data.split_ids()))
    if copy_base:
        shutil.copytree(run.base, folder / BASE_DIR)
    adapter = folder / "adapter_config.json"
    cfg = json.loads(adapter.read_text())
    ref = base_reference(run.base, bundled=copy_base)
    written = str(cfg.get("base_model_name_or_path") or run.base)
    cfg["base_model_name_or_path"] = ref
    adapter.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    card = folder / "README.md"  # peft's model card names the base in its metadata too
    if card.is_file():
        text = card.read_text()
        for path in sorted({written, str(run.base), str(Path(run.base).resolve())}, key=len, reverse=True):
            text = text.replace(path, ref)
        card.write_text(text)


def adapter_base(folder: Path) -> Path | str:
    """The base an adapter folder names, a relative name read from the folder itself (peft reads it
    from the working directory, so ``AutoPeftModelForCausalLM`` needs the folder as cwd for a
    bundled base; this works from anywhere). Older adapters named an absolute path beside ``base/``."""
    folder = Path(folder)
    ref = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path") or ""
    if ref and not Path(ref).is_absolute() and (folder / ref).is_dir():
        return folder / ref
    if (folder / BASE_DIR).is_dir():
        return folder / BASE_DIR
    if not ref:
        raise ValueError(f"{folder}/adapter_config.json names no base model")
    return Path(ref) if Path(ref).is_absolute() else ref


def load_sft_model(folder: Path, base: Path | None = None, device: str = "cpu"):
    """An SFT artifact as (model with its LoRA adapter, processor), for generation and evaluation."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    folder = Path(folder)
    source = Path(base) if base else adapter_base(folder)
    local = isinstance(source, Path)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForImageTextToText.from_pretrained(source, local_files_only=local,
                                                        dtype=dtype).to(device)
    model = PeftModel.from_pretrained(model, folder, local_files_only=True).eval()
    return model, AutoProcessor.from_pretrained(folder, local_files_only=True)
