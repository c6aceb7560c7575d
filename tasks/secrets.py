"""Where an Ollama ``Authorization`` header comes from, and the one host it goes to.

An Ollama server behind an auth proxy wants a header such as ``Bearer <token>``. Each source is
bound to one host; a request to any other host carries no token (so a run pointed at another
host, or a variant with its own ``host``, never sends the user's token there). The sources:

1. a Prefect Secret block whose NAME the config carries: ``auth_secret_block`` (for the config's
   own ``ollama_host``) or ``ollama_auth`` (host -> block name, one entry per host); create one
   with ``Secret(value="Bearer <token>").save("ollama-auth")`` or in the UI;
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
from dataclasses import dataclass, field

from pydantic import SecretStr

from schemas.config import AUTH_ENV, Trusted, block_bindings, env_binding, normalise_host

__all__ = ["AUTH_ENV", "HostAuth", "SecretUnavailable", "host_auth", "ollama_auth"]


class SecretUnavailable(RuntimeError):
    """The config names a Secret block that cannot be read. The message names the block, never a value."""


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
            return _block_value(name)
        value = os.environ.get(name, "").strip()
        return SecretStr(value) if value else None


def host_auth(config) -> HostAuth:
    """The bindings of a reminders or evaluate config (its ``host``, ``auth_secret_block``, ``ollama_auth``)."""
    return HostAuth.of(config.host, config.auth_secret_block, config.ollama_auth)


def ollama_auth(block: str | None = None) -> SecretStr | None:
    """The named Prefect Secret block's value, else ``$MMEM_OLLAMA_AUTH``, else None (no host check:
    callers that send it use :class:`HostAuth`)."""
    if block:
        return _block_value(block)
    value = os.environ.get(AUTH_ENV, "").strip()
    return SecretStr(value) if value else None


def _block_value(block: str) -> SecretStr:
    from prefect.blocks.system import Secret

    try:
        # _sync: LLMClient is created inside coroutines too; this must not hand back a coroutine
        value = Secret.load(block, _sync=True).value.get_secret_value()
    except ValueError:
        raise SecretUnavailable(
            f"no Prefect Secret block named {block!r} (from auth_secret_block): create it with "
            f"`Secret(value='Bearer <token>').save({block!r})` or in the Prefect UI, or unset auth_secret_block "
            f"and export {AUTH_ENV}"
        ) from None
    if not isinstance(value, str) or not value.strip():
        raise SecretUnavailable(f"the Prefect Secret block {block!r} does not hold a header value (a string)")
    return SecretStr(value.strip())
