"""Training speed on one GPU: Gemma3-4B LoRA SFT (unsloth vs transformers+peft+trl) and the memory model.

Issue 5's speed section, measured through the project's own training code on random weights
(none can be downloaded here; speed does not depend on their values):

* memory model (``training.memory_loop.train_memory`` over ``training.memory_model.MemoryModel``,
  the report's Q-Former + a LLaMA-3.2-1B-architecture LM built as ``benchmarks/eval_bench.py``
  builds it, bf16 under autocast as the loop runs on CUDA): samples/s at each ``--batch-sizes``,
  on synthetic data shaped as the real ``MemoryData`` (827,830 samples = 82,783 dialogs x 11
  unit 1024-d ImageBind vectors on the device, prompt and answer token lengths near VisDial's:
  questions ~5 words, answers ~3). Target: 2 epochs x 827,830 samples in <= 1 h (>= 460 samples/s).
* SFT (``training.sft.train_sft``, both backends, the config of ``schemas.train.SftConfig``:
  LoRA r=16, alpha=16 on attention + MLP of the vision and language layers, 4-bit NF4 base,
  gradient checkpointing): a Gemma3ForConditionalGeneration of gemma-3-4b-it's shape (SigLIP
  27 x 1152 at 896 px -> 256 image tokens; 34 x 2560 text layers, vocabulary 262,208) is saved as
  bf16 safetensors with the project's locally built Gemma tokenizer/processor
  (``training.tiny_models``), since unsloth loads from a folder. Samples are the report's chat
  format: one image + about ``--text-tokens`` text tokens (that tokenizer is character level, so
  text is sized in characters). Tokens/s counts the non-pad tokens of the timed steps' batches
  (image tokens included), read off the model's inputs with a forward pre-hook.
  MFU = model FLOPs per step / step time / peak bf16 dense (989.4 TFLOP/s for H100 SXM and H200).
  Model FLOPs: LoRA trains no base weight, so a frozen matmul costs its forward (2N per token)
  plus its input gradient (2N): 4 x N_decoder x T over the T sequence tokens, 4 x N_lm_head over
  the tokens the loss covers (only those need logits; TRL's fused head computes no others),
  4 x N_vision per image patch (4,096 per image) and 4 x N_projector per image token; attention
  adds 12 x layers x (heads x head_dim) x S^2 per sequence of S (forward + backward, no causal
  halving); recompute under gradient checkpointing is not counted. The naive 4 x N_total x T
  (N_total = 4.3 B, vision counted once per text token) is printed beside it.

Each part runs in its own Python process, in this order: memory model, writing the random 4B,
transformers+peft+trl, unsloth. So a crash, a hang or an out-of-memory in one leaves the others'
figures; GPU memory is free between parts; and unsloth is imported first in its process (it
patches transformers and trl on import) without touching the transformers measurement. A failed
part prints which step failed and why; the others' figures stand. The JSON is rewritten after
each part.

Full size, one H100 (with trl, datasets, pydantic-settings, bitsandbytes, unsloth and their needs
installed, e.g. from wheels into /tmp/site), about 6 minutes:
    PYTHONPATH=/tmp/site python3 benchmarks/train_bench.py --device cuda --time-budget 540 --out $OUT
CPU check with tiny models (unsloth skipped: it needs CUDA):
    .venv/bin/python benchmarks/train_bench.py --device cpu --preset tiny
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VISDIAL_TRAIN_SAMPLES = 827_830  # the report's cleaned train set: 82,783 dialogs x 10 turns
EPOCHS = 2
TARGET_SAMPLES_S = 460  # 2 x 827,830 samples in one hour
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.4, "H200": 989.4}  # dense, no sparsity
SYSTEM_PROMPT = "Look at the image and the conversation; write a <reminder>, then answer."

# gemma-3-4b-it's config.json (text defaults are Gemma3TextConfig's: 8 heads, 4 kv heads, head_dim 256)
GEMMA3_4B_TEXT = {
    "hidden_size": 2560, "intermediate_size": 10240, "num_hidden_layers": 34, "num_attention_heads": 8,
    "num_key_value_heads": 4, "head_dim": 256, "query_pre_attn_scalar": 256, "vocab_size": 262208,
    "sliding_window": 1024, "max_position_embeddings": 131072,
    "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
                        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}},
}
GEMMA3_4B_VISION = {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
                    "num_attention_heads": 16, "image_size": 896, "patch_size": 14, "vision_use_head": False}
GEMMA3_4B_IMAGE_TOKENS = 256

PRESETS = {  # what --preset changes unless an option is given
    "full": {"lm": "1b", "gemma": "4b", "batch_sizes": [16, 64, 128, 256, 512, 1024],
             "memory_samples": VISDIAL_TRAIN_SAMPLES, "sft_batch_size": 4},
    "tiny": {"lm": "tiny", "gemma": "tiny", "batch_sizes": [16, 64], "memory_samples": 2000, "sft_batch_size": 2},
}
PARTS = ("memory", "prepare", "peft", "unsloth")
WORDS = (  # VisDial-like words for the synthetic conversations
    "is", "there", "a", "person", "in", "the", "picture", "yes", "no", "what", "color", "shirt", "man",
    "woman", "dog", "cat", "table", "sky", "tree", "car", "street", "white", "black", "red", "blue", "how",
    "many", "people", "sitting", "standing", "holding", "left", "right", "can", "you", "see", "it", "looks",
    "like", "i", "think", "so", "not", "sure", "maybe", "two", "three",
)


# --- child side: stage tracking and failure reports ----------------------------------------------

_STAGE: dict[str, object] = {"name": "start", "file": None}


def stage(name: str) -> None:
    """Name the step now running (kept in a file, so the parent can say where a killed part was)."""
    _STAGE["name"] = name
    print(f"  .. {name}", flush=True)
    if _STAGE["file"]:
        Path(str(_STAGE["file"])).write_text(name)


def failure(exc: BaseException) -> dict:
    """Which step failed, the exception, and where: the deepest frame of this project and of all."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if str(ROOT) in f.filename and "/.venv/" not in f.filename]

    def at(f) -> str:
        return f"{Path(f.filename).relative_to(ROOT) if str(ROOT) in f.filename else f.filename}:{f.lineno} " \
               f"in {f.name}: {(f.line or '').strip()[:120]}"

    return {"ok": False, "stage": _STAGE["name"], "error": f"{type(exc).__name__}: {str(exc)[:1500]}",
            "where": at(ours[-1]) if ours else None, "raised_at": at(frames[-1]) if frames else None}


def count(n: float) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M" if n >= 1e6 else f"{n / 1e3:.1f} k"


def device_info(cuda: bool) -> dict:
    import torch

    if not cuda:
        return {"device": f"cpu ({os.cpu_count()} cores)", "torch": torch.__version__}
    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)}


# --- memory model --------------------------------------------------------------------------------


def synthetic_memory_data(n: int, arch, vocab: int, pad: int, eos: int, device, seed: int):
    """``n`` samples (n / 10 dialogs x 10 turns) laid out as ``build_memory_data`` lays out the real
    ones: float32 unit vectors, right-padded prompt ids (BOS + "Question: ... Answer:", 8..20 tokens)
    and answer ids (2..8 tokens, the last one eos)."""
    import torch

    from schemas.embed import EMBED_DIM
    from training.memory_model import NUM_POSITIONS, MemoryData

    g = torch.Generator(device=device).manual_seed(seed)
    dialogs = -(-n // 10)
    unit = lambda *shape: torch.nn.functional.normalize(
        torch.randn(*shape, generator=g, device=device), dim=-1)

    def ids(lo: int, hi: int, width: int, last: int | None):
        lens = torch.randint(lo, hi + 1, (n,), generator=g, device=device)
        mat = torch.randint(3, vocab, (n, width), generator=g, device=device)
        j = torch.arange(width, device=device)[None]
        if last is not None:
            mat = torch.where(j == lens[:, None] - 1, torch.full_like(mat, last), mat)
        return torch.where(j < lens[:, None], mat, torch.full_like(mat, pad)), lens

    p_ids, p_len = ids(8, min(20, arch.max_prompt_tokens), arch.max_prompt_tokens, None)
    a_ids, a_len = ids(2, min(8, arch.max_answer_tokens), arch.max_answer_tokens, eos)
    index = torch.arange(n, device=device)
    return MemoryData(image_ids=torch.arange(dialogs).numpy(), image=unit(dialogs, EMBED_DIM),
                      texts=unit(dialogs, NUM_POSITIONS, EMBED_DIM), dialog=index // 10, turn=index % 10 + 1,
                      prompt_ids=p_ids, prompt_len=p_len, answer_ids=a_ids, answer_len=a_len, answers=[""] * n)


def part_memory(args, wd: Path, cuda: bool) -> dict:
    import torch

    from benchmarks.eval_bench import PRESETS as LM_PRESETS
    from benchmarks.eval_bench import build_llm, build_tokenizer
    from schemas.train import MemoryTrainConfig
    from training.memory_loop import train_memory
    from training.memory_model import MemoryArch, MemoryModel

    device = torch.device("cuda" if cuda else "cpu")
    tiny, lm = args.preset == "tiny", PRESETS[args.preset]["lm"]
    common = {"data_root": wd, "tiny": tiny, "device": "cuda" if cuda else "cpu", "seed": args.seed,
              "checkpoint_every": 10**9, "keep_checkpoints": 1, "max_steps": args.warmup + args.steps + 1}
    stage(f"build the memory model (LLaMA-3.2 {lm} architecture, random weights)")
    torch.manual_seed(args.seed)
    tok = build_tokenizer(LM_PRESETS[lm]["llm"]["vocab_size"])
    llm = build_llm(lm, device, torch.bfloat16 if cuda else torch.float32)  # load_llm's dtype
    arch = MemoryArch.from_config(MemoryTrainConfig(**common))
    model = MemoryModel(arch, llm, tok).to(device)  # memory parts float32, as build_memory_model leaves them
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    stage(f"synthetic data: {args.memory_samples} samples on {device}")
    data = synthetic_memory_data(args.memory_samples, arch, tok.vocab_size, tok.pad_token_id, tok.eos_token_id,
                                 device, args.seed)
    rows = []
    for i, bs in enumerate(args.batch_sizes):
        stage(f"train_memory, batch {bs}: {args.warmup} warm-up + {args.steps} timed steps")
        marks: dict[int, float] = {}

        def on_step(done: int, out, marks=marks) -> None:
            if done in (args.warmup, args.warmup + args.steps):
                if cuda:
                    torch.cuda.synchronize()
                marks[done] = time.perf_counter()

        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:  # the last step (which writes the loop's checkpoint) is outside the timed window
            result = train_memory(model, data, None, MemoryTrainConfig(**common, batch_size=bs),
                                  wd / "memory-checkpoints" / f"{i}-bs{bs}", device=device, on_step=on_step)
            step_s = (marks[args.warmup + args.steps] - marks[args.warmup]) / args.steps
        except torch.OutOfMemoryError as exc:
            rows.append({"batch_size": bs, "error": f"out of memory: {str(exc)[:200]}"})
            print(f"  batch {bs}: out of memory; the batch sizes after it are skipped", flush=True)
            break
        except Exception as exc:  # noqa: BLE001 - one batch size failing keeps the others' figures
            rows.append({"batch_size": bs, **failure(exc)})
            print(f"  batch {bs}: FAILED: {rows[-1]['error']} at {rows[-1]['where']}", flush=True)
            continue
        row = {"batch_size": bs, "step_s": step_s, "samples_per_s": bs / step_s,
               "loss": result.history[-1]["loss"] if result.history else None,
               "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}
        rows.append(row)
        print(f"  batch {bs}: {row['samples_per_s']:.0f} samples/s ({step_s * 1000:.1f} ms/step)", flush=True)
    return {"ok": True, **device_info(cuda), "params": params, "trainable_params": trainable,
            "precision": "bf16 LM, float32 memory parts, bf16 autocast" if cuda else "float32",
            "samples": args.memory_samples, "arch": {k: v for k, v in arch.__dict__.items() if k != "llm"},
            "llm": LM_PRESETS[lm]["llm"], "rows": rows}


# --- SFT: the random Gemma3 folder and the synthetic chat samples ---------------------------------


def write_gemma3_4b(folder: Path, device: str, seed: int) -> None:
    """A random Gemma3ForConditionalGeneration of gemma-3-4b-it's shape, bf16 safetensors, with the
    project's local Gemma tokenizer and chat template in a processor of the real image geometry."""
    import torch
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessor,
        Gemma3Processor,
        GenerationConfig,
    )

    from training import tiny_models as tm

    tok = tm.tiny_tokenizer()
    v = tok.get_vocab()
    eos = [v[tm.EOS], v[tm.END_OF_TURN]]
    config = Gemma3Config(
        text_config={**GEMMA3_4B_TEXT, "pad_token_id": v[tm.PAD], "eos_token_id": eos, "bos_token_id": v[tm.BOS]},
        vision_config=GEMMA3_4B_VISION, mm_tokens_per_image=GEMMA3_4B_IMAGE_TOKENS,
        boi_token_index=v[tm.BOI], eoi_token_index=v[tm.EOI], image_token_index=v[tm.IMAGE_SOFT],
    )
    torch.manual_seed(seed)
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = Gemma3ForConditionalGeneration(config).eval()
    finally:
        torch.set_default_dtype(torch.float32)
    model.generation_config = GenerationConfig(bos_token_id=v[tm.BOS], pad_token_id=v[tm.PAD], eos_token_id=eos)
    model.save_pretrained(folder)
    size = GEMMA3_4B_VISION["image_size"]
    Gemma3Processor(
        image_processor=Gemma3ImageProcessor(size={"height": size, "width": size}, image_mean=[0.5] * 3,
                                             image_std=[0.5] * 3),
        tokenizer=tok, chat_template=tm.CHAT_TEMPLATE, image_seq_length=GEMMA3_4B_IMAGE_TOKENS,
    ).save_pretrained(folder)


def model_info(folder: Path) -> dict:
    """Parameter counts per tower and the attention shapes the FLOPs estimate needs."""
    import torch
    from transformers import AutoConfig, Gemma3ForConditionalGeneration

    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    with torch.device("meta"):
        model = Gemma3ForConditionalGeneration(config)
    numel = lambda m: sum(p.numel() for p in m.parameters())
    inner = model.model
    text_n = numel(inner.language_model) + (0 if config.text_config.tie_word_embeddings else numel(model.lm_head))
    t, vc = config.text_config, config.vision_config
    return {
        "params": {"text": text_n, "vision": numel(inner.vision_tower), "projector": numel(inner.multi_modal_projector),
                   "total": numel(model)},
        "text": {"layers": t.num_hidden_layers, "attn_dim": t.num_attention_heads * t.head_dim,
                 "hidden": t.hidden_size, "vocab": t.vocab_size},
        "vision": {"layers": vc.num_hidden_layers, "attn_dim": vc.hidden_size, "hidden": vc.hidden_size,
                   "image_size": vc.image_size, "patches": (vc.image_size // vc.patch_size) ** 2},
        "mm_tokens": config.mm_tokens_per_image, "image_token_id": config.image_token_index,
    }


def write_images(folder: Path, n: int, seed: int) -> list[Path]:
    """COCO-sized (640 x 480) random JPEGs; the processor resizes them as it would real ones."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        path = folder / f"{i:03d}.jpg"
        Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def words(rng, chars: int) -> str:
    out: list[str] = []
    while sum(len(w) + 1 for w in out) < chars:
        out.append(rng.choice(WORDS))
    return " ".join(out)


def synthetic_examples(n: int, images: list[Path], text_tokens: int, seed: int):
    """``n`` chat samples (``training.sft.chat_messages``), each about ``text_tokens`` text tokens long
    (+-15%): system prompt, a VisDial-like conversation, and a ``<reminder>`` response."""
    import random

    from training.sft import SftExample, chat_messages

    rng = random.Random(seed)
    examples = []
    for i in range(n):
        budget = int(text_tokens * rng.uniform(0.85, 1.15)) - len(SYSTEM_PROMPT) - 38  # turn markers, breaks
        response_chars = budget // 4
        turns, conv_chars = [], budget - response_chars
        while sum(len(t) + 1 for t in turns) < conv_chars:
            turns.append(f"Q: {words(rng, 20)}? A: {words(rng, 8)}")
        response = f"<reminder>{words(rng, response_chars - 35)}</reminder> {words(rng, 10)}."
        messages = chat_messages("\n".join(turns), response, SYSTEM_PROMPT)
        examples.append(SftExample(i, messages, images[i % len(images)]))
    return examples


def part_prepare(args, wd: Path, cuda: bool) -> dict:
    folder = wd / "gemma3"
    if PRESETS[args.preset]["gemma"] == "tiny":
        from training.tiny_models import tiny_gemma3

        stage("training.tiny_models.tiny_gemma3 (tiny random Gemma3 + local processor)")
        tiny_gemma3(folder, seed=args.seed)
    else:
        if not cuda:
            raise RuntimeError("the full-size Gemma3-4B is built on the GPU; on a CPU use --preset tiny")
        stage("build a random Gemma3-4B on the GPU and save it as bf16 safetensors")
        write_gemma3_4b(folder, "cuda", args.seed)
    stage("images and model facts")
    write_images(wd / "images", 8, args.seed)
    info = model_info(folder)
    (wd / "model_info.json").write_text(json.dumps(info))
    gb = sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 1e9
    print(f"  Gemma3 folder {folder}: {count(info['params']['total'])} params, {gb:.2f} GB safetensors", flush=True)
    return {"ok": True, "folder": str(folder), "safetensors_gb": gb, **info}


# --- SFT: one backend's training steps -------------------------------------------------------------


def step_meter(warmup: int, steps: int, image_token_id: int, cuda: bool):
    """A TrainerCallback: step end times (synchronised) and, via a forward pre-hook on the model the
    Trainer trains, each batch's non-pad tokens per sample, image tokens, images and loss tokens."""
    import torch
    from transformers import TrainerCallback

    class StepMeter(TrainerCallback):
        def __init__(self) -> None:
            self.ends: dict[int, float] = {}
            self.batches: list[dict] = []
            self.began = None

        def hook(self, module, args_, kwargs):
            ids, mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
            if ids is None:
                self.batches.append({})
                return
            mask = mask if mask is not None else torch.ones_like(ids)
            labels, pixels = kwargs.get("labels"), kwargs.get("pixel_values")
            self.batches.append({
                "lengths": mask.sum(dim=1).detach(), "image_tokens": (ids == image_token_id).sum().detach(),
                "images": 0 if pixels is None else int(pixels.shape[0]), "shape": tuple(ids.shape),
                "loss_tokens": None if labels is None else (labels != -100).sum().detach()})
            return

        def on_train_begin(self, args, state, control, model=None, **kw):
            stage("training steps")
            self.began = time.perf_counter()
            model.register_forward_pre_hook(self.hook, with_kwargs=True)

        def on_step_end(self, args, state, control, **kw):
            if cuda:  # the Trainer reads the loss every step anyway (logging_steps=1)
                torch.cuda.synchronize()
            self.ends[state.global_step] = time.perf_counter()

        def timed(self) -> tuple[float, list[float], list[dict]]:
            """Mean step time over the timed window, every step's time (warm-up ones too), batches."""
            step_s = (self.ends[warmup + steps] - self.ends[warmup]) / steps
            marks = [self.began] + [self.ends[k] for k in sorted(self.ends)]
            rows = [{k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in b.items()}
                    for b in self.batches[warmup:warmup + steps]]
            return step_s, [b - a for a, b in itertools.pairwise(marks)], rows

    return StepMeter()


def sft_flops(info: dict, lengths: list[int], images: int, loss_tokens: int | None) -> tuple[float, float]:
    """(model FLOPs, naive 4 x N_total x T) for one batch; the formula is the module docstring's."""
    p, t, v = info["params"], info["text"], info["vision"]
    tokens = sum(lengths)
    head = t["vocab"] * t["hidden"]  # the LM head (tied to the embedding, counted in N_text once)
    text = (4 * (p["text"] - head) * tokens + 4 * head * (tokens if loss_tokens is None else loss_tokens)
            + 12 * t["layers"] * t["attn_dim"] * sum(s * s for s in lengths))
    patches = v["patches"]
    vision = images * (4 * p["vision"] * patches + 12 * v["layers"] * v["attn_dim"] * patches**2)
    return text + vision + images * 4 * p["projector"] * info["mm_tokens"], 4 * p["total"] * tokens


def part_sft(args, wd: Path, cuda: bool, backend: str) -> dict:
    if backend == "unsloth":
        if not cuda:
            return {"ok": False, "skipped": True, "stage": "check device",
                    "error": "unsloth (FastVisionModel) needs a CUDA device: skipped on cpu"}
        stage("import unsloth (first, before transformers/trl/peft, as unsloth asks)")
        import unsloth  # noqa: F401

    import torch

    from schemas.train import SftConfig
    from training.sft import SftData, train_sft

    info = json.loads((wd / "model_info.json").read_text())
    load_in_4bit = not args.bf16_base
    config = SftConfig(
        data_root=wd, base=wd / "gemma3", backend=backend, device="cuda" if cuda else "cpu", seed=args.seed,
        batch_size=args.sft_batch_size, grad_accum=1, max_steps=args.warmup + args.steps, save_steps=10**9,
        warmup_steps=0, val_fraction=0.0, load_in_4bit=load_in_4bit, system_prompt=SYSTEM_PROMPT,
    )
    stage("synthetic chat samples")
    images = sorted((wd / "images").glob("*.jpg"))
    examples = synthetic_examples(args.sft_batch_size * (args.warmup + args.steps), images, args.text_tokens, args.seed)
    meter = step_meter(args.warmup, args.steps, info["image_token_id"], cuda)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    stage(f"training.sft.train_sft(backend={backend}): load the model, LoRA, trainer")
    t0 = time.perf_counter()
    run = train_sft(config, SftData(examples, []), wd / f"sft-{backend}", callbacks=[meter])
    total_s = time.perf_counter() - t0
    stage("figures")
    step_s, every_step_s, batches = meter.timed()
    timed_steps = sorted(every_step_s[args.warmup:])
    print(f"  step times (s; the first {args.warmup} untimed): {' '.join(f'{x:.2f}' for x in every_step_s)}",
          flush=True)
    out = {"ok": True, **device_info(cuda), "backend": run.backend, "backend_reason": run.backend_reason,
           "load_in_4bit": load_in_4bit and cuda, "batch_size": args.sft_batch_size, "step_s": step_s,
           "setup_s": (meter.began or t0) - t0, "total_s": total_s, "every_step_s": every_step_s,
           "median_timed_step_s": timed_steps[len(timed_steps) // 2],
           "trainable_params": sum(p.numel() for p in run.model.parameters() if p.requires_grad),
           "loss": run.metrics.get("train_loss"),
           "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}
    if len(batches) != args.steps or not all("lengths" in b for b in batches):
        out["tokens_note"] = (f"the forward hook saw {len(meter.batches)} calls for {args.warmup + args.steps} steps "
                              "(or calls without input_ids): token counts are not available")
        return out
    tokens = sum(sum(b["lengths"]) for b in batches) / args.steps
    flops = [sft_flops(info, b["lengths"], b["images"], b["loss_tokens"]) for b in batches]
    out |= {"tokens_per_step": tokens, "tokens_per_s": tokens / step_s,
            "samples_per_s": args.sft_batch_size / step_s,
            "image_tokens_per_step": sum(b["image_tokens"] for b in batches) / args.steps,
            "loss_tokens_per_step": (sum(b["loss_tokens"] for b in batches) / args.steps
                                     if all(b["loss_tokens"] is not None for b in batches) else None),
            "padded_shape": batches[-1]["shape"], "images_per_step": sum(b["images"] for b in batches) / args.steps,
            "model_tflop_per_step": sum(f[0] for f in flops) / args.steps / 1e12,
            "naive_tflop_per_step": sum(f[1] for f in flops) / args.steps / 1e12}
    return out


# --- parent side: run the parts, print, write the JSON ---------------------------------------------


PACKAGES = ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "bitsandbytes", "unsloth",
            "unsloth_zoo", "xformers", "triton", "pydantic-settings")


def package_versions() -> dict[str, str]:
    """Installed versions (read from metadata, nothing imported), so a missing package is named up front."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "MISSING"
    return out


def peak_tflops(device: str | None, override: float | None) -> float | None:
    if override:
        return override
    for name, peak in PEAK_BF16_TFLOPS.items():  # "H100 PCIe" before "H100"
        if device and all(w in device for w in name.split()):
            return peak
    return None


def run_part(name: str, argv: list[str], wd: Path, deadline: float | None) -> dict:
    """One part in a child process (own session, so a timeout ends it and whatever it started)."""
    result, stage_file = wd / f"{name}.result.json", wd / f"{name}.stage"
    for f in (result, stage_file):
        f.unlink(missing_ok=True)
    env = os.environ | {"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                        "HF_DATASETS_OFFLINE": "1", "UNSLOTH_DISABLE_STATISTICS": "1"}
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--part", name, "--workdir", str(wd)]
    print(f"\n== {name}", flush=True)
    if deadline is not None and deadline - time.monotonic() < 5:
        print(f"  {name} not started: --time-budget ran out", flush=True)
        return {"ok": False, "stage": "not started", "error": "--time-budget ran out before this part"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    timeout = None if deadline is None else max(1.0, deadline - time.monotonic())
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        where = stage_file.read_text() if stage_file.exists() else "start"
        print(f"  {name} stopped at step '{where}' after {time.perf_counter() - t0:.0f} s: --time-budget ran out",
              flush=True)
        return {"ok": False, "stage": where, "error": f"stopped after {time.perf_counter() - t0:.0f} s: "
                "--time-budget ran out", "wall_s": time.perf_counter() - t0}
    if result.exists():
        out = json.loads(result.read_text())
    else:
        where = stage_file.read_text() if stage_file.exists() else "start"
        out = {"ok": False, "stage": where, "error": f"the process died with exit code {code} (no result written)"}
    out["wall_s"] = time.perf_counter() - t0
    if out.get("skipped"):
        print(f"  {name} skipped: {out.get('error')}", flush=True)
    elif not out.get("ok"):
        print(f"  {name} FAILED at step '{out.get('stage')}': {out.get('error')}"
              + (f"\n    at {out['where']}" if out.get("where") else "")
              + (f"\n    raised at {out['raised_at']}" if out.get("raised_at") else ""), flush=True)
    return out


def child(args) -> None:
    """Run one part and write its result; a failure is a result too (with its step and cause)."""
    wd = Path(args.workdir)
    _STAGE["file"] = wd / f"{args.part}.stage"
    cuda = args.device == "cuda"
    try:
        if args.part == "memory":
            out = part_memory(args, wd, cuda)
        elif args.part == "prepare":
            out = part_prepare(args, wd, cuda)
        else:
            out = part_sft(args, wd, cuda, args.part)
    except BaseException as exc:  # noqa: BLE001 - every failure is reported, with its step
        traceback.print_exc(limit=-12)
        out = failure(exc)
    (wd / f"{args.part}.result.json").write_text(json.dumps(out, default=str))


def summary(results: dict, args, command: str) -> list[str]:
    lines = []
    mem = results.get("memory")
    if mem and mem.get("ok"):
        lines.append(f"memory model: {mem['device']}; frozen LLaMA-3.2-{PRESETS[args.preset]['lm']} architecture + "
                     f"Q-Former {mem['arch']['qformer_layers']}x{mem['arch']['qformer_hidden']}, "
                     f"{count(mem['params'])} params ({count(mem['trainable_params'])} trainable), "
                     f"random weights, {mem['precision']}; {mem['samples']:,} synthetic samples")
        for r in mem["rows"]:
            lines.append(f"  batch {r['batch_size']:>5}: " + (r["error"] if "error" in r else
                         f"{r['samples_per_s']:8.{0 if r['samples_per_s'] >= 100 else 1}f} samples/s  "
                         f"{r['step_s'] * 1000:8.1f} ms/step  "
                         + (f"peak {r['peak_gib']:.1f} GiB" if r["peak_gib"] is not None else "")))
    elif mem:
        lines.append(f"memory model: FAILED at '{mem.get('stage')}': {mem.get('error')}")
    best = max((r for r in (mem or {}).get("rows", []) if "samples_per_s" in r),
               key=lambda r: r["samples_per_s"], default=None)
    if best:
        hours = EPOCHS * VISDIAL_TRAIN_SAMPLES / best["samples_per_s"] / 3600
        lines.append(f"  best: batch {best['batch_size']}, {best['samples_per_s']:.0f} samples/s -> {EPOCHS} epochs x "
                     f"{VISDIAL_TRAIN_SAMPLES:,} samples in {hours * 60:.1f} min ({hours:.2f} h)")
    prep = results.get("prepare")
    peft, uns = results.get("peft"), results.get("unsloth")
    if prep:
        if prep.get("ok"):
            p = prep["params"]
            base = ("bf16" if args.bf16_base else "4-bit NF4") if args.device == "cuda" else "float32 (CPU)"
            lines.append(f"SFT model: Gemma3ForConditionalGeneration {PRESETS[args.preset]['gemma']}, "
                         f"{count(p['total'])} params (text {count(p['text'])}, vision {count(p['vision'])}), "
                         f"{prep['mm_tokens']} image tokens, {prep['vision']['image_size']} px; LoRA r=16 alpha=16, "
                         f"batch {args.sft_batch_size}, ~{args.text_tokens} text tokens + 1 image per sample, "
                         f"{base} base, gradient checkpointing; random weights")
        else:
            lines.append(f"SFT model: FAILED at '{prep.get('stage')}': {prep.get('error')}")
    for label, r in (("transformers+peft+trl", peft), ("unsloth", uns)):
        if r is None:
            continue
        if not r.get("ok"):
            lines.append(f"  {label:<22} {'skipped' if r.get('skipped') else 'FAILED'} at '{r.get('stage')}': "
                         f"{r.get('error')}" + (f" [{r['where']}]" if r.get("where") else ""))
            continue
        peak = peak_tflops(r.get("device"), args.peak_tflops)
        line = f"  {label:<22} {r['step_s']:.3f} s/step (median {r['median_timed_step_s']:.3f})"
        if "tokens_per_s" in r:
            line += (f", {r['tokens_per_s']:,.0f} tokens/s ({r['tokens_per_step']:.0f} non-pad tokens/step, "
                     f"{r['image_tokens_per_step']:.0f} of them image), {r['samples_per_s']:.2f} samples/s")
            if peak:
                r["mfu"] = r["model_tflop_per_step"] / r["step_s"] / peak
                r["mfu_naive"] = r["naive_tflop_per_step"] / r["step_s"] / peak
                line += f", MFU {100 * r['mfu']:.1f}% (naive 4N: {100 * r['mfu_naive']:.1f}%)"
            else:
                line += ", MFU n/a (no bf16 peak known for this device; --peak-tflops)"
        else:
            line += f" ({r.get('tokens_note')})"
        if r.get("peak_gib") is not None:
            line += f", peak {r['peak_gib']:.1f} GiB"
        loss = "n/a" if r.get("loss") is None else f"{r['loss']:.3f}"
        lines.append(line + f"; LoRA {count(r['trainable_params'])} trainable, loss {loss}")
    if peft and uns and peft.get("ok") and uns.get("ok"):
        lines.append(f"  unsloth vs transformers+peft+trl: {peft['step_s'] / uns['step_s']:.2f}x step speed")
    if peft and peft.get("ok") and "mfu" in peft or uns and uns.get("ok") and "mfu" in uns:
        dev = (peft if peft and peft.get("ok") else uns)["device"]
        lines.append(f"  MFU peak: {peak_tflops(dev, args.peak_tflops)} TFLOP/s bf16 dense ({dev}); model FLOPs = "
                     "4*N_decoder*T + 4*N_lm_head*T_loss + 12*L*d_attn*sum(S^2) + images*(4*N_vision*patches + "
                     "12*L_v*d_v*patches^2 + 4*N_proj*256) (LoRA: forward + input gradients of frozen weights; "
                     "recompute not counted)")
    full = args.preset == "full" and args.memory_samples == VISDIAL_TRAIN_SAMPLES
    if best:
        met = best["samples_per_s"] >= TARGET_SAMPLES_S
        verdict = ("met" if met else "NOT met") if full else "n/a (not the full-size run)"
        lines.append(f"targets: memory model >= {TARGET_SAMPLES_S} samples/s "
                     f"(2 epochs x {VISDIAL_TRAIN_SAMPLES:,} <= 1 h): {verdict} "
                     f"(best {best['samples_per_s']:.0f} samples/s); SFT: figures only, no fixed target")
    else:
        lines.append(f"targets: memory model >= {TARGET_SAMPLES_S} samples/s: no figure; SFT: figures only")
    lines.append(f"reproduce: {command}")
    return lines


def parse(argv: list[str] | None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--preset", default="full", choices=sorted(PRESETS),
                    help="full: Gemma3-4B and LLaMA-3.2-1B shapes; tiny: tiny models (a CPU check)")
    ap.add_argument("--steps", type=int, default=10, help="timed optimiser steps per measurement")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (>= 1)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", help="memory model batch sizes (preset default)")
    ap.add_argument("--memory-samples", type=int, help=f"samples in the synthetic set (full: {VISDIAL_TRAIN_SAMPLES})")
    ap.add_argument("--sft-batch-size", type=int, help="per-device SFT batch (preset default: 4 full, 2 tiny)")
    ap.add_argument("--text-tokens", type=int, default=300, help="text tokens per SFT sample (+ the image's)")
    ap.add_argument("--bf16-base", action="store_true", help="SFT on a bf16 base instead of 4-bit NF4")
    ap.add_argument("--backends", nargs="+", default=["peft", "unsloth"], choices=["peft", "unsloth"])
    ap.add_argument("--skip-sft", action="store_true")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--peak-tflops", type=float, help="bf16 dense peak for MFU (default: by device name)")
    ap.add_argument("--time-budget", type=float, default=0, help="seconds for the whole run; a part that would "
                    "overrun it is stopped and reported (0: none)")
    ap.add_argument("--out", default="/tmp/mmem-bench/", help="folder for train_bench.json")
    ap.add_argument("--workdir", help="scratch folder (the 4B checkpoint: ~8.6 GB); default a new temp folder")
    ap.add_argument("--keep-workdir", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    preset = PRESETS[args.preset]
    args.batch_sizes = args.batch_sizes or preset["batch_sizes"]
    args.memory_samples = args.memory_samples or preset["memory_samples"]
    args.sft_batch_size = args.sft_batch_size or preset["sft_batch_size"]
    if args.warmup < 1 or args.steps < 1:
        ap.error("--warmup and --steps must be >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    if args.part:
        return child(args)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda but torch sees no CUDA device; on a CPU: --device cpu --preset tiny")
    command = " ".join(shlex.quote(a) for a in ["python", "benchmarks/train_bench.py", *argv])
    deadline = time.monotonic() + args.time_budget if args.time_budget else None
    wd = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="mmem-train-bench-"))
    wd.mkdir(parents=True, exist_ok=True)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    out_file = out_dir / "train_bench.json"
    parts = ([] if args.skip_memory else ["memory"]) + ([] if args.skip_sft else ["prepare", *args.backends])
    packages = package_versions()
    print("packages: " + ", ".join(f"{k} {v}" for k, v in packages.items()), flush=True)
    results: dict = {}
    t0 = time.perf_counter()
    try:
        for name in parts:
            if name in ("peft", "unsloth") and not results.get("prepare", {}).get("ok"):
                results[name] = {"ok": False, "stage": "prepare", "error": "no Gemma3 folder (the prepare part failed)"}
                continue
            results[name] = run_part(name, argv, wd, deadline)
            out_file.write_text(json.dumps({"command": command, "args": vars(args), "packages": packages,
                                            "results": results}, indent=1, default=str))
    finally:
        if not args.keep_workdir and not args.workdir:
            shutil.rmtree(wd, ignore_errors=True)
    lines = summary(results, args, command)
    out_file.write_text(json.dumps({"command": command, "args": vars(args), "packages": packages, "results": results,
                                    "summary": lines, "wall_s": time.perf_counter() - t0}, indent=1, default=str))
    print("\n" + "\n".join(lines))
    print(f"JSON: {out_file} (wall {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
