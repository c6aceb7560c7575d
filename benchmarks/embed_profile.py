"""Where ImageBind-Huge's device time goes: the top kernels of a few vision and text batches.

Complements ``embed_bench.py`` (which says *how fast*) by saying *what* the time is spent on,
so that an MFU below target points at a kernel class (GEMMs, attention, norms, elementwise).

    python benchmarks/embed_profile.py --device cuda [--compile] [--batch-size 256] [--text-width 16]

``text_short`` is a batch as the stage runs turn texts: ``--text-width`` positions (a multiple of 8)
and as many rows as fit the 77-position budget of ``--batch-size`` rows.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from embed.model import load_embedder
from embed.preprocess import normalise_pixels


def inputs(batch: int, device: torch.device, dtype: torch.dtype, width: int) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(0)
    pixels = torch.from_numpy(rng.integers(0, 256, (batch, 224, 224, 3), dtype=np.uint8)).to(device)
    tokens = torch.from_numpy(rng.integers(1, 49000, (batch, 77))).to(device)
    tokens[:, 20] = 49407  # end of text, where the text head reads
    short = torch.from_numpy(rng.integers(1, 49000, (batch * 77 // width, width))).to(device)
    short[:, width - 3] = 49407
    return {"vision": normalise_pixels(pixels).to(dtype), "text": tokens, "text_short": short}


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--rows", type=int, default=15, help="kernels listed per modality")
    ap.add_argument("--text-width", type=int, default=16, help="token positions of the text_short batches")
    args = ap.parse_args()
    emb = load_embedder(random_weights=True, device=args.device, batch_size=args.batch_size,
                        compile=args.compile)
    dev = emb.device
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    for name, x in inputs(args.batch_size, dev, emb.dtype, args.text_width).items():
        modality = "text" if name.startswith("text") else name
        for _ in range(2):  # warm-up (and compilation)
            emb.model({modality: x})
        sync()
        t = time.perf_counter()
        for _ in range(args.batches):
            emb.model({modality: x})
        sync()
        rate = len(x) * args.batches / (time.perf_counter() - t)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
        with profile(activities=acts) as prof:
            for _ in range(args.batches):
                emb.model({modality: x})
            sync()
        key = "self_device_time_total" if dev.type == "cuda" else "self_cpu_time_total"
        print(f"\n=== {name}: {rate:,.0f} samples/s at batch {len(x)} x {x.shape[1] if x.ndim == 2 else 224} "
              f"({'compiled' if args.compile else 'eager'}, {emb.dtype}) ===")
        print(prof.key_averages().table(sort_by=key, row_limit=args.rows, max_name_column_width=70))
    print("command: python " + " ".join(shlex.quote(a) for a in sys.argv))


if __name__ == "__main__":
    main()
