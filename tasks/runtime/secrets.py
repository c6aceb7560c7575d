"""Prefect Secret blocks as a source of Ollama ``Authorization`` headers (``llmcalls.auth`` says which
host each source goes to, and why a value is read only when a client for its host is created).

Importing this module makes Secret blocks readable by ``llmcalls.auth.HostAuth`` in this process.
Create a block with ``Secret(value="Bearer <token>").save("ollama-auth")`` or in the UI, and name
it in a config's ``auth_secret_block`` (its own host) or ``ollama_auth`` (host -> block name).
"""

from __future__ import annotations

from pydantic import SecretStr

from llmcalls.auth import AUTH_ENV, HostAuth, SecretUnavailable, env_auth, use_block_reader

__all__ = ["AUTH_ENV", "HostAuth", "SecretUnavailable", "block_value", "host_auth", "ollama_auth"]


def block_value(block: str) -> SecretStr:
    """The header value a Prefect Secret block holds; the message of a failure names the block only."""
    from prefect.blocks.system import Secret

    try:
        # _sync: LLMClient is created inside coroutines too; this must not hand back a coroutine
        value = Secret.load(block, _sync=True).value.get_secret_value()
    except ValueError:
        raise SecretUnavailable(
            f"no Prefect Secret block named {block!r} (from auth_secret_block): create it with "
            f"`Secret(value='Bearer <token>').save({block!r})` or in the Prefect UI, or unset "
            f"auth_secret_block and export {AUTH_ENV}"
        ) from None
    if not isinstance(value, str) or not value.strip():
        raise SecretUnavailable(f"the Prefect Secret block {block!r} does not hold a header value (a string)")
    return SecretStr(value.strip())


use_block_reader(block_value)


def host_auth(config) -> HostAuth:
    """The bindings of a reminders or evaluate config (its ``host``, ``auth_secret_block``,
    ``ollama_auth``), Secret blocks read through Prefect."""
    return HostAuth.of(config.host, config.auth_secret_block, config.ollama_auth)


def ollama_auth(block: str | None = None) -> SecretStr | None:
    """The named Prefect Secret block's value, else ``$MMEM_OLLAMA_AUTH``, else None (no host check:
    callers that send it use :class:`HostAuth`)."""
    return block_value(block) if block else env_auth()
