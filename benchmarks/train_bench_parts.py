"""The parts of ``benchmarks/train_bench.py`` (its docstring says what they measure): each runs
in its own child process (``--part``), reports the step it is at, and writes its figures or its
failure as a result file the parent reads.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VISDIAL_TRAIN_SAMPLES = 827_830  # the report's cleaned train set: 82,783 dialogs x 10 turns
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
    "tiny": {"lm": "tiny", "gemma": "tiny", "batch_sizes": [16, 64], "memory_samples": 2000,
             "sft_batch_size": 2},
}
PARTS = ("memory", "prepare", "peft", "unsloth")
WORDS = (  # VisDial-like words for the synthetic conversations
    "is", "there", "a", "person", "in", "the", "picture", "yes", "no", "what", "color", "shirt", "man",
    "woman", "dog", "cat", "table", "sky", "tree", "car", "street", "white", "black", "red", "blue", "how",
    "many", "people", "sitting", "standing", "holding", "left", "right", "can", "you", "see", "it", "looks",
    "like", "i", "think", "so", "not", "sure", "maybe", "two", "three",
)



# --- child side: stage tracking and failure reports ----------------------------------------------

STAGE: dict[str, object] = {"name": "start", "file": None}


def stage(name: str) -> None:
    """Name the step now running (kept in a file, so the parent can say where a killed part was)."""
    STAGE["name"] = name
    print(f"  .. {name}", flush=True)
    if STAGE["file"]:
        Path(str(STAGE["file"])).write_text(name)


def failure(exc: BaseException) -> dict:
    """Which step failed, the exception, and where: the deepest frame of this project and of all."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if str(ROOT) in f.filename and "/.venv/" not in f.filename]

    def at(f) -> str:
        name = Path(f.filename).relative_to(ROOT) if str(ROOT) in f.filename else f.filename
        return f"{name}:{f.lineno} " \
               f"in {f.name}: {(f.line or '').strip()[:120]}"

    return {"ok": False, "stage": STAGE["name"], "error": f"{type(exc).__name__}: {str(exc)[:1500]}",
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
    from training.memory_data import NUM_POSITIONS, MemoryData

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
                      prompt_ids=p_ids, prompt_len=p_len, answer_ids=a_ids, answer_len=a_len,
                      answers=[""] * n)


def part_memory(args, wd: Path, cuda: bool) -> dict:
    import torch

    from benchmarks.eval_bench import PRESETS as LM_PRESETS
    from benchmarks.eval_bench import build_llm, build_tokenizer
    from schemas.train import BIG, MemoryTrainConfig
    from training.memory_loop import train_memory
    from training.memory_net import MemoryArch, MemoryModel

    device = torch.device("cuda" if cuda else "cpu")
    tiny, lm = args.preset == "tiny", PRESETS[args.preset]["lm"]
    common = {"data_root": wd, "tiny": tiny, "device": "cuda" if cuda else "cpu", "seed": args.seed,
              "checkpoint_every": BIG, "keep_checkpoints": 1, "max_steps": args.warmup + args.steps + 1}
    stage(f"build the memory model (LLaMA-3.2 {lm} architecture, random weights)")
    torch.manual_seed(args.seed)
    tok = build_tokenizer(LM_PRESETS[lm]["llm"]["vocab_size"])
    llm = build_llm(lm, device, torch.bfloat16 if cuda else torch.float32)  # load_llm's dtype
    arch = MemoryArch.from_config(MemoryTrainConfig(**common))
    model = MemoryModel(arch, llm, tok).to(device)  # memory parts float32, as build_memory_model leaves them
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    stage(f"synthetic data: {args.memory_samples} samples on {device}")
    data = synthetic_memory_data(args.memory_samples, arch, tok.vocab_size, tok.pad_token_id,
                                 tok.eos_token_id, device, args.seed)
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
        text_config={**GEMMA3_4B_TEXT, "pad_token_id": v[tm.PAD], "eos_token_id": eos,
                     "bos_token_id": v[tm.BOS]},
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
    model.generation_config = GenerationConfig(bos_token_id=v[tm.BOS], pad_token_id=v[tm.PAD],
                                               eos_token_id=eos)
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
    head = 0 if config.text_config.tie_word_embeddings else numel(model.lm_head)
    text_n = numel(inner.language_model) + head
    t, vc = config.text_config, config.vision_config
    return {
        "params": {"text": text_n, "vision": numel(inner.vision_tower),
                   "projector": numel(inner.multi_modal_projector),
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
    print(f"  Gemma3 folder {folder}: {count(info['params']['total'])} params, {gb:.2f} GB safetensors",
          flush=True)
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

    from schemas.train import BIG, SftConfig
    from training.sft import SftData, train_sft

    info = json.loads((wd / "model_info.json").read_text())
    load_in_4bit = not args.bf16_base
    config = SftConfig(
        data_root=wd, base=wd / "gemma3", backend=backend, device="cuda" if cuda else "cpu", seed=args.seed,
        batch_size=args.sft_batch_size, grad_accum=1, max_steps=args.warmup + args.steps, save_steps=BIG,
        warmup_steps=0, val_fraction=0.0, load_in_4bit=load_in_4bit, system_prompt=SYSTEM_PROMPT,
    )
    stage("synthetic chat samples")
    images = sorted((wd / "images").glob("*.jpg"))
    examples = synthetic_examples(args.sft_batch_size * (args.warmup + args.steps), images, args.text_tokens,
                                  args.seed)
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
        out["tokens_note"] = (f"the forward hook saw {len(meter.batches)} calls for "
                              f"{args.warmup + args.steps} steps (or calls without input_ids): "
                              "token counts are not available")
        return out
    tokens = sum(sum(b["lengths"]) for b in batches) / args.steps
    flops = [sft_flops(info, b["lengths"], b["images"], b["loss_tokens"]) for b in batches]
    out |= {"tokens_per_step": tokens, "tokens_per_s": tokens / step_s,
            "samples_per_s": args.sft_batch_size / step_s,
            "image_tokens_per_step": sum(b["image_tokens"] for b in batches) / args.steps,
            "loss_tokens_per_step": (sum(b["loss_tokens"] for b in batches) / args.steps
                                     if all(b["loss_tokens"] is not None for b in batches) else None),
            "padded_shape": batches[-1]["shape"],
            "images_per_step": sum(b["images"] for b in batches) / args.steps,
            "model_tflop_per_step": sum(f[0] for f in flops) / args.steps / 1e12,
            "naive_tflop_per_step": sum(f[1] for f in flops) / args.steps / 1e12}
    return out
