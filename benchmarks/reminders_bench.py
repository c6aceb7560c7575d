"""Reminders client benchmark: the real flow (Prefect shards, the host's concurrency limit, the
official ollama client, journals, Lance) against a loopback Ollama-protocol server that serves
8 generations at once with a fixed 50 ms latency, i.e. 160 req/s at most.

Prints, against the issue's targets and a baseline measured in the same run:
- sustained throughput of the flow over N prompts (target >= 90% of 160 req/s), next to the bare
  official client with as many requests in flight (the baseline: what the server gives any client);
  the flow keeps 12 in flight by default (``--in-flight``): with exactly 8, every slot idles for a
  client round trip between generations (client or flow alike);
- client-side overhead per request: client CPU per call for the whole flow (Prefect, cache,
  Lance included; the server runs in its own process) next to the bare client's, and the
  observed latency above the server's 50 ms;
- a fully cached re-run over M prompts (target <= 60 s).

    python benchmarks/reminders_bench.py                                # 5,000 live, 50,000 cached
    python benchmarks/reminders_bench.py --prompts 500 --cached 2000    # quicker
    python benchmarks/reminders_bench.py --hosts 8,4 --prompts 2000     # several hosts (issue 20)
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow as pa
from PIL import Image, ImageDraw

from schemas.ingest import DIALOGS, IMAGES, TURNS
from schemas.reminders import RemindersConfig
from storage.lance import connect, merge

COLORS = ("red", "green", "blue", "yellow", "white", "black")
SHAPES = ("circle", "square", "triangle")


def synthetic_root(root: Path, n: int, image_kb: int) -> None:
    """``n`` dialogs of 10 turns; every dialog points at one JPEG (the image does not change the
    client's work per request, only the payload size, which ``--image-kb`` sets)."""
    if root.exists():
        shutil.rmtree(root)
    (root / "images").mkdir(parents=True)
    img = Image.new("RGB", (640, 480), (128, 128, 128))
    d = ImageDraw.Draw(img)
    for i in range(60):
        x, y = i * 9 % 600, i * 13 % 440
        d.ellipse((x, y, x + 40, y + 40), fill=(i * 4 % 255, 90, 200))
    quality, data = 95, b""
    while quality > 5:
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=quality)
        data = buf.getvalue()
        if len(data) <= image_kb * 1024:
            break
        quality -= 10
    (root / "images" / "scene.jpg").write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    ids = list(range(1, n + 1))
    db = connect(root / "lance")
    merge(db, "images", pa.Table.from_pylist([
        {"image_id": i, "split": "train", "path": "scene.jpg", "width": 640, "height": 480, "mode": "RGB",
         "num_bytes": len(data), "sha256": sha, "root": str(root / "images")} for i in ids],
        schema=IMAGES.schema))
    merge(db, "dialogs", pa.Table.from_pylist([
        {"image_id": i, "split": "train", "caption": f"scene {i}", "caption_hash": f"{i:032x}",
         "source": "bench"}
        for i in ids], schema=DIALOGS.schema))
    turns = [{"image_id": i, "turn": t, "split": "train",
              "question": f"is there a {COLORS[(i + t) % 6]} {SHAPES[(i * t) % 3]} near item {i}",
              "answer": f"yes, {t} of them" if (i + t) % 2 else "no", "gt_index": 0, "text_hash": f"{i}-{t}"}
             for i in ids for t in range(1, 11)]
    merge(db, "turns", pa.Table.from_pylist(turns, schema=TURNS.schema), update=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(latency_ms: float, parallel: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "cli.main", "llm", "serve", "--teacher", "--port", str(port),
           "--latency-ms", str(latency_ms), "--parallel", str(parallel)]
    proc = subprocess.Popen(cmd, cwd=Path(__file__).resolve().parents[1], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc, url
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not start")


async def bare_client(url: str, requests, in_flight: int) -> float:
    """Baseline: the official client alone, ``in_flight`` requests at a time; returns req/s."""
    import ollama

    client = ollama.AsyncClient(host=url)
    queue = list(requests)

    async def worker():
        while queue:
            req = queue.pop()
            await client.chat(model=req.model, messages=req.wire_messages(), options=req.options)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    return len(requests) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=5000, help="live prompts (issue: 5,000)")
    ap.add_argument("--cached", type=int, default=50_000,
                    help="prompts of the fully cached re-run (issue: 50,000)")
    ap.add_argument("--latency-ms", type=float, default=50.0)
    ap.add_argument("--parallel", type=int, default=8, help="generations the server runs at once")
    ap.add_argument("--in-flight", type=int, default=None,
                    help="requests the client keeps in flight (the flow's concurrency); default 1.5 x "
                    "--parallel: the server queues the extra ones, so no slot idles for a round trip")
    ap.add_argument("--shard-size", type=int, default=512)
    ap.add_argument("--image-kb", type=int, default=48, help="JPEG size sent with every request")
    ap.add_argument("--baseline", type=int, default=1000, help="requests for the bare-client baseline")
    ap.add_argument("--work", type=Path, default=Path("/tmp/mmem-bench/reminders"))
    ap.add_argument("--hosts", default=None,
                    help="multi-host mode (benchmarks/reminders_multihost.py): each server's parallel "
                    "generations, e.g. 8,4; --in-flight is then each host's slots (default 4 x the most)")
    args = ap.parse_args()
    in_flight = args.in_flight or args.parallel * 3 // 2
    print("command:", " ".join([Path(sys.executable).name, *sys.argv]), flush=True)
    if args.hosts:
        from reminders_multihost import report, run_multihost

        report(run_multihost(args, start_server, synthetic_root))
        return

    from prefect.testing.utilities import prefect_test_harness

    from flows.reminders import reminders_flow
    from llmcalls.cache import Journal, ResponseCache
    from llmcalls.requests import OK, LLMRequest, LLMResult
    from llmcalls.server import teacher_response
    from reminders.prompts import build_prompts, load_inputs

    capacity = args.parallel / (args.latency_ms / 1000)
    root = args.work / "root"
    t = time.perf_counter()
    synthetic_root(root, max(args.prompts, args.cached), args.image_kb)
    print(f"synthetic tables: {max(args.prompts, args.cached)} dialogs in {time.perf_counter() - t:.1f} s",
          flush=True)
    proc, url = start_server(args.latency_ms, args.parallel)
    results: dict = {"server_capacity_req_s": capacity}
    try:
        with prefect_test_harness(server_startup_timeout=180):
            config = RemindersConfig(data_root=root, ollama_host=url, model="mmem-teacher",
                                     limit=args.prompts, concurrency=in_flight, shard_size=args.shard_size,
                                     shard_retries=0)
            prompts, _ = build_prompts(config, *load_inputs(config.lance_uri))
            base_reqs = [LLMRequest(r.request.model, r.request.messages, {**r.request.options, "seed": 999})
                         for r in prompts[: args.baseline]]
            results["in_flight"] = in_flight
            cpu0 = time.process_time()
            bare = asyncio.run(bare_client(url, base_reqs, in_flight))
            results["baseline_bare_client_req_s"] = round(bare, 1)
            results["baseline_bare_client_cpu_ms_per_request"] = round(
                1000 * (time.process_time() - cpu0) / max(1, len(base_reqs)), 2)
            print(f"baseline (bare official client, {in_flight} in flight): "
                  f"{results['baseline_bare_client_req_s']} req/s", flush=True)

            cpu0, t0 = time.process_time(), time.perf_counter()
            live = reminders_flow(config)
            wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
            results.update({
                "live_prompts": live.prompts, "live_calls": live.calls,
                "live_req_s_generation": live.requests_per_s,
                "live_req_s_whole_flow": round(live.calls / wall, 1),
                "live_fraction_of_capacity": round(live.requests_per_s / capacity, 3),
                "client_cpu_ms_per_request": round(1000 * cpu / max(1, live.calls), 2),
                "flow_fraction_of_bare_client": round(live.requests_per_s / bare, 3),
                "latency_p50_ms": round(1000 * live.latency_p50_s, 1),
                "latency_p95_ms": round(1000 * live.latency_p95_s, 1),
                "client_overhead_ms_p50_over_server": round(1000 * live.latency_p50_s - args.latency_ms, 1),
                "live_flow_wall_s": round(wall, 1),
                "load_average_1m": round(os.getloadavg()[0], 2),
                "host": {k: (live.hosts.get(url) or {}).get(k) for k in ("concurrency", "peak_concurrency")},
            })
            print(json.dumps(results, indent=1), flush=True)

            if args.cached:
                # fill the cache for the rest (a cached re-run must not depend on how the rows got there)
                big = config.model_copy(update={"limit": args.cached})
                prompts, _ = build_prompts(big, *load_inputs(big.lance_uri))
                cache = ResponseCache(big.lance_uri, big.cache_dir / "llm_journal")
                have = cache.lookup([p.request.request_hash for p in prompts])
                path = cache.journal_path("bench-fill", 0)
                with Journal(path) as journal:  # signed with the data root's key, as the flow's own are
                    for p in prompts:
                        if p.request.request_hash not in have:
                            answer = LLMResult(p.request.request_hash, OK, teacher_response(p.conversation),
                                               attempts=1, backend="teacher")
                            journal.append(answer.row(p.request, url))
                cache.merge(path)
                t0 = time.perf_counter()
                cached = reminders_flow(big)
                results.update({"cached_prompts": cached.prompts, "cached_calls": cached.calls,
                                "cached_rerun_s": round(time.perf_counter() - t0, 1)})
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    ok_live = results["live_fraction_of_capacity"] >= 0.9
    ok_cached = results.get("cached_calls") == 0 and results.get("cached_rerun_s", 1e9) <= 60
    print(json.dumps(results, indent=1))
    print(f"throughput {results['live_req_s_generation']} req/s = "
          f"{100 * results['live_fraction_of_capacity']:.1f}% of {capacity:.0f} (target >= 90%): "
          f"{'PASS' if ok_live else 'FAIL'}; "
          f"{100 * results['flow_fraction_of_bare_client']:.0f}% of the bare client's "
          f"{results['baseline_bare_client_req_s']} req/s in the same run")
    if args.cached:
        print(f"cached re-run of {results['cached_prompts']} prompts: {results['cached_rerun_s']} s, "
              f"{results['cached_calls']} calls (target <= 60 s, 0 calls): {'PASS' if ok_cached else 'FAIL'}")


if __name__ == "__main__":
    main()
