"""The multi-host mode of ``benchmarks/reminders_bench.py`` (issue 20): the real reminders flow
spread over several local Ollama-protocol servers of unequal capacity, with no capacity given.

Each server (``mmem llm serve --teacher``, its own process) runs ``parallel`` generations at once
at the same latency. Three runs of the flow over the same prompts (each with its own seed, so no
run is answered from another's cache), in one Prefect test server:

1. the best single host alone (the baseline, in the same run);
2. all hosts: throughput against the summed capacity (target >= 90% with 2 hosts) and against
   the baseline (target >= 1.4x when the second host has half the first's capacity), with each
   host's share, p50/p95 and learned concurrency from the run's summary;
3. all hosts, the last one killed (SIGKILL) 40% of the way through: every prompt must end
   answered once or quarantined (requests lost: 0), and no request answered twice.

And, in the same run, what this machine lets any client do over the same hosts (the servers share
its cores with the client): the bare official client with a fixed 1.5 x each host's slots in
flight (no pool, no flow), and the host pool alone (learned windows, no Prefect, no journal, no
cache). The flow's figure is also given against those ceilings.

    python benchmarks/reminders_bench.py --hosts 8,4 --prompts 2000
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections import Counter


async def bare_hosts(urls: list[str], in_flight: list[int], requests: list) -> float:
    """The official client alone, ``in_flight[i]`` requests at a time on ``urls[i]``; req/s."""
    import ollama

    queue = list(requests)

    async def worker(client) -> None:
        while queue:
            req = queue.pop()
            await client.chat(model=req.model, messages=req.wire_messages(), options=req.options)

    clients = [ollama.AsyncClient(host=u) for u in urls]
    t0 = time.perf_counter()
    await asyncio.gather(*(worker(c) for c, n in zip(clients, in_flight, strict=True) for _ in range(n)))
    return len(requests) / (time.perf_counter() - t0)


async def pool_hosts(urls: list[str], requests: list) -> float:
    """The host pool alone (what the flow's shards use, without Prefect, journal or cache); req/s."""
    from llmcalls.auth import HostAuth
    from llmcalls.client import LLMClient
    from llmcalls.hosts import HostPool

    async with HostPool(urls, connect=lambda u: LLMClient(u, max_attempts=1, auth=HostAuth()),
                        log_every_s=0) as pool:
        t0 = time.perf_counter()
        async for _ in pool.map(requests, lambda host, req: host.client.ask(req)):
            pass
        return len(requests) / (time.perf_counter() - t0)


def ceilings(urls: list[str], parallel: list[int], requests: list) -> dict:
    """Both ceilings over ``requests`` (each its own copy: none is answered from a cache), with
    the client's CPU per call."""
    out = {}
    for name, run in (("bare_client", lambda: bare_hosts(urls, [p * 3 // 2 for p in parallel], requests)),
                      ("host_pool", lambda: pool_hosts(urls, requests))):
        c0 = time.process_time()
        rate = asyncio.run(run())
        out[name] = {"req_s": round(rate, 1), "client_cpu_ms_per_call":
                     round(1000 * (time.process_time() - c0) / len(requests), 2)}
    return out


def run_multihost(args, start_server, synthetic_root) -> dict:
    """The three runs; ``start_server(latency_ms, parallel) -> (process, url)`` and
    ``synthetic_root(root, n, image_kb)`` come from reminders_bench."""
    from prefect.testing.utilities import prefect_test_harness

    from flows.reminders import reminders_flow
    from schemas.reminders import RemindersConfig
    from storage.lance import connect, read

    parallel = [int(p) for p in args.hosts.split(",")]
    capacity = [p / (args.latency_ms / 1000) for p in parallel]
    root = args.work / "multihost"
    synthetic_root(root, args.prompts, args.image_kb)
    servers = [start_server(args.latency_ms, p) for p in parallel]
    urls = [url for _, url in servers]
    best = max(range(len(parallel)), key=lambda i: parallel[i])
    # each host's slots (the flow runs two shards at once, each with half): room above any capacity
    per_host = args.in_flight or 4 * max(parallel)
    hosts = zip(urls, parallel, capacity, strict=True)
    out: dict = {"hosts": {u: {"parallel": p, "capacity_req_s": c} for u, p, c in hosts},
                 "summed_capacity_req_s": sum(capacity), "latency_ms": args.latency_ms,
                 "prompts_per_run": args.prompts, "slots_per_host": per_host}

    def config(hosts: list[str], seed: int) -> RemindersConfig:
        return RemindersConfig(data_root=root, ollama_host=hosts if len(hosts) > 1 else hosts[0],
                               model="mmem-teacher", limit=args.prompts, concurrency=per_host,
                               shard_size=args.shard_size, shard_retries=0, seed=seed, timeout_s=30)

    def figures(result, wall: float, cpu: float) -> dict:
        hosts = {u: {k: h.get(k) for k in ("ok", "errors", "downs", "p50_s", "p95_s", "concurrency",
                                           "peak_concurrency")} for u, h in result.hosts.items()}
        return {"req_s": result.requests_per_s, "flow_wall_s": round(wall, 1), "calls": result.calls,
                "client_cpu_ms_per_call": round(1000 * cpu / max(1, result.calls), 2),
                "retries": result.retries, "failures": result.failures, "valid": result.valid,
                "quarantined": result.quarantined, "hosts": hosts}

    def requests_of(cfg: RemindersConfig) -> list:
        from reminders.prompts import build_prompts, load_inputs

        return [p.request for p in build_prompts(cfg, *load_inputs(cfg.lance_uri))[0]]

    def answered(seed: int) -> Counter:
        """Rows of ``llm_responses`` per request of the run with ``seed`` (options carry the seed)."""
        rows = read(connect(root / "lance"), "llm_responses").to_pylist()
        return Counter(r["request_hash"] for r in rows if (r.get("options") or {}).get("seed") == seed)

    try:
        with prefect_test_harness(server_startup_timeout=180):
            t0, c0 = time.perf_counter(), time.process_time()
            single = reminders_flow(config([urls[best]], 101))
            out["baseline_best_single_host"] = figures(single, time.perf_counter() - t0,
                                                       time.process_time() - c0)
            t0, c0 = time.perf_counter(), time.process_time()
            both = reminders_flow(config(urls, 102))
            wall = time.perf_counter() - t0
            out["all_hosts"] = figures(both, wall, time.process_time() - c0)
            out["all_hosts"]["of_summed_capacity"] = round(both.requests_per_s / sum(capacity), 3)
            out["all_hosts"]["vs_best_single_host"] = round(both.requests_per_s / single.requests_per_s, 2)
            out["load_average_1m_after_all_hosts"] = round(os.getloadavg()[0], 2)
            out["ceilings"] = ceilings(urls, parallel, requests_of(config(urls, 104)))
            for name, ceiling in out["ceilings"].items():
                ceiling["of_summed_capacity"] = round(ceiling["req_s"] / sum(capacity), 3)
                out["all_hosts"][f"of_{name}"] = round(both.requests_per_s / ceiling["req_s"], 3)
            print(json.dumps(out, indent=1), flush=True)

            victim = servers[-1][0]
            gen_s = args.prompts / max(both.requests_per_s, 1e-9)  # the generating part of a run
            killer = threading.Timer(max(0.5, wall - gen_s) + 0.4 * gen_s, victim.kill)
            killer.start()
            t0, c0 = time.perf_counter(), time.process_time()
            failover = reminders_flow(config(urls, 103))
            killer.cancel()
            out["failover"] = figures(failover, time.perf_counter() - t0, time.process_time() - c0)
            per_request = answered(103)
            out["failover"].update({
                "killed": urls[-1], "killed_before_the_end": victim.poll() is not None,
                "lost": failover.prompts - failover.valid - failover.quarantined,
                "answered_twice": sum(n - 1 for n in per_request.values() if n > 1),
                "asked": failover.calls, "answers_cached": len(per_request)})
    finally:
        for proc, _ in servers:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=10)
    return out


def report(out: dict) -> None:
    both, fail = out["all_hosts"], out["failover"]
    print(json.dumps(out, indent=1))
    ok_sum, ok_best = both["of_summed_capacity"] >= 0.9, both["vs_best_single_host"] >= 1.4
    ok_fail = fail["lost"] == 0 and fail["answered_twice"] == 0 and fail["failures"] == 0
    verdict = {True: "PASS", False: "FAIL"}
    print(f"all hosts: {both['req_s']} req/s = {100 * both['of_summed_capacity']:.1f}% of the summed "
          f"{out['summed_capacity_req_s']:.0f} (target >= 90%): {verdict[ok_sum]}; "
          f"{both['vs_best_single_host']}x the best single host's "
          f"{out['baseline_best_single_host']['req_s']} req/s (target >= 1.4x): {verdict[ok_best]}")
    ceil = out["ceilings"]
    print(f"same hosts, same run, no flow: bare official client {ceil['bare_client']['req_s']} req/s "
          f"({100 * ceil['bare_client']['of_summed_capacity']:.1f}%), host pool alone "
          f"{ceil['host_pool']['req_s']} req/s ({100 * ceil['host_pool']['of_summed_capacity']:.1f}%): "
          f"the flow is {100 * both['of_bare_client']:.1f}% / {100 * both['of_host_pool']:.1f}% of them")
    print(f"failover ({fail['killed']} killed midway: {fail['killed_before_the_end']}): lost {fail['lost']}, "
          f"answered twice {fail['answered_twice']}, failures {fail['failures']}: {verdict[ok_fail]}")


