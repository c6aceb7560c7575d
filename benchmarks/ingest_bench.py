"""Ingest benchmark: the VisDial-train-sized demo set (82,783 images, 827,830 turns) on this machine.

Prints the whole ingest wall time (parse, image checks and hashing on every core, Lance writes)
and peak memory against the issue's targets, and the time of each phase.

    python benchmarks/ingest_bench.py                       # full size (generates the set once)
    python benchmarks/ingest_bench.py --dialogs 5000        # quicker
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ingest.clean import clean
from ingest.demo_data import write_split
from ingest.write import write
from schemas.ingest import IngestConfig


def peak_rss_gib() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, kids) / 2**20  # ru_maxrss is KiB on Linux


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dialogs", type=int, default=82_783)
    ap.add_argument("--data", type=Path, default=Path("/tmp/mmem-bench/visdial"),
                    help="where the set is generated")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    args = ap.parse_args()

    data = args.data / str(args.dialogs)
    marker = data / ".complete"
    if not marker.exists():
        t = time.perf_counter()
        shutil.rmtree(data, ignore_errors=True)
        write_split(data, "train", args.dialogs, seed=0, workers=args.workers, progress=True)
        marker.write_text("ok")
        print(f"generated {args.dialogs} dialogs + JPEGs in {time.perf_counter() - t:.1f} s")
    visdial = data / "visdial_1.0_train.json"

    root = args.data / f"root-{args.dialogs}"
    shutil.rmtree(root, ignore_errors=True)
    config = IngestConfig(data_root=root, visdial=visdial, images=data / "images" / "train2014",
                          coco=data / "captions_train2014.json", workers=args.workers)
    load_before = os.getloadavg()[0]  # the JSON phase comes first and is short: this is its load
    t = time.perf_counter()
    out = clean(config, progress=False)
    clean_s = time.perf_counter() - t
    write(config.lance_uri, out, "bench")
    total_s = time.perf_counter() - t
    n, json_s = out.parsed.num_dialogs + len(out.parsed.rejections), out.seconds["parse"]
    print(f"file: {visdial.stat().st_size / 2**20:.0f} MiB, {n} dialogs, "
          f"{out.counts()['turns_kept']} turns kept")
    print(f"JSON phase (parse + checks to columns): {json_s:.2f} s = {n / json_s:,.0f} dialogs/s")
    print(f"image checks + hashing on {args.workers} processes: {out.seconds['images']:.1f} s")
    print(f"clean total: {clean_s:.1f} s; Lance writes (row building + merges): {out.seconds['write']:.1f} s")
    print(f"whole ingest: {total_s:.1f} s  (target <= 300 s)")
    print(f"peak RSS: {peak_rss_gib():.2f} GiB  (target < 4 GiB)")
    print(f"load average before the run: {load_before:.2f}, after it: {os.getloadavg()[0]:.2f} "
          f"(1 min, {os.cpu_count()} cores)")
    print(f"command: python benchmarks/ingest_bench.py --dialogs {args.dialogs} --workers {args.workers}")


if __name__ == "__main__":
    main()
