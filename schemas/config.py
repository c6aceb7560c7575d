"""One configuration system for every flow.

Each flow takes one pydantic-settings model as its parameter, so the Prefect UI renders it as a
form and validates it. Values come from, lowest to highest priority: the field defaults, the
flow's section of a TOML profile (``[embed]`` ...; top-level keys apply to every flow), ``MMEM_*``
environment variables (``MMEM_DATA_ROOT``, ``MMEM_EMBED_BATCH_SIZE`` ...), and explicit overrides
(the command line). Every path defaults under one data root.

A flow's parameters choose data, never trust. What decides where code runs or where a secret goes
(the data root, a Dask scheduler, an Ollama host and its token) is checked against the allow-list
of the process that runs the flow (:class:`Trusted`, the JSON in ``$MMEM_TRUSTED_SETTINGS``).
``mmem serve`` writes that allow-list from its own profile and environment (plus its
``--allow-*`` options) before it serves, so a run started through the API with another value is
refused when its parameters are validated, before any work, naming the parameter. A process
without the variable (the command line, a script) is the one that chose its values: nothing to check.
"""

from __future__ import annotations

import json
import os
import tomllib
import urllib.parse
from contextvars import ContextVar
from pathlib import Path
from typing import Any, ClassVar, Self

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, model_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, SettingsConfigDict

TRUSTED_ENV = "MMEM_TRUSTED_SETTINGS"
AUTH_ENV = "MMEM_OLLAMA_AUTH"  # an Authorization header value, e.g. "Bearer <token>"
AUTH_HOST_ENV = "MMEM_OLLAMA_AUTH_HOST"  # the one host $MMEM_OLLAMA_AUTH goes to (default: the config's host)
DEFAULT_OLLAMA_HOST = "http://127.0.0.1:11434"
CPU_COUNT = os.cpu_count() or 1
MAX_WORKERS = 4 * CPU_COUNT  # upper bound of every "processes/threads on this machine" parameter


# Set while a config that carries stage configs (the pipeline's) is validated: it checks them as a
# whole, as each stage will run (under its data root), not each part as built alone.
_AS_PART: ContextVar[bool] = ContextVar("mmem_config_as_part", default=False)


def check_as_a_whole(config_cls_handler, data: Any) -> Any:
    """Validate ``data`` with its parts' own checks suspended, then check the whole's trust scope."""
    token = _AS_PART.set(True)
    try:
        config = config_cls_handler(data)
    finally:
        _AS_PART.reset(token)
    trusted = Trusted.current()
    if trusted is not None and not _AS_PART.get():
        for c in config.trust_scope():
            trusted.check(c)
    return config


class UntrustedParameter(ValueError):
    """A run asked for a data root, scheduler, host or secret its serving process does not allow."""


def normalise_host(host: str) -> str:
    """One spelling per Ollama server (``127.0.0.1:11434`` = ``http://127.0.0.1:11434/``), so an
    allow-list and a per-host token compare hosts, not strings."""
    text = host.strip()
    url = urllib.parse.urlsplit(text if "://" in text else f"http://{text}")
    scheme = (url.scheme or "http").lower()
    name = (url.hostname or "").lower()
    try:
        port = url.port or (443 if scheme == "https" else 11434)
    except ValueError:
        raise ValueError(f"{host!r} is not a host[:port] or URL") from None
    if not name:
        raise ValueError(f"{host!r} names no host")
    name = f"[{name}]" if ":" in name else name
    return f"{scheme}://{name}:{port}{url.path.rstrip('/')}"


def normalise_root(path: str | Path) -> str:
    return str(Path(path).expanduser().resolve())


class Trusted(BaseModel):
    """What the process that runs flows allows a run's parameters to name.

    ``ollama_auth`` binds each Authorization source to one host (``block:<Secret block name>`` or
    ``env:MMEM_OLLAMA_AUTH``): a request to any other host carries no token.
    """

    model_config = ConfigDict(extra="forbid")

    data_roots: list[str] = Field(default_factory=list)
    dask_addresses: list[str] = Field(default_factory=list)
    ollama_hosts: list[str] = Field(default_factory=list)
    ollama_auth: dict[str, str] = Field(default_factory=dict)

    @classmethod
    def current(cls) -> Trusted | None:
        """The allow-list this process runs under, or None (a process that chose its own values)."""
        raw = os.environ.get(TRUSTED_ENV)
        return cls.model_validate_json(raw) if raw else None

    def export(self) -> None:
        """Make this the allow-list of this process and of every flow run it starts."""
        os.environ[TRUSTED_ENV] = self.model_dump_json()

    def merged(self, other: Trusted) -> Trusted:
        def union(a: list[str], b: list[str]) -> list[str]:
            return list(dict.fromkeys([*a, *b]))

        return Trusted(data_roots=union(self.data_roots, other.data_roots),
                       dask_addresses=union(self.dask_addresses, other.dask_addresses),
                       ollama_hosts=union(self.ollama_hosts, other.ollama_hosts),
                       ollama_auth={**other.ollama_auth, **self.ollama_auth})

    @classmethod
    def of(cls, *configs: StageConfig, data_roots=(), dask_addresses=(), ollama_hosts=()) -> Trusted:
        """The values ``configs`` (built by the trusted process itself) name, plus those given."""
        out = cls(data_roots=[normalise_root(p) for p in data_roots], dask_addresses=list(dask_addresses),
                  ollama_hosts=[normalise_host(h) for h in ollama_hosts])
        for config in configs:
            for c in config.trust_scope():
                out = out.merged(c.trusted_values())
                if isinstance(getattr(c, "host", None), str):  # an LLM config: where $MMEM_OLLAMA_AUTH goes
                    out = out.merged(Trusted(ollama_auth=env_binding(c.host)))
        return out

    def check_host(self, parameter: str, host: str) -> None:
        """Refuse an Ollama host named somewhere other than ``ollama_host`` (a variants file)."""
        if normalise_host(host) not in self.ollama_hosts:
            raise UntrustedParameter(
                f"run parameter {parameter} names Ollama host {normalise_host(host)!r}, which the process "
                f"that runs this flow does not allow (it allows {self.ollama_hosts or 'nothing else'}); "
                f"start `mmem serve` with --allow-ollama-host {host} to allow it"
            )

    def check(self, config: StageConfig) -> None:
        """Raise :class:`UntrustedParameter` naming the first parameter this allow-list refuses."""
        given = config.trusted_values()
        for field_name, value, allowed in (
            ("data_root", given.data_roots, self.data_roots),
            ("dask_address", given.dask_addresses, self.dask_addresses),
            ("ollama_host", given.ollama_hosts, self.ollama_hosts),
        ):
            for v in value:
                if v not in allowed:
                    raise UntrustedParameter(
                        f"run parameter {field_name}={v!r} is not allowed by the process that runs this "
                        f"flow (it allows {allowed or 'nothing else'}); start `mmem serve` with "
                        f"--allow-{field_name.replace('_', '-')} {v} (or name it in its profile) to allow it")
        for host, source in given.ollama_auth.items():
            if self.ollama_auth.get(host) != source:
                raise UntrustedParameter(
                    f"run parameter auth_secret_block/ollama_auth binds {source.split(':', 1)[0]} "
                    f"credentials to {host}, which the process that runs this flow does not (it binds "
                    f"{sorted(self.ollama_auth) or 'no host'}); set it in the profile `mmem serve` reads"
                )


class StageConfig(BaseSettings):
    """Fields every flow shares; subclasses set ``section`` and their own ``env_prefix``."""

    model_config = SettingsConfigDict(env_prefix="MMEM_", extra="forbid", populate_by_name=True)
    section: ClassVar[str] = ""

    data_root: Path = Field(
        default=Path("mmem-data"),
        validation_alias=AliasChoices("data_root", "MMEM_DATA_ROOT"),
        description="Root under which every table, artifact and cache lives.",
    )

    @model_validator(mode="after")
    def _trusted(self) -> Self:
        trusted = Trusted.current()
        if trusted is not None and not _AS_PART.get():
            trusted.check(self)
        return self

    def trusted_values(self) -> Trusted:
        """What this config alone names that decides trust (subclasses add their hosts, schedulers)."""
        return Trusted(data_roots=[normalise_root(self.data_root)])

    def trust_scope(self) -> list[StageConfig]:
        """This config and the stage configs it carries (the pipeline's)."""
        return [self]

    @property
    def lance_uri(self) -> str:
        return str(self.data_root / "lance")

    @property
    def artifacts_dir(self) -> Path:
        return self.data_root / "artifacts"

    @property
    def cache_dir(self) -> Path:
        return self.data_root / "cache"

    @classmethod
    def load(cls, profile: str | Path | None = None, **overrides: Any) -> Self:
        """Defaults < the data root's recorded choices < profile < environment < overrides (``None``
        overrides are ignored)."""
        values: dict[str, Any] = read_profile_section(profile, cls.section) if profile else {}
        values.update(EnvSettingsSource(cls)())  # the environment beats the profile ...
        values.update({k: v for k, v in overrides.items() if v is not None})
        root = values.get("data_root", cls.model_fields["data_root"].default)
        return cls(**{**root_defaults(root, cls, values), **values})  # ... and explicit overrides beat both


# --- what a data root remembers of how it was made --------------------------------------------------

ROOT_FILE = "mmem-root.json"
# Which sections a recorded group gives defaults to. A group applies as a whole, and only where the
# profile, the environment and the command line name none of its keys (a --checkpoint given now is
# never mixed with a recorded tiny = true).
ROOT_GROUPS: dict[str, tuple[str, ...]] = {"imagebind": ("embed", "memory"), "llm": ("reminders", "evaluate")}


def root_file(data_root: str | Path) -> Path:
    return Path(data_root) / ROOT_FILE


def read_root_file(data_root: str | Path) -> dict[str, dict[str, Any]]:
    """The choices recorded in ``<data_root>/mmem-root.json`` ({} where there is none)."""
    import json

    path = root_file(data_root)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} is not readable JSON ({exc}): fix or remove it") from None
    if not isinstance(doc, dict) or not all(isinstance(v, dict) for v in doc.values()):
        raise ValueError(f"{path} must hold an object of objects, e.g. {{\"imagebind\": {{\"tiny\": true}}}}")
    return doc


def root_defaults(data_root: str | Path, cls: type[StageConfig], given: dict[str, Any]) -> dict[str, Any]:
    """The recorded choices that ``cls`` takes as defaults, given the values set elsewhere."""
    out: dict[str, Any] = {}
    for group, values in read_root_file(data_root).items():
        if cls.section not in ROOT_GROUPS.get(group, ()):
            continue
        fields = {k: v for k, v in values.items() if k in cls.model_fields}
        if fields and not any(k in given for k in fields):
            out.update(fields)
    return out


def record_root_choice(data_root: str | Path, group: str, values: dict[str, Any]) -> Path:
    """Record (replace) ``group`` in the data root's file, atomically: later commands on this root
    take these values as their defaults. ``values`` is JSON (paths as text)."""
    import json

    if group not in ROOT_GROUPS:
        raise ValueError(f"unknown group {group!r} (known: {sorted(ROOT_GROUPS)})")
    path = root_file(data_root)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = read_root_file(data_root)
    doc[group] = {k: (str(v) if isinstance(v, Path) else v) for k, v in values.items()}
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def llm_trusted(base: Trusted, host: str, block: str | None, per_host: dict[str, str],
                hosts: list[str] | None = None) -> Trusted:
    """``base`` plus an LLM config's hosts (``hosts``, else its one ``host``) and the Secret blocks it
    binds to hosts (``auth_secret_block`` goes to the config's own ``host`` only)."""
    named = [host_url(h) for h in hosts] if hosts else [host]
    return base.model_copy(update={"ollama_hosts": [normalise_host(h) for h in named],
                                   "ollama_auth": block_bindings(host, block, per_host)})


def block_bindings(host: str, block: str | None, per_host: dict[str, str]) -> dict[str, str]:
    out = {normalise_host(h): f"block:{b}" for h, b in per_host.items()}
    if block:
        out[normalise_host(host)] = f"block:{block}"
    return out


def env_binding(default_host: str) -> dict[str, str]:
    """``$MMEM_OLLAMA_AUTH`` goes to ``$MMEM_OLLAMA_AUTH_HOST``, else to ``default_host`` (the host
    the trusted process itself configured), and to no other host."""
    if not os.environ.get(AUTH_ENV, "").strip():
        return {}
    return {normalise_host(os.environ.get(AUTH_HOST_ENV) or default_host): f"env:{AUTH_ENV}"}


def default_ollama_host(configured: str | None) -> str:
    return configured or os.environ.get("OLLAMA_HOST") or DEFAULT_OLLAMA_HOST


def split_hosts(value: Any) -> str | list[str] | None:
    """An ``ollama_host`` setting as given: one host (a string), or several (a list, a JSON list as
    an environment variable carries it, or one string with commas or spaces between them). One
    host stays a string. ``$OLLAMA_HOST`` is never split: Ollama defines it as one host."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        value = json.loads(text) if text.startswith("[") else text.replace(",", " ").split()
    hosts = [str(h).strip() for h in value if str(h).strip()]
    if not hosts:
        return None
    seen: dict[str, str] = {}
    for h in hosts if len(hosts) > 1 else ():
        key = normalise_host(host_url(h))
        if key in seen:
            raise ValueError(f"ollama_host names {key} twice ({seen[key]!r} and {h!r})")
        seen[key] = h
    return hosts[0] if len(hosts) == 1 else hosts


def ollama_hosts(configured: str | list[str] | None) -> list[str]:
    """Every host an ``ollama_host`` setting names (``URL`` or ``URL=limit`` each); by default
    ``$OLLAMA_HOST``, else Ollama's default."""
    if isinstance(configured, list):
        return list(configured)
    return [default_ollama_host(configured)]


def host_url(spec: str) -> str:
    """A host as ``ollama_host`` names it, without a ``=limit`` suffix."""
    url, sep, limit = spec.strip().rpartition("=")
    return url.strip() if sep and limit.strip().isdigit() else spec.strip()


def read_profile_section(profile: str | Path, section: str) -> dict[str, Any]:
    """Top-level scalar keys of a TOML profile plus its ``[section]`` table."""
    path = Path(profile)
    if not path.is_file():
        raise FileNotFoundError(f"profile {path} does not exist")
    with path.open("rb") as fh:
        try:
            doc = tomllib.load(fh)
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"profile {path} is not valid TOML: {exc}") from exc
    values = {k: v for k, v in doc.items() if not isinstance(v, dict)}
    values.update(doc.get(section, {}) if section else {})
    return values
