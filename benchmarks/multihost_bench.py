"""Many LLM hosts as one (issue 20): the host pool against loopback Ollama-protocol servers of
unequal capacity, with no capacity configured.

Two stand-in hosts (``benchmarks/slot_server.py``, each its own process): A serves 8 generations
at once, B 4, both at the same fixed latency (50 ms: 160 + 80 = 240 requests/s at most). Every
request goes through the official ``ollama`` AsyncClient, one per host, as the reminders stage
sends them. Prints, against the issue's targets:

- the baseline, in the same run: the best single host (A) alone through the pool, next to the
  bare client keeping a fixed ``slots + 4`` requests in flight on it (what the server gives any
  client here);
- the pool over A and B: throughput against the summed capacity (target >= 90%) and against the
  best single host (target >= 1.4x), with each host's share, p50/p95 and learned concurrency
  (whole run, and steady: between the 10% and the 90% answered, without the ramp and the drain);
- failover: B is killed when 40% of the requests are answered (and started again at 70%, so its
  probe brings it back): requests lost (target 0) and answered twice (target 0).

    python benchmarks/multihost_bench.py                 # 2,400 requests per run, ~1 minute
    python benchmarks/multihost_bench.py --requests 800  # quicker
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import ollama

from llmcalls.hosts import HostPool

MODEL = "gemma3:27b"


class Server:
    """One slot server in its own process (so that it does not share the client's event loop)."""

    def __init__(self, slots: int, latency_ms: float) -> None:
        self.slots, self.latency_ms, self.port = slots, latency_ms, 0
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def start(self) -> str:
        cmd = [sys.executable, str(ROOT / "benchmarks" / "slot_server.py"), "--slots", str(self.slots),
               "--latency-ms", str(self.latency_ms), "--port", str(self.port), "--model", MODEL]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.url = self.proc.stdout.readline().strip()
        if not self.url.startswith("http://"):
            raise RuntimeError(f"the slot server did not start: {self.url!r}")
        self.port = int(self.url.rsplit(":", 1)[1])
        return self.url

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    @property
    def capacity(self) -> float:
        return self.slots / (self.latency_ms / 1000)


def messages(i: int) -> list[dict]:
    return [{"role": "user", "content": f"request {i}"}]


def connect(url: str) -> ollama.AsyncClient:
    return ollama.AsyncClient(host=url, timeout=30)


async def ask(host, i: int) -> str:
    resp = await host.client.chat(model=MODEL, messages=messages(i), stream=False)
    return resp.message.content


async def bare(url: str, n: int, in_flight: int) -> float:
    """The official client alone on one host, ``in_flight`` at a time; returns requests/s."""
    client, todo = connect(url), list(range(n))

    async def worker() -> None:
        while todo:
            i = todo.pop()
            await client.chat(model=MODEL, messages=messages(i), stream=False)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    rate = n / (time.perf_counter() - t0)
    await client._client.aclose()
    return rate


async def pooled(urls: list[str], n: int, on_progress=None) -> dict:
    """``n`` requests through a pool over ``urls``; throughput, answers per request, host figures."""
    answers: Counter[int] = Counter()
    wrong = 0
    async with HostPool(urls, connect=connect, probe_s=0.2, probe_max_s=1.0, log_every_s=0) as pool:
        t0, times = time.perf_counter(), []
        async for i, text in pool.map(range(n), ask):
            answers[i] += 1
            times.append(time.perf_counter() - t0)
            wrong += text != f"answer to: request {i}"
            if on_progress is not None:
                on_progress(len(times) / n)
        wall = time.perf_counter() - t0
        hosts = pool.summary()
    lo, hi = n // 10, n * 9 // 10  # steady: without the first round trips and the drain
    return {
        "requests": n,
        "wall_s": round(wall, 2),
        "req_per_s": round(n / wall, 1),
        "steady_req_per_s": round((hi - lo) / (times[hi] - times[lo]), 1),
        "lost": sum(1 for i in range(n) if answers[i] == 0),
        "duplicated": sum(c - 1 for c in answers.values() if c > 1),
        "wrong_answers": wrong,
        "hosts": hosts,
    }


def host_lines(hosts: dict) -> dict:
    keep = ("ok", "errors", "downs", "p50_ms", "p95_ms", "concurrency", "peak_concurrency")
    return {url: {k: (round(v, 1) if isinstance(v, float) else v) for k, v in s.items() if k in keep}
            for url, s in hosts.items()}


async def run(args: argparse.Namespace) -> dict:
    a, b = Server(args.slots_a, args.latency_ms), Server(args.slots_b, args.latency_ms)
    try:
        a.start(), b.start()
        await asyncio.sleep(0.3)
        summed = a.capacity + b.capacity
        bare_a = await bare(a.url, args.requests * 2 // 3, args.slots_a + 4)
        single = await pooled([a.url], args.requests * 2 // 3)
        both = await pooled([a.url, b.url], args.requests)

        state = {"killed": False, "revived": False}

        def progress(frac: float) -> None:
            if frac >= 0.4 and not state["killed"]:
                state["killed"] = True
                b.kill()
            elif frac >= 0.7 and not state["revived"]:
                state["revived"] = True
                b.start()  # same port: the pool's probe finds it again

        failover = await pooled([a.url, b.url], args.requests, progress)
    finally:
        a.kill(), b.kill()
    best = max(single["req_per_s"], 1e-9)
    b_after = failover["hosts"][b.url]
    return {
        "servers": {
            "A": f"{args.slots_a} slots",
            "B": f"{args.slots_b} slots",
            "latency_ms": args.latency_ms,
            "summed_capacity_req_per_s": summed,
        },
        "baseline_best_single_host": {
            "pool_over_A_alone_req_per_s": single["req_per_s"],
            "steady_req_per_s": single["steady_req_per_s"],
            "bare_client_on_A_req_per_s": round(bare_a, 1),
            "of_A_capacity": round(single["req_per_s"] / a.capacity, 3),
        },
        "pool_over_A_and_B": {
            "req_per_s": both["req_per_s"],
            "of_summed_capacity": round(both["req_per_s"] / summed, 3),
            "steady_req_per_s": both["steady_req_per_s"],
            "steady_of_summed_capacity": round(both["steady_req_per_s"] / summed, 3),
            "target_of_summed_capacity": 0.9,
            "vs_best_single_host": round(both["req_per_s"] / best, 2),
            "target_vs_best": 1.4,
            "lost": both["lost"],
            "duplicated": both["duplicated"],
            "hosts": host_lines(both["hosts"]),
        },
        "failover_B_killed_at_40pct_restarted_at_70pct": {
            "req_per_s": failover["req_per_s"],
            "lost": failover["lost"],
            "duplicated": failover["duplicated"],
            "wrong_answers": failover["wrong_answers"],
            "B_taken_out": b_after["downs"],
            "hosts": host_lines(failover["hosts"]),
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=2400, help="requests per pool run (the baseline: 2/3)")
    ap.add_argument("--slots-a", type=int, default=8)
    ap.add_argument("--slots-b", type=int, default=4)
    ap.add_argument("--latency-ms", type=float, default=50.0)
    args = ap.parse_args()
    t0 = time.perf_counter()
    out = asyncio.run(run(args))
    out["bench_wall_s"] = round(time.perf_counter() - t0, 1)
    out["cpus"] = os.cpu_count()
    out["load_average_1m"] = round(os.getloadavg()[0], 1)
    print(json.dumps(out, indent=2))
    print("reproduce: python " + shlex.join(["benchmarks/multihost_bench.py", *sys.argv[1:]]))


if __name__ == "__main__":
    main()
