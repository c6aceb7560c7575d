"""Embed benchmark: the whole embed stage on the VisDial-train-sized demo set, MFU, and the
one-sample-at-a-time baseline side by side.

What it measures, in one run:
  1. stage   -- ``embed_flow`` end to end on an ingested root (decode in worker processes ->
                ImageBind-Huge with random weights, bf16 on CUDA -> Arrow -> merged into Lance ->
                vector index), from empty output tables; then the re-run with nothing changed.
  2. model   -- the model alone on device-resident batches (images, then texts): throughput and
                MFU against the GPU's dense peak; FLOPs per sample counted by torch's FlopCounterMode.
  3. baseline-- the research report's way on a subset: fp32, one sample at a time, ImageBind's own
                ``load_and_transform_vision_data`` per image, one ``torch.save`` .pt file per sample.
Targets (issue 18, one H100): stage <= 100 s; model MFU >= 0.40, stage MFU >= 0.30; re-run <= 5 s.

    python benchmarks/embed_bench.py --device cuda                       # full size, one H100
    python benchmarks/embed_bench.py --tiny --device cpu --dialogs 400 --baseline-samples 64   # CPU check

The data is generated once (``--data``) and ingested once into ``--data/embed-root-<N>``, neither
part of the figure. By default it has the real set's cost shape (``write_split(photos=True)``:
photo-like progressive JPEGs, >= 500k distinct turn texts at full size; the per-core PIL decode rate
is printed); ``--baseline-jpeg`` writes them baseline, ``--flat`` the flat-colour demo scenes, whose
figure flatters the stage (DESIGN.md, "Cost shape").
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shlex
import shutil
import sys
import time
from functools import partial
from pathlib import Path

os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import pyarrow as pa
import torch

from embed.compute import resolve_workers
from embed.model import load_embedder
from embed.plan import OUTPUT, ModelArgs
from embed.preprocess import normalise_pixels
from ingest.demo_data import write_split
from schemas.embed import EmbedConfig, turn_text
from schemas.ingest import IngestConfig
from storage.lance import connect, read, table_exists

# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, from the vendors' datasheets.
PEAK_BF16_TFLOPS = {"H100 SXM": 989.4, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.4, "H200": 989.4,
                    "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_TFLOPS.items():  # most specific names first
        if all(part in name for part in key.split()):
            return value
    return None


def prepare(args) -> Path:
    """Generate the demo set and ingest it once; later runs reuse both."""
    from ingest.clean import clean
    from ingest.write import write

    data = args.data / args.tag
    if not (data / ".complete").exists():
        t = time.perf_counter()
        shutil.rmtree(data, ignore_errors=True)
        write_split(data, "train", args.dialogs, seed=0, workers=args.workers, progress=True,
                    photos=not args.flat, baseline_jpeg=args.baseline_jpeg)
        (data / ".complete").write_text("ok")
        print(f"generated {args.dialogs} dialogs + JPEGs in {time.perf_counter() - t:.1f} s "
              "(not part of the figure)")
    root = args.data / f"embed-root-{args.tag}"
    if not (root / ".ingested").exists():
        t = time.perf_counter()
        shutil.rmtree(root, ignore_errors=True)
        cfg = IngestConfig(data_root=root, visdial=data / "visdial_1.0_train.json",
                           images=data / "images" / "train2014", coco=data / "captions_train2014.json",
                           workers=args.workers)
        write(cfg.lance_uri, clean(cfg, progress=True), "bench")
        (root / ".ingested").write_text(str(data / "images" / "train2014"))
        print(f"ingested in {time.perf_counter() - t:.1f} s (not part of the figure)")
    return root


def pil_decode_per_core(root: Path, images: int = 200) -> dict:
    """One core's PIL decode rate (best of 3 passes over files already in the page cache) and the files'
    mean size: the cost shape of the data, comparable with COCO photos (~150-200 images/s per core)."""
    from PIL import Image

    folder = Path((root / ".ingested").read_text())
    blobs = [p.read_bytes() for p in sorted(folder.iterdir())[:images]]
    best = 0.0
    for _ in range(3):
        t = time.perf_counter()
        for b in blobs:
            with Image.open(io.BytesIO(b)) as im:
                im.load()
        best = max(best, len(blobs) / (time.perf_counter() - t))
    return {"pil_decode_per_core_images_per_s": round(best, 1),
            "jpeg_mean_kib": round(float(np.mean([len(b) for b in blobs])) / 1024, 1)}


def stage_config(args, root: Path, image_decode: str) -> EmbedConfig:
    images = Path((root / ".ingested").read_text())
    return EmbedConfig(
        data_root=root, tiny=args.tiny, random_weights=not args.tiny, device=args.device,
        batch_size=args.batch_size, shard_rows=args.shard_rows, decode_workers=args.decode_workers,
        decode_pool=args.decode_pool, concurrent_shards=args.concurrent_shards,
        image_decode=image_decode,
        compile=args.compile, image_roots={"train": images}, index_min_rows=args.index_min_rows,
        early_index=not args.late_index,
    )


def run_stage(cfg: EmbedConfig) -> dict:
    from flows.embed import embed_flow

    db = connect(cfg.lance_uri)
    for name in OUTPUT.values():  # start from nothing: no table rows, no cached shard results
        if table_exists(db, name):
            db.drop_table(name)
    shutil.rmtree(cfg.results_dir, ignore_errors=True)
    shutil.rmtree(cfg.rows_dir, ignore_errors=True)
    if cfg.compile:  # compile before the clock starts (it is a one-off per worker process)
        warm = ModelArgs.from_config(cfg).load()
        warm.embed_texts(["warm up"]), warm.embed_pixels(np.zeros((1, 224, 224, 3), np.uint8))
    t = time.perf_counter()
    counts = embed_flow(cfg)
    wall = time.perf_counter() - t
    t = time.perf_counter()
    again = embed_flow(cfg)
    return {"counts": counts, "wall_s": wall, "rerun_s": time.perf_counter() - t,
            "rerun_computed": again.shards_computed + again.shards_cached}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode_only(cfg: EmbedConfig, root: Path, images: int) -> dict:
    """Images/s of decode + resize + crop alone (workers' processes or threads; the GPU from bytes
    the workers read): what the stage can feed the GPU whatever the model's speed."""
    from embed.compute import DECODE_CHUNK, map_ordered, resolve_workers
    from embed.jpeg import decode_on_device, read_jpegs
    from embed.preprocess import load_pixels_many

    rows = read(connect(cfg.lance_uri), "images", columns=["path"]).slice(0, images)
    folder = Path((root / ".ingested").read_text())
    paths = [str(folder / p) for p in rows.column("path").to_pylist()]
    jobs = [paths[i:i + DECODE_CHUNK] for i in range(0, len(paths), DECODE_CHUNK)]
    workers = resolve_workers(cfg.decode_workers)
    ways = {k: partial(map_ordered, load_pixels_many, workers=workers, kind=k) for k in ("process", "thread")}
    if torch.cuda.is_available() and cfg.device != "cpu":
        ways["gpu"] = lambda js: decode_on_device(map_ordered(read_jpegs, js, workers, "process"), "cuda")
    out = {}
    if "gpu" in ways:  # how far the GPU's pixels are from ImageBind's CPU path, in levels of 255
        [(gpu, _)] = ways["gpu"](jobs[:1])
        diff = np.abs(gpu.cpu().numpy() - load_pixels_many(jobs[0])[0].astype(int))
        out["gpu_pixel_diff_max_mean"] = (int(diff.max()), round(float(diff.mean()), 3))
    for name, run in ways.items():
        sum(len(px) for px, _ in run(jobs[:workers]))  # start the pool (and the decoder)
        t = time.perf_counter()
        n = sum(len(px) for px, _ in run(jobs))
        out[name] = round(n / (time.perf_counter() - t), 1)
    return out


def _flops(model, modality: str, x: torch.Tensor) -> float:
    """FLOPs of one forward of ``x`` (counted by torch on the eager model)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        getattr(model, "_orig_mod", model)({modality: x})
    return float(fc.get_total_flops())


def _timed(model, modality: str, batches: list[torch.Tensor], seconds: float,
           dev: torch.device) -> tuple[int, float]:
    """Forwards over ``batches`` (cycled) for about ``seconds``: (rows run, seconds)."""
    for x in batches[:2]:
        model({modality: x})  # warm-up (and compile, if compiled)
    sync(dev)
    rows, n, t = 0, 0, time.perf_counter()
    while time.perf_counter() - t < seconds or n < 3:
        x = batches[n % len(batches)]
        model({modality: x})
        rows += len(x)
        n += 1
        if n % 4 == 0:
            sync(dev)
    sync(dev)
    return rows, time.perf_counter() - t


def real_texts(cfg: EmbedConfig, n: int) -> list[str]:
    """``n`` distinct texts of the ingested set (turns and captions), as the stage embeds them."""
    from embed.plan import text_items

    items = text_items(connect(cfg.lance_uri), cfg)
    pick = np.random.default_rng(0).choice(len(items), size=min(n, len(items)), replace=False)
    return items.column("text").take(pa.array(np.sort(pick))).to_pylist()


@torch.inference_mode()
def model_only(cfg: EmbedConfig, seconds: float) -> dict:
    """Throughput and FLOPs of the model alone, inputs already on the device (what MFU is about):
    images; texts at the full 77 positions; and the data's own texts as the stage runs them
    (shortest first, token-budget batches cut to their longest text: the FLOPs actually needed)."""
    from embed.preprocess import CONTEXT_LENGTH, length_order, token_batches, tokenize

    emb = ModelArgs.from_config(cfg).load()  # the same cached model the stage used
    bs, dev = emb.batch_size, emb.device
    rng = np.random.default_rng(0)
    full = torch.from_numpy(rng.integers(1, 49000, (bs, 77))).to(dev)
    full[:, 20] = 49407  # an end-of-text token, where ImageBind's text head reads
    tokens = tokenize(real_texts(cfg, bs * 64))
    tokens = tokens[length_order(tokens)]
    if emb.pad_batches:
        cut = [tokens[i:i + bs] for i in range(0, len(tokens), bs)]
    else:
        cut = list(token_batches([tokens], bs * CONTEXT_LENGTH))
    noise = torch.from_numpy(rng.integers(0, 256, (bs, 224, 224, 3), dtype=np.uint8))
    inputs = {
        "vision": [normalise_pixels(noise.to(dev)).to(emb.dtype)],
        "text_77": [full],
        "text": [torch.from_numpy(b).long().to(dev) for b in cut],
    }
    out = {}
    for name, batches in inputs.items():
        modality = "vision" if name == "vision" else "text"
        flops = sum(_flops(emb.model, modality, x) for x in batches)
        rows, secs = _timed(emb.model, modality, batches, seconds, dev)
        per_row = flops / sum(len(x) for x in batches)
        out[name] = {"per_s": rows / secs, "gflop_per_sample": per_row / 1e9,
                     "tflops": rows / secs * per_row / 1e12}
    return out


@torch.inference_mode()
def stage_flops(cfg: EmbedConfig, images: int, widths: dict) -> tuple[float, float]:
    """FLOPs the stage ran (images at 224, texts at the widths their batches had) and would have run at 77."""
    emb = ModelArgs.from_config(cfg).load()
    dev = emb.device
    x = normalise_pixels(torch.zeros((2, 224, 224, 3), dtype=torch.uint8, device=dev)).to(emb.dtype)
    vision = images * _flops(emb.model, "vision", x) / 2

    def text_rows(width: int) -> float:
        t = torch.full((2, width), 1, dtype=torch.long, device=dev)
        t[:, -1] = 49407
        return _flops(emb.model, "text", t) / 2

    texts = sum(int(n) * text_rows(int(w)) for w, n in widths.items())
    return vision + texts, vision + sum(widths.values()) * text_rows(77)


@torch.inference_mode()
def baseline(cfg: EmbedConfig, root: Path, samples: int, out_dir: Path) -> dict:
    """The report's loop: fp32, one sample at a time through ImageBind's helpers, one .pt per sample."""
    from embed.compat import import_imagebind

    ib = import_imagebind()
    from imagebind.models.multimodal_preprocessors import SimpleTokenizer

    model = load_embedder(tiny=cfg.tiny, random_weights=not cfg.tiny, device=cfg.device,
                          dtype=torch.float32).model
    dev = next(model.parameters()).device
    db = connect(cfg.lance_uri)
    images = read(db, "images", columns=["image_id", "path"]).slice(0, samples).to_pylist()
    turns = read(db, "turns", columns=["image_id", "turn", "question", "answer"])
    turns = turns.slice(0, samples).to_pylist()
    folder = cfg.image_roots["train"]
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    tokenizer = SimpleTokenizer(bpe_path=ib.data.return_bpe_path())  # built once: kinder than the report
    res = {}
    sync(dev)
    t = time.perf_counter()
    for r in images:
        x = ib.data.load_and_transform_vision_data([str(folder / r["path"])], dev)
        torch.save(model({"vision": x})["vision"].cpu(), out_dir / f"img_{r['image_id']}.pt")
    res["images_per_s"] = len(images) / (time.perf_counter() - t)
    t = time.perf_counter()
    for r in turns:
        x = tokenizer(turn_text(r["question"], r["answer"])).unsqueeze(0).to(dev)
        torch.save(model({"text": x})["text"].cpu(), out_dir / f"turn_{r['image_id']}_{r['turn']}.pt")
    res["turns_per_s"] = len(turns) / (time.perf_counter() - t)
    res["samples"] = len(images) + len(turns)
    del model
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return res


def sig(x: float) -> float:
    return float(f"{x:.4g}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dialogs", type=int, default=82_783, help="images (10 turns each) in the demo set")
    ap.add_argument("--data", type=Path, default=None,
                    help="default /tmp/mmem-bench/visdial-photos (/tmp/mmem-bench/visdial with --flat)")
    ap.add_argument("--flat", action="store_true", help="the flat-colour demo scenes (flatters the stage)")
    ap.add_argument("--baseline-jpeg", action="store_true", help="photos as baseline JPEGs, as COCO's are")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2, help="processes generating/ingesting")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    choices=["cuda", "cpu"])
    ap.add_argument("--tiny", action="store_true",
                    help="the tiny random ImageBind (CPU check) instead of Huge")
    ap.add_argument("--batch-size", type=int, default=None, help="default 256 on CUDA, 32 on CPU")
    ap.add_argument("--shard-rows", type=int, default=4096)
    ap.add_argument("--decode-workers", type=int, default=0, help="0: all cores but one")
    ap.add_argument("--decode-images", type=int, default=16384,
                    help="images in the decode-only timing (0: no decode-only timing)")
    ap.add_argument("--decode-pool", choices=["process", "thread"], default="process")
    ap.add_argument("--concurrent-shards", type=int, default=3)
    ap.add_argument("--image-decode", choices=["cpu", "gpu"], nargs="+", default=["cpu"],
                    help="gpu: nvJPEG + resize on the GPU; several: the stage once with each, same run")
    ap.add_argument("--index-min-rows", type=int, default=100_000)
    ap.add_argument("--late-index", action="store_true",
                    help="every vector index after the last shard (early_index=False)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model (compiled before timing)")
    ap.add_argument("--model-seconds", type=float, default=15.0, help="length of each model-only timing loop")
    ap.add_argument("--baseline-samples", type=int, default=256,
                    help="images and turns in the baseline subset")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="dense bf16 peak (default: from the GPU name)")
    ap.add_argument("--prepare-only", action="store_true", help="generate and ingest the data, then stop")
    ap.add_argument("--stage-only", action="store_true",
                    help="the stage and the decode rates only (no model-only timing, baseline or MFU)")
    args = ap.parse_args()
    args.batch_size = args.batch_size or (256 if args.device == "cuda" else 32)
    args.data = args.data or Path("/tmp/mmem-bench/" + ("visdial" if args.flat else "visdial-photos"))
    args.tag = f"{args.dialogs}{'-baseline' * args.baseline_jpeg}"  # names the data, its root, the JSON
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)

    root = prepare(args)
    if args.prepare_only:
        return
    shape = pil_decode_per_core(root)
    args.shape = "flat scenes" if args.flat else "photo-like" + ", baseline JPEG" * args.baseline_jpeg
    print(f"data: {args.shape}, {shape}")
    from prefect.testing.utilities import prefect_test_harness

    cfgs = [stage_config(args, root, d) for d in dict.fromkeys(args.image_decode)]
    with prefect_test_harness(server_startup_timeout=180):  # a private Prefect server, not timed
        stages = [run_stage(cfg) for cfg in cfgs]
    decode = decode_only(cfgs[0], root, args.decode_images) if args.decode_images else None
    for cfg, stage in zip(cfgs, stages, strict=True):
        report_stage(args, command, root, cfg, stage, shape, decode)


def report_stage(args, command: str, root: Path, cfg: EmbedConfig, stage: dict, shape: dict,
                 decode: dict | None) -> None:
    """Print one stage run's figures (and the model-only ones unless ``--stage-only``) and keep them
    as JSON beside the data."""
    c = stage["counts"]
    n_turns = read(connect(cfg.lance_uri), "turns", columns=["turn"]).num_rows
    dev = torch.device(args.device)
    ours_rate = (c.images + c.texts) / stage["wall_s"]
    report = {
        "command": command,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu x{os.cpu_count()}",
        "model": c.model, "dtype": "bfloat16" if dev.type == "cuda" else "float32",
        "compile": args.compile,
        "image_decode": cfg.image_decode, "early_index": cfg.early_index,
        "data": args.shape, **shape,
        "images": c.images, "turns": n_turns, "distinct_texts": c.texts,
        "stage_wall_s": round(stage["wall_s"], 2),
        "stage_images_per_s": round(c.images / stage["wall_s"], 1),
        "stage_samples_per_s": round(ours_rate, 1), "lance_merge_s": c.merge_seconds, "index": c.index,
        # the wall time by phase (the rest is the flow's start and end), and when each stream finished
        "stage_phases_s": {"plan": c.plan_seconds, "shards": c.compute_seconds, "finish": c.finish_seconds,
                           "index": c.index_seconds},
        "stream_done_s": c.stream_done_seconds,
        # summed over the shards in flight at once (so it can exceed the wall time)
        "stage_input_wait_s": {k: getattr(c, f"{k}_input_wait_s") for k in ("image", "text")},
        "stage_forward_s": {k: getattr(c, f"{k}_forward_s") for k in ("image", "text")},
        "rerun_nothing_changed_s": round(stage["rerun_s"], 2), "rerun_shards_run": stage["rerun_computed"],
        "decode_images_per_s": decode, "decode_workers": resolve_workers(cfg.decode_workers),
    }
    if not args.stage_only:
        report |= model_figures(args, cfg, root, c, stage["wall_s"], n_turns, ours_rate)
    print(f"\n=== embed benchmark (image decode: {cfg.image_decode}) ===")
    for k, v in report.items():
        print(f"{k:34s} {v}")
    print("targets (one H100, photo-like data): stage_wall_s <= 100; mfu_model_vision/text >= 0.40 and "
          "mfu_stage >= 0.30 on the FLOPs actually run (texts at their batches' widths); rerun <= 5 s")
    print("speedup_per_sample: (images + distinct texts)/s of the stage vs the baseline's samples/s "
          "(half images, half turns); speedup_full_set: the baseline's extrapolated time for every image, "
          "turn and caption one at a time (no dedupe, as the report did) over the stage's wall time")
    variant = "-gpu-decode" * (cfg.image_decode == "gpu") + "-late-index" * (not cfg.early_index)
    out = args.data / f"embed-bench-{('huge', 'tiny')[args.tiny]}-{args.device}-{args.tag}{variant}.json"
    out.write_text(json.dumps(report, indent=2, default=str))
    print(f"written to {out}\nreproduce with: {command}")


def model_figures(args, cfg: EmbedConfig, root: Path, c, wall_s: float, n_turns: int,
                  ours_rate: float) -> dict:
    """The model alone, the one-at-a-time baseline, and the MFUs against the stage's wall time."""
    model = model_only(cfg, args.model_seconds)
    base = baseline(cfg, root, args.baseline_samples, args.data / "baseline-pt")
    dev = torch.device(args.device)
    peak = peak_tflops(dev, args.peak_tflops)
    gflop = {m: v["gflop_per_sample"] for m, v in model.items()}
    ran, at_77 = stage_flops(cfg, c.images, c.text_widths)
    stage_tflops = ran / 1e12 / wall_s  # the FLOPs actually run (texts cut to their batches' widths)
    base_full_s = c.images / base["images_per_s"] + (n_turns + c.images) / base["turns_per_s"]
    half = base["samples"] / 2
    base_rate = base["samples"] / (half / base["images_per_s"] + half / base["turns_per_s"])
    report = {
        "model_images_per_s": round(model["vision"]["per_s"], 1),
        "model_texts_per_s": round(model["text"]["per_s"], 1),
        "model_texts_per_s_at_77": round(model["text_77"]["per_s"], 1),
        "gflop_per_image": sig(gflop["vision"]), "gflop_per_text": sig(gflop["text"]),
        "gflop_per_text_at_77": sig(gflop["text_77"]), "text_widths": c.text_widths,
        "stage_tflop_run": sig(ran / 1e12), "stage_tflop_if_77": sig(at_77 / 1e12),
        "model_tflops_vision": sig(model["vision"]["tflops"]),
        "model_tflops_text": sig(model["text"]["tflops"]),
        "model_tflops_text_at_77": sig(model["text_77"]["tflops"]),
        "stage_tflops": sig(stage_tflops), "peak_tflops": peak,
        "baseline_images_per_s": round(base["images_per_s"], 2),
        "baseline_turns_per_s": round(base["turns_per_s"], 2),
        "speedup_per_sample": round(ours_rate / base_rate, 1),
        "baseline_full_set_s_extrapolated": round(base_full_s, 1),
        "speedup_full_set": round(base_full_s / wall_s, 1),
    }
    if peak:
        report |= {f"mfu_model_{m}": round(model[m]["tflops"] / peak, 3) for m in model}
        report["mfu_stage"] = round(stage_tflops / peak, 3)
    return report


if __name__ == "__main__":
    main()
