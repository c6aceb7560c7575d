"""Reminders: the ``llm_responses`` cache, the ``reminders`` table, the reminders config, and the
format contract of a reminder answer (tag, length bounds) that the parser and the Great
Expectations suite share, so the two cannot drift apart.
"""

from __future__ import annotations

import json
import re
import tomllib
from importlib import resources
from pathlib import Path
from typing import Annotated, ClassVar

import pyarrow as pa
from pydantic import Field, field_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from schemas.config import StageConfig, Trusted, host_url, llm_trusted, ollama_hosts, split_hosts
from schemas.results import StageResult
from schemas.tables import register

# Typed, so the options and the messages can be filtered and joined on without parsing JSON. The
# options Ollama callers here set have their own fields; any other key (a variant's own option) goes
# to ``other`` as JSON, as do any message keys beyond role, content and images.
OPTIONS = pa.struct([pa.field("temperature", pa.float64()), pa.field("seed", pa.int64()),
                     pa.field("num_predict", pa.int64()), pa.field("num_ctx", pa.int64()),
                     pa.field("top_p", pa.float64()), pa.field("top_k", pa.int64()),
                     pa.field("repeat_penalty", pa.float64()), pa.field("stop", pa.list_(pa.string())),
                     pa.field("other", pa.string())])
PROMPT = pa.list_(pa.struct([pa.field("role", pa.string()), pa.field("content", pa.string()),
                             pa.field("images", pa.list_(pa.string())), pa.field("other", pa.string())]))
_MESSAGE_KEYS = ("role", "content", "images")


def _other(extra: dict) -> str | None:
    return json.dumps(extra, sort_keys=True, ensure_ascii=False) if extra else None


def _unfold(value: dict) -> dict:
    """``value`` with the keys its ``other`` JSON holds put back (a record given again is unchanged)."""
    value = dict(value)
    other = value.pop("other", None)
    return {**value, **json.loads(other)} if other else value


def options_record(options: dict | str | None) -> dict | None:
    """Generation options (a dict, an ``OPTIONS`` value, or the JSON text of schema 1) as an
    ``OPTIONS`` value."""
    if options is None:
        return None
    options = _unfold(json.loads(options) if isinstance(options, str) else options)
    known = [f.name for f in OPTIONS if f.name != "other"]
    other = _other({k: v for k, v in options.items() if k not in known})
    return {**{k: options.get(k) for k in known}, "other": other}


def prompt_records(messages: list[dict] | str | None) -> list[dict] | None:
    """Messages (a list, a ``PROMPT`` value, or the JSON text of schema 1) as a ``PROMPT`` value."""
    if messages is None:
        return None
    messages = [_unfold(m) for m in (json.loads(messages) if isinstance(messages, str) else messages)]
    return [{"role": m.get("role"), "content": m.get("content"), "images": m.get("images"),
             "other": _other({k: v for k, v in m.items() if k not in _MESSAGE_KEYS})} for m in messages]


def prompt_messages(records: list[dict] | None) -> list[dict] | None:
    """A ``PROMPT`` value as the messages it records (the inverse of :func:`prompt_records`)."""
    if records is None:
        return None
    out = []
    for r in records:
        m = {k: r[k] for k in _MESSAGE_KEYS if r.get(k) is not None}
        out.append({**m, **json.loads(r["other"])} if r.get("other") else m)
    return out


def _llm_responses_v2(rows: pa.Table) -> pa.Table:
    """Schema 1 -> 2: ``options`` and ``prompt`` JSON text -> typed."""
    for name, typ, fn in (("options", OPTIONS, options_record), ("prompt", PROMPT, prompt_records)):
        i = rows.schema.get_field_index(name)
        values = pa.array([fn(v) for v in rows.column(i).to_pylist()], typ)
        rows = rows.set_column(i, pa.field(name, typ), values)
    return rows


LLM_RESPONSES = register(
    "llm_responses",
    pa.schema(
        [
            pa.field("request_hash", pa.string(), nullable=False),
            pa.field("model", pa.string(), nullable=False),
            pa.field("host", pa.string()),
            pa.field("options", OPTIONS),  # the generation options (part of the cache key)
            pa.field("prompt", PROMPT),  # the messages, each image replaced by "sha256:<content hash>"
            pa.field("response", pa.string()),
            pa.field("status", pa.string(), nullable=False),  # ok | error
            pa.field("error", pa.string()),
            pa.field("attempts", pa.int32()),
            pa.field("latency_s", pa.float64()),
            pa.field("prompt_tokens", pa.int32()),
            pa.field("completion_tokens", pa.int32()),
            pa.field("backend", pa.string()),  # what answered: ollama, hf checkpoint, teacher
            pa.field("created_at", pa.timestamp("us", tz="UTC")),
        ]
    ),
    key=("request_hash",),
    doc="Every LLM call, written through as a response cache.",
    version=2,
    upgrade=_llm_responses_v2,
)

REMINDERS = register(
    "reminders",
    pa.schema(
        [
            pa.field("image_id", pa.int64(), nullable=False),
            pa.field("split", pa.string()),
            pa.field("image_url", pa.string()),
            pa.field("conversation", pa.string(), nullable=False),
            pa.field("response", pa.string(), nullable=False),
            pa.field("reminder", pa.string(), nullable=False),
            pa.field("final_answer", pa.string(), nullable=False),
            pa.field("target_answer", pa.string()),  # the dropped last answer of the dialog
            pa.field("request_hash", pa.string(), nullable=False),
            pa.field("model", pa.string()),
            pa.field("backend", pa.string()),  # what wrote it: ollama, hf:<checkpoint>, teacher
        ]
    ),
    key=("image_id",),
    doc="Valid <reminder> self-reflection samples, one per dialog.",
)


class RemindersConfig(StageConfig):
    """Parameters of the reminders flow (section ``[reminders]``, env ``MMEM_REMINDERS_*``)."""

    model_config = SettingsConfigDict(env_prefix="MMEM_REMINDERS_")
    section: ClassVar[str] = "reminders"

    ollama_host: Annotated[str | list[str] | None, NoDecode] = Field(
        default=None, description="Ollama server, or a list of them: one run spreads its requests over "
        "all, each taking as many at once as it shows it can (`URL=N`: at most N there, for a host shared "
        "with others). Default: $OLLAMA_HOST (one host) or 127.0.0.1:11434.")
    auth_secret_block: str | None = Field(
        default=None,
        description="Name of a Prefect Secret block holding the Authorization header value of `ollama_host` "
        "only (the first, where it names several: bind the others in `ollama_auth`), e.g. 'Bearer <token>' "
        "(the name only, never the value); without it, $MMEM_OLLAMA_AUTH (sent "
        "to $MMEM_OLLAMA_AUTH_HOST, else to this host); without that, none.",
    )
    ollama_auth: dict[str, str] = Field(
        default_factory=dict, description="Per-host Authorization: Ollama host -> name of the Prefect Secret "
        "block holding its header value. A request to a host named nowhere carries no token.")
    model: str = "gemma3:27b"
    temperature: float = Field(default=0.0, ge=0, le=10)
    seed: int = Field(default=0, ge=0, lt=2**32)
    num_predict: int = Field(default=256, ge=1, le=32_768)
    num_ctx: int = Field(default=4096, ge=256, le=262_144)
    limit: int | None = Field(default=None, ge=1, le=10**9, description="Only the first N dialogs.")
    shard_size: int = Field(default=256, ge=1, le=100_000)
    concurrency: int = Field(
        default=8, ge=1, le=1024, description="The most requests in flight on any one Ollama host (the "
        "slots the run holds there); how many each host really gets is learned below it while the run "
        "goes. Give room: at least 1.5x the server's parallel slots (OLLAMA_NUM_PARALLEL), so no slot idles "
        "for a round trip between two generations; 2-4x the largest host's slots with several hosts.")
    timeout_s: float = Field(default=300.0, gt=0, le=86_400)
    max_attempts: int = Field(default=4, ge=1, le=100,
                              description="Tries per request (5xx, timeouts, dropped connections).")
    backoff_s: float = Field(default=1.0, gt=0, le=3600,
                             description="First retry delay; doubles per try, with jitter.")
    backoff_max_s: float = Field(default=60.0, gt=0, le=86_400)
    shard_retries: int = Field(
        default=1, ge=0, le=100,
        description="Prefect retries of a failed shard (cached calls are not re-made).")
    shard_retry_delay_s: float = Field(default=30.0, ge=0, le=86_400)
    repair: bool = Field(default=False,
                         description="Re-ask once, with the format reminder, when an answer is invalid.")
    splits: list[str] | None = Field(default=None, description="Dialog splits to use; default all.")
    image_roots: dict[str, Path] = Field(
        default_factory=dict, description="split -> image folder, overriding the root stored by ingest."
    )
    examples: Path | None = Field(default=None, description="Few-shot TOML; default the packaged examples.")
    table_versions: dict[str, int | str] = Field(
        default_factory=dict, description="Pinned Lance versions (number or tag) of dialogs/turns/images to "
        "read; default the latest. The pipeline pins the versions ingest wrote.",
    )

    _hosts = field_validator("ollama_host", mode="before")(classmethod(lambda cls, v: split_hosts(v)))

    @property
    def hosts(self) -> list[str]:
        """Every Ollama server of the run (``URL`` or ``URL=limit`` each)."""
        return ollama_hosts(self.ollama_host)

    @property
    def host(self) -> str:
        """The (first) Ollama server: the config, else ``$OLLAMA_HOST``, else Ollama's default."""
        return host_url(self.hosts[0])

    def trusted_values(self) -> Trusted:
        return llm_trusted(super().trusted_values(), self.host, self.auth_secret_block, self.ollama_auth,
                           self.hosts)

    @property
    def options(self) -> dict:
        """Ollama generation options; part of every request's cache key."""
        return {"temperature": self.temperature, "seed": self.seed, "num_predict": self.num_predict,
                "num_ctx": self.num_ctx}


class RemindersResult(StageResult):
    """What a reminders run did: its prompts' fates (``valid + quarantined + failures == prompts``),
    the quarantined ones per reason, the calls it made and how fast, and the table versions.
    ``versions`` are those it wrote (SFT trains on that ``reminders`` version)."""

    prompts: int = 0
    cache_hits: int = 0
    calls: int = 0
    retries: int = 0
    failures: int = 0
    quarantined: int = 0
    valid: int = 0
    latency_p50_s: float | None = None
    latency_p95_s: float | None = None
    tokens_per_s: float | None = None
    requests_per_s: float | None = None
    wall_s: float = 0.0
    backend: str | None = None
    # quarantined per reason (the reasons a reminders run gives)
    quarantined_image_missing: int = 0
    quarantined_empty_text: int = 0
    quarantined_no_reminder: int = 0
    quarantined_multiple_reminders: int = 0
    quarantined_empty_reminder: int = 0
    quarantined_empty_answer: int = 0
    quarantined_too_long: int = 0
    quarantined_too_short: int = 0
    quarantined_echoed_dialog: int = 0
    quarantined_llm_error: int = 0
    shards: int = Field(default=0, description="Shards of every round (generation, repair).")
    shards_cached: int = Field(default=0, description="Shards Prefect served from their persisted result.")
    hosts: dict[str, dict] = Field(
        default_factory=dict, description="Several Ollama hosts: each one's requests, errors, p50/p95 "
        "latency and learned concurrency.")
    inserted: int = 0
    updated: int = 0

    def reconciles(self) -> bool:
        return self.valid + self.quarantined + self.failures == self.prompts

    def __getitem__(self, key: str):
        """Read like the dict the flow returned before it was typed (``result["valid"]``)."""
        if key not in type(self).model_fields:
            raise KeyError(key)
        return getattr(self, key)

    def get(self, key: str, default=None):
        return self[key] if key in type(self).model_fields else default


# --- the answer format --------------------------------------------------------------------

REMINDER_OPEN, REMINDER_CLOSE = "<reminder>", "</reminder>"
REMINDER_RE = re.compile(r"<reminder>(.*?)</reminder>", re.DOTALL | re.IGNORECASE)
ANY_TAG_RE = re.compile(r"</?reminder>", re.IGNORECASE)
ECHO_RE = re.compile(r"^\s*[QA]:", re.MULTILINE)  # a copied "Q: ..."/"A: ..." dialog line
REMINDER_CHARS = (20, 2000)
ANSWER_CHARS = (2, 400)


def load_prompt_data(path: Path | None = None) -> tuple[str, list[dict[str, str]]]:
    """The system instructions and the few-shot examples (``[[example]]`` with ``conversation``
    and ``response``), kept as data so they can change without touching code."""
    if path is None:
        text = resources.files("schemas").joinpath("reminder_examples.toml").read_text(encoding="utf-8")
    else:
        text = Path(path).read_text(encoding="utf-8")
    doc = tomllib.loads(text)
    examples = doc.get("example", [])
    for i, ex in enumerate(examples):
        if not {"conversation", "response"} <= set(ex):
            raise ValueError(f"few-shot example {i} needs 'conversation' and 'response'")
    if "instructions" not in doc:
        raise ValueError("the prompt data needs an 'instructions' string")
    return doc["instructions"].strip(), [
        {"conversation": ex["conversation"].strip(), "response": ex["response"].strip()} for ex in examples
    ]
