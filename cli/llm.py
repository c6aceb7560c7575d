"""``mmem llm serve``: the local Ollama-protocol server (a checkpoint, or the teacher stand-in)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.common import fail

ORIGINS_ENV = "MMEM_LLM_ORIGINS"


def register(app: typer.Typer) -> None:
    group = typer.Typer(no_args_is_help=True, help="Local LLM serving over the Ollama HTTP API.")
    group.command("serve")(serve)
    app.add_typer(group, name="llm")


def serve(
    model: Annotated[Path | None, typer.Option(
        help="A Hugging Face checkpoint or PEFT adapter folder.")] = None,
    teacher: Annotated[bool, typer.Option(
        help="Serve the deterministic <reminder> teacher (not an LLM).")] = False,
    name: Annotated[str | None, typer.Option(
        help="Served model name (default: folder name, or mmem-teacher).")] = None,
    host: Annotated[str, typer.Option(help="Interface to bind; 127.0.0.1 keeps it local.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(
        min=0, max=65535, help="Port (Ollama's default 11434; 0: any free one).")] = 11434,
    device: Annotated[str, typer.Option(help="torch device for a checkpoint.")] = "cpu",
    latency_ms: Annotated[float, typer.Option(
        min=0, max=3_600_000, help="Minimum latency per generation (benchmarks).")] = 0.0,
    parallel: Annotated[int, typer.Option(
        min=1, max=4096, help="With --latency-ms: generations served at once.")] = 1,
    fault_error: Annotated[float, typer.Option(min=0, max=1, help="Fault mode: rate of HTTP 500s.")] = 0.0,
    fault_stall: Annotated[float, typer.Option(
        min=0, max=1, help="Fault mode: rate of stalls (--stall-s).")] = 0.0,
    fault_drop: Annotated[float, typer.Option(
        min=0, max=1, help="Fault mode: rate of dropped connections.")] = 0.0,
    fault_untagged: Annotated[float, typer.Option(
        min=0, max=1, help="Fault mode: rate of answers without the tag.")] = 0.0,
    stall_s: Annotated[float, typer.Option(min=0, max=3600, help="How long a stall lasts.")] = 30.0,
    seed: Annotated[int, typer.Option(help="Seed of the fault draws.")] = 0,
    require_auth: Annotated[bool, typer.Option(
        help="Answer 401 unless a request carries the Authorization header held in $MMEM_OLLAMA_AUTH "
        "(e.g. 'Bearer <token>'; read from the environment, never from the command line).")] = False,
    origin: Annotated[list[str] | None, typer.Option(
        help=f"A web origin whose pages may call the server, besides localhost ones (repeatable; "
        f"* wildcards, e.g. 'https://app.example.org'; also ${ORIGINS_ENV}, comma-separated, like "
        "OLLAMA_ORIGINS). "
        "Its host name is also accepted in the Host header.")] = None,
    max_body_mb: Annotated[float, typer.Option(
        min=0.001, max=1024, help="Request bodies past this get 413.")] = 8.0,
    read_timeout_s: Annotated[float, typer.Option(
        min=0.05, max=3600,
        help="Time a client has to send its headers, then its body (else dropped / 408).")] = 20.0,
    max_requests: Annotated[int, typer.Option(
        min=1, max=100_000, help="Requests in flight (reading, queued, generating); 503 past it.")] = 64,
    max_ctx: Annotated[int, typer.Option(
        min=16, max=1_048_576,
        help="Upper bound of a request's num_ctx (the prompt is cut to fit, keeping its end).")] = 8192,
    max_predict: Annotated[int, typer.Option(
        min=1, max=1_048_576, help="Upper bound of a request's num_predict.")] = 1024,
) -> None:
    """Serve /api/chat, /api/generate, /api/tags, /api/show, /api/ps, /api/version until Ctrl-C.

    Safe by default on a shared machine: bound to 127.0.0.1, requests naming a foreign Host or sent
    by a foreign Origin get 403, bodies are capped (413), slow clients are dropped, and past
    --max-requests the answer is 503."""
    import os

    from llmcalls.auth import AUTH_ENV
    from llmcalls.server import Faults, Limits, MiB, make_state
    from llmcalls.server import serve as run

    auth = os.environ.get(AUTH_ENV, "").strip() or None
    if require_auth and auth is None:
        fail(f"--require-auth: export {AUTH_ENV} with the header value clients must send "
             "(e.g. 'Bearer <token>')")
    from_env = [o.strip() for o in os.environ.get(ORIGINS_ENV, "").split(",") if o.strip()]
    origins = from_env + list(origin or [])
    for o in origins:
        if o != "*" and "://" not in o:
            fail(f"--origin {o!r}: give a web origin such as 'https://app.example.org' "
                 "(scheme://host[:port])")

    faults = Faults(error_rate=fault_error, stall_rate=fault_stall, drop_rate=fault_drop,
                    untagged_rate=fault_untagged, stall_s=stall_s, seed=seed)
    limits = Limits(max_body_bytes=int(max_body_mb * MiB), read_timeout_s=read_timeout_s,
                    max_requests=max_requests, max_ctx=max_ctx, max_predict=max_predict,
                    default_ctx=min(Limits.default_ctx, max_ctx),
                    default_predict=min(Limits.default_predict, max_predict), origins=tuple(origins))
    try:
        state = make_state(model, teacher=teacher, name=name, device=device, latency_s=latency_ms / 1000,
                           parallel=parallel, faults=faults, auth=auth if require_auth else None,
                           limits=limits)
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    run(state, host=host, port=port)
