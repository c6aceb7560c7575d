"""Training speed on one GPU: Gemma3-4B LoRA SFT (unsloth vs transformers+peft+trl) and the memory model.

Issue 5's speed section, measured through the project's own training code on random weights
(none can be downloaded here; speed does not depend on their values):

* memory model (``training.memory_loop.train_memory`` over ``training.memory_net.MemoryModel``,
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

from benchmarks.train_bench_parts import (
    PARTS,
    PRESETS,
    STAGE,
    VISDIAL_TRAIN_SAMPLES,
    count,
    failure,
    part_memory,
    part_prepare,
    part_sft,
)

EPOCHS = 2
TARGET_SAMPLES_S = 460  # 2 x 827,830 samples in one hour
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.4, "H200": 989.4}  # dense, no sparsity

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
        print(
            f"  {name} stopped at step '{where}' after {time.perf_counter() - t0:.0f} s: "
            "--time-budget ran out",
            flush=True,
        )
        return {"ok": False, "stage": where, "error": f"stopped after {time.perf_counter() - t0:.0f} s: "
                "--time-budget ran out", "wall_s": time.perf_counter() - t0}
    if result.exists():
        out = json.loads(result.read_text())
    else:
        where = stage_file.read_text() if stage_file.exists() else "start"
        out = {
            "ok": False,
            "stage": where,
            "error": f"the process died with exit code {code} (no result written)",
        }
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
    STAGE["file"] = wd / f"{args.part}.stage"
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
        lines.append(
            f"memory model: {mem['device']}; frozen LLaMA-3.2-{PRESETS[args.preset]['lm']} architecture + "
            f"Q-Former {mem['arch']['qformer_layers']}x{mem['arch']['qformer_hidden']}, "
            f"{count(mem['params'])} params ({count(mem['trainable_params'])} trainable), "
            f"random weights, {mem['precision']}; {mem['samples']:,} synthetic samples"
        )
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
        lines.append(
            f"  best: batch {best['batch_size']}, {best['samples_per_s']:.0f} samples/s -> {EPOCHS} epochs x "
            f"{VISDIAL_TRAIN_SAMPLES:,} samples in {hours * 60:.1f} min ({hours:.2f} h)"
        )
    prep = results.get("prepare")
    peft, uns = results.get("peft"), results.get("unsloth")
    if prep:
        if prep.get("ok"):
            p = prep["params"]
            base = ("bf16" if args.bf16_base else "4-bit NF4") if args.device == "cuda" else "float32 (CPU)"
            lines.append(
                f"SFT model: Gemma3ForConditionalGeneration {PRESETS[args.preset]['gemma']}, "
                f"{count(p['total'])} params (text {count(p['text'])}, vision {count(p['vision'])}), "
                f"{prep['mm_tokens']} image tokens, {prep['vision']['image_size']} px; LoRA r=16 alpha=16, "
                f"batch {args.sft_batch_size}, ~{args.text_tokens} text tokens + 1 image per sample, "
                f"{base} base, gradient checkpointing; random weights"
            )
        else:
            lines.append(f"SFT model: FAILED at '{prep.get('stage')}': {prep.get('error')}")
    for label, r in (("transformers+peft+trl", peft), ("unsloth", uns)):
        if r is None:
            continue
        if not r.get("ok"):
            lines.append(
                f"  {label:<22} {'skipped' if r.get('skipped') else 'FAILED'} at '{r.get('stage')}': "
                f"{r.get('error')}" + (f" [{r['where']}]" if r.get("where") else "")
            )
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
        lines.append(
            f"  MFU peak: {peak_tflops(dev, args.peak_tflops)} TFLOP/s bf16 dense ({dev}); model FLOPs = "
            "4*N_decoder*T + 4*N_lm_head*T_loss + 12*L*d_attn*sum(S^2) + images*(4*N_vision*patches + "
            "12*L_v*d_v*patches^2 + 4*N_proj*256) (LoRA: forward + input gradients of frozen weights; "
            "recompute not counted)"
        )
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
    ap.add_argument(
        "--memory-samples", type=int, help=f"samples in the synthetic set (full: {VISDIAL_TRAIN_SAMPLES})"
    )
    ap.add_argument(
        "--sft-batch-size", type=int, help="per-device SFT batch (preset default: 4 full, 2 tiny)"
    )
    ap.add_argument("--text-tokens", type=int, default=300, help="text tokens per SFT sample (+ the image's)")
    ap.add_argument("--bf16-base", action="store_true", help="SFT on a bf16 base instead of 4-bit NF4")
    ap.add_argument("--backends", nargs="+", default=["peft", "unsloth"], choices=["peft", "unsloth"])
    ap.add_argument("--skip-sft", action="store_true")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--peak-tflops", type=float, help="bf16 dense peak for MFU (default: by device name)")
    ap.add_argument(
        "--time-budget",
        type=float,
        default=0,
        help="seconds for the whole run; a part that would overrun it is stopped and reported (0: none)",
    )
    ap.add_argument("--out", default="/tmp/mmem-bench/", help="folder for train_bench.json")
    ap.add_argument(
        "--workdir", help="scratch folder (the 4B checkpoint: ~8.6 GB); default a new temp folder"
    )
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
            raise SystemExit(
                "--device cuda but torch sees no CUDA device; on a CPU: --device cpu --preset tiny"
            )
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
                results[name] = {
                    "ok": False,
                    "stage": "prepare",
                    "error": "no Gemma3 folder (the prepare part failed)",
                }
                continue
            results[name] = run_part(name, argv, wd, deadline)
            out_file.write_text(json.dumps({"command": command, "args": vars(args), "packages": packages,
                                            "results": results}, indent=1, default=str))
    finally:
        if not args.keep_workdir and not args.workdir:
            shutil.rmtree(wd, ignore_errors=True)
    lines = summary(results, args, command)
    out_file.write_text(
        json.dumps(
            {
                "command": command,
                "args": vars(args),
                "packages": packages,
                "results": results,
                "summary": lines,
                "wall_s": time.perf_counter() - t0,
            },
            indent=1,
            default=str,
        )
    )
    print("\n" + "\n".join(lines))
    print(f"JSON: {out_file} (wall {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
