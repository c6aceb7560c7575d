"""The memory model's training loop: checkpoints, and resume after a kill with the same data order.

The order of samples is a pure function of ``(seed, epoch)``, so a resumed run draws exactly the
batches the killed one would have drawn; a checkpoint holds the trainable weights, the optimiser
and scheduler state, the RNG states and the step, written to a temporary folder and renamed into
place (a kill mid-write leaves the previous checkpoint intact). Resuming from step k and training
to the end gives the same weights as never stopping.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from training.memory_data import MemoryData
from training.memory_net import MemoryModel, MemoryOutput

CKPT_PREFIX = "step-"
STATE = "state.pt"


@dataclass
class LoopResult:
    steps: int
    resumed_from: int
    metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)


@lru_cache(maxsize=2)  # a permutation of the whole set: once per epoch, not once per step
def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The sample order of one epoch: depends on nothing but the seed and the epoch number.
    Callers must not modify the returned tensor (it is shared)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> torch.Tensor:
    per_epoch = math.ceil(n / batch_size)
    epoch, k = divmod(step, per_epoch)
    return epoch_order(n, seed, epoch)[k * batch_size:(k + 1) * batch_size]


def total_steps(n: int, config: Any) -> int:
    per_epoch = math.ceil(n / config.batch_size)
    return config.max_steps or max(1, math.ceil(config.epochs * per_epoch))


def make_optimizer(model: MemoryModel, config: Any, steps: int):
    """AdamW over the trainable parameters; linear warm-up, then cosine to zero (transformers')."""
    from transformers import get_cosine_schedule_with_warmup

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    return opt, get_cosine_schedule_with_warmup(
        opt, num_warmup_steps=config.warmup_steps, num_training_steps=steps
    )


def autocast(device: torch.device, dtype: str):
    use_bf16 = device.type == "cuda" and dtype in ("auto", "bf16")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16)


def train_step(model: MemoryModel, opt, sched, data: MemoryData, idx: torch.Tensor, config: Any,
               device: torch.device) -> MemoryOutput:
    with autocast(device, config.dtype):
        out = model(
            data.batch(idx), infonce_weight=config.infonce_weight, temperature=config.infonce_temperature
        )
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], config.grad_clip)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return out


@torch.no_grad()
def evaluate_loss(
    model: MemoryModel, data: MemoryData, config: Any, device: torch.device
) -> dict[str, float]:
    """Token-weighted answer cross-entropy (and its perplexity) over ``data``."""
    if len(data) == 0:
        return {}
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    for start in range(0, len(data), config.batch_size):
        idx = torch.arange(start, min(start + config.batch_size, len(data)))
        with autocast(device, config.dtype):
            out = model(data.batch(idx))
        total += float(out.ce) * out.answer_tokens
        tokens += out.answer_tokens
    model.train(was_training)
    ce = total / max(tokens, 1)
    return {"eval_ce": ce, "eval_perplexity": math.exp(min(ce, 50.0)), "eval_samples": float(len(data))}


# --- checkpoints ------------------------------------------------------------------------------


def trainable_state(model: MemoryModel) -> dict[str, torch.Tensor]:
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k in names}


def save_checkpoint(
    folder: Path, step: int, model: MemoryModel, opt, sched, history: list, keep: int
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{CKPT_PREFIX}{step:09d}"
    tmp = folder / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    state = {
        "step": step,
        "model": trainable_state(model),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "history": history,
    }
    torch.save(state, tmp / STATE)
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)
    for old in list_checkpoints(folder)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.name.startswith(CKPT_PREFIX) and (p / STATE).is_file())


def load_checkpoint(path: Path, model: MemoryModel, opt, sched) -> tuple[int, list]:
    state = torch.load(path / STATE, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"], strict=False)
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng_cpu"])
    if state["rng_cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    return int(state["step"]), list(state["history"])


# --- the loop -------------------------------------------------------------------------------


def train_memory(
    model: MemoryModel,
    train: MemoryData,
    evaluation: MemoryData | None,
    config: Any,
    checkpoints: Path,
    *,
    device: torch.device,
    on_step: Callable[[int, MemoryOutput], None] | None = None,
    progress: Callable[[int], None] | None = None,
    log_every: int = 10,
) -> LoopResult:
    """Train from the newest checkpoint under ``checkpoints`` (or from scratch) to the last step."""
    if len(train) == 0:
        raise ValueError("no training samples (are the embed tables filled for this split?)")
    steps = total_steps(len(train), config)
    model.train()
    opt, sched = make_optimizer(model, config, steps)
    start, history = 0, []
    ckpts = list_checkpoints(checkpoints)
    if ckpts:
        start, history = load_checkpoint(ckpts[-1], model, opt, sched)
    if progress is not None and start:
        progress(start)
    running, count, t0, samples = torch.zeros((), device=device), 0, time.perf_counter(), 0
    for step in range(start, steps):
        idx = batch_indices(len(train), config.batch_size, config.seed, step)
        out = train_step(model, opt, sched, train, idx, config, device)
        running += out.loss.detach()
        count += 1
        samples += len(idx)
        done = step + 1
        if done % log_every == 0 or done == steps:
            history.append({"step": done, "loss": float(running) / count, "lr": sched.get_last_lr()[0]})
            running, count = torch.zeros((), device=device), 0
        if done % config.checkpoint_every == 0 or done == steps:
            save_checkpoint(checkpoints, done, model, opt, sched, history, config.keep_checkpoints)
        if progress is not None:
            progress(1)
        if on_step is not None:
            on_step(done, out)
    elapsed = time.perf_counter() - t0
    metrics = {"train_loss": history[-1]["loss"] if history else float("nan"), "steps": float(steps),
               "train_samples": float(len(train)), "samples_per_s": samples / elapsed if samples else 0.0}
    if evaluation is not None:
        metrics |= evaluate_loss(model, evaluation, config, device)
    return LoopResult(steps, start, metrics, history)
