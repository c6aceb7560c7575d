"""Which model answers a variant: a served model (Ollama protocol), a local checkpoint, a versioned
artifact, a tiny random-weight model, or one this run serves itself on a loopback port.

``ResolvedModel.request_model`` is hashed into every cache key, so a checkpoint is named by its
content, not by its folder; ``version`` is what the ``model_artifact`` column records.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from llmcalls.auth import HostAuth
from llmcalls.requests import full_name
from schemas.config import Trusted
from schemas.evaluate import EvaluateConfig, Variant
from storage.artifacts import ArtifactError, ArtifactStore, file_hashes, fingerprint

log = logging.getLogger("mmem." + __name__)

TINY_PREFIX = "tiny:"


class VariantUnavailable(LookupError):
    """A variant's model or artifact does not exist (skipped when the variant is not required)."""


@dataclass(frozen=True)
class ResolvedModel:
    """What a variant's requests go to: ``request_model`` is hashed into every cache key."""

    request_model: str
    path: Path | None = None  # a local checkpoint folder (hf, or served by the flow)
    artifact: str | None = None  # name:vN of the artifact store
    host: str | None = None
    label: str = ""  # what the ``model`` column records
    private: bool = False  # served by this flow run alone (a loopback server it started)
    version: str | None = None  # what ``model_artifact`` records: the artifact ref, else the checkpoint's
    # content fingerprint (as in ``request_model``), else the served model's digest (:func:`served_version`)


def resolve_model(config: EvaluateConfig, variant: Variant) -> ResolvedModel:
    """The checkpoint/artifact/served model of ``variant``; raises :class:`VariantUnavailable`."""
    artifact, path = None, None
    if variant.artifact:
        try:
            version = config.artifact_versions.get(variant.artifact) or variant.artifact_version or "latest"
            art = ArtifactStore(config.artifacts_dir).get(variant.artifact, version)
        except ArtifactError as exc:
            raise VariantUnavailable(f"variant {variant.name}: {exc}") from None
        artifact, path = art.ref, art.path
    if variant.model and variant.model.startswith(TINY_PREFIX):
        path = tiny_checkpoint(config, variant.model[len(TINY_PREFIX):])
    elif variant.model and (variant.backend != "ollama" or variant.serve == "checkpoint"):
        path = Path(variant.model) if Path(variant.model).is_absolute() else config.data_root / variant.model
    if path is not None and not path.exists():
        raise VariantUnavailable(f"variant {variant.name}: no checkpoint at {path}")
    if variant.backend != "ollama":  # keyed on the checkpoint's content, not on its folder's name
        fp = fingerprint({k: v["sha256"] for k, v in file_hashes(path).items() if k != "manifest.json"})
        name = artifact or path.name
        return ResolvedModel(f"{variant.backend}:{name}@{fp[:12]}", path, artifact, label=str(path),
                             version=artifact or f"{path.name}@{fp[:12]}")
    host = variant.host or config.host
    trusted = Trusted.current()
    if trusted is not None and variant.serve is None:  # a variants file may name any host: the same check
        trusted.check_host(f"variants ({variant.name}.host)", host)
    return ResolvedModel(variant.model, path, artifact, host, label=f"{variant.model} @ {host}",
                         version=artifact)


def served_version(config: EvaluateConfig, model: ResolvedModel, auth: HostAuth) -> ResolvedModel:
    """``model`` with ``version`` set to the served model's digest (``name@sha256:...``, from the
    server's ``/api/tags`` through the official client) when no artifact names it already. A server
    that does not answer leaves it unset, with a warning: the answers may all come from the cache."""
    if model.version or not model.host:
        return model
    import httpx
    import ollama

    header = None if model.private else auth.header(model.host)  # only the host it is bound to
    headers = {"Authorization": header.get_secret_value()} if header is not None else None
    try:
        listed = ollama.Client(host=model.host, timeout=min(30.0, config.timeout_s), headers=headers).list()
    except (ConnectionError, httpx.HTTPError, ollama.ResponseError) as exc:
        log.warning("no digest for %s: the server at %s does not answer (%s)", model.request_model,
                    model.host, exc)
        return model
    want = full_name(model.request_model)
    digest = next((m.digest for m in listed.models if m.model and full_name(m.model) == want and m.digest),
                  None)
    if digest is None:
        log.warning("no digest for %s: the server at %s does not list it", want, model.host)
        return model
    return dataclasses.replace(model, version=f"{want}@sha256:{digest.removeprefix('sha256:')}")


def tiny_checkpoint(config: EvaluateConfig, kind: str) -> Path:
    """A tiny random-weight model of a real architecture, built once under the cache (demo, tests)."""
    folder = config.cache_dir / "tiny" / f"{kind}-seed0"
    if not (folder / "config.json").is_file():
        if kind == "llama":
            from training.tiny_llama import tiny_llama as build
        elif kind == "gemma3":
            from training.tiny_models import tiny_gemma3 as build
        else:
            raise VariantUnavailable(f"unknown tiny model {kind!r} (known: tiny:llama, tiny:gemma3)")
        build(folder, seed=0)
    return folder


@contextlib.contextmanager
def served(config: EvaluateConfig, variant: Variant, model: ResolvedModel) -> Iterator[ResolvedModel]:
    """For ``serve = ...`` variants: the model behind ``mmem llm serve``'s server on a loopback port."""
    if variant.serve is None:
        yield model
        return
    from embed.device import resolve_device
    from llmcalls.server import make_state, running_server

    if variant.serve == "teacher":
        state = make_state(teacher=True, name=variant.model)
    else:
        state = make_state(model.path, name=variant.model, device=str(resolve_device(config.device)))
    with running_server(state) as url:
        # the label names what answered, not the port it happened to get (rows compare equal across runs)
        yield ResolvedModel(model.request_model, model.path, model.artifact, url,
                            f"{variant.model} (served by the flow: {variant.serve})", private=True,
                            version=model.version)
