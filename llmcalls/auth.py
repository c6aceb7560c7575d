"""Where an Ollama ``Authorization`` header comes from, and the one host it goes to.

An Ollama server behind an auth proxy wants a header such as ``Bearer <token>``. Each source is
bound to one host; a request to any other host carries no token (so a run pointed at another
host, or a variant with its own ``host``, never sends the user's token there). The sources:

1. a Secret block whose NAME the config carries: ``auth_secret_block`` (for the config's own
   ``ollama_host``) or ``ollama_auth`` (host -> block name, one entry per host). Reading a block is
   the orchestrator's job: ``tasks.runtime.secrets`` registers the reader (:func:`use_block_reader`)
   and builds a config's bindings (``host_auth``);
2. the environment variable ``MMEM_OLLAMA_AUTH`` (the whole header value), for
   ``$MMEM_OLLAMA_AUTH_HOST`` if set, else for the config's own host;
3. nothing: no header is sent (the ``ollama`` library itself then sends ``Bearer $OLLAMA_API_KEY``
   if that variable is set; that is Ollama's own convention, not ours).

In a flow run that ``mmem serve`` started, only the bindings the serving process made from its own
profile and environment count (``schemas.config.Trusted.ollama_auth``), never the run's.

A value is read only when a client for its host is created (never earlier, so it never travels
through a config, a flow parameter or a task input), as a ``pydantic.SecretStr`` (its ``str``/``repr``
are masked), and no message raised here contains it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

from pydantic import SecretStr

from schemas.config import AUTH_ENV, Trusted, block_bindings, env_binding, normalise_host

__all__ = ["AUTH_ENV", "BlockReader", "HostAuth", "SecretUnavailable", "env_auth", "use_block_reader"]

BlockReader = Callable[[str], SecretStr]  # a Secret block's name -> its header value
_readers: list[BlockReader] = []


class SecretUnavailable(RuntimeError):
    """The config names a Secret block that cannot be read. The message names the block, never a value."""


def use_block_reader(reader: BlockReader) -> None:
    """Make ``reader`` the way Secret blocks are read in this process (the orchestrator's glue calls it)."""
    _readers[:] = [reader]


def read_block(name: str) -> SecretStr:
    if not _readers:
        raise SecretUnavailable(f"a Secret block ({name!r}) is bound to this host, but nothing in this "
                                f"process reads Secret blocks (import tasks.runtime.secrets); or export "
                                f"{AUTH_ENV}")
    return _readers[0](name)


@dataclass(frozen=True)
class HostAuth:
    """Which Authorization source goes to which host (``block:<name>`` or ``env:<VAR>``); no values."""

    sources: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, host: str, block: str | None = None, per_host: dict[str, str] | None = None) -> HostAuth:
        """The bindings of a config whose own host is ``host``: the serving process's in a served run."""
        trusted = Trusted.current()
        if trusted is not None:
            return cls(dict(trusted.ollama_auth))
        return cls({**env_binding(host), **block_bindings(host, block, per_host or {})})

    def source(self, host: str) -> str | None:
        return self.sources.get(normalise_host(host))

    def describe(self, host: str) -> str:
        """Where ``host``'s header comes from, for messages (never the value)."""
        src = self.source(host)
        if src is None:
            return "nowhere (no token is bound to this host)"
        kind, name = src.split(":", 1)
        return f"Prefect Secret block {name!r}" if kind == "block" else f"${name}"

    def header(self, host: str) -> SecretStr | None:
        """The header value for a request to ``host``, or None: a host nothing is bound to gets none."""
        src = self.source(host)
        if src is None:
            return None
        kind, name = src.split(":", 1)
        if kind == "block":
            return read_block(name)
        value = os.environ.get(name, "").strip()
        return SecretStr(value) if value else None


def env_auth() -> SecretStr | None:
    """``$MMEM_OLLAMA_AUTH``, or None (no host check: callers that send it use :class:`HostAuth`)."""
    value = os.environ.get(AUTH_ENV, "").strip()
    return SecretStr(value) if value else None
