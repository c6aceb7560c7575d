"""Where an Ollama ``Authorization`` header comes from, without it ever being a plain value in sight.

An Ollama server behind an auth proxy wants a header such as ``Bearer <token>``. It is resolved,
in this order, when an ``LLMClient`` is created (never earlier, so it never travels through a
config, a flow parameter or a task input):

1. a Prefect Secret block whose NAME the config carries (``[reminders] auth_secret_block``;
   create one with ``Secret(value="Bearer <token>").save("ollama-auth")`` or in the UI);
2. the environment variable ``MMEM_OLLAMA_AUTH`` (the whole header value, e.g. ``Bearer <token>``);
3. nothing: no header is sent (the ``ollama`` library itself then sends ``Bearer $OLLAMA_API_KEY``
   if that variable is set; that is Ollama's own convention, not ours).

The value is returned as a ``pydantic.SecretStr`` (its ``str``/``repr`` are masked), and no
message raised here contains it, so a log line or an exception that mentions it by accident
shows ``**********``.
"""

from __future__ import annotations

import os

from pydantic import SecretStr

AUTH_ENV = "MMEM_OLLAMA_AUTH"


class SecretUnavailable(RuntimeError):
    """The config names a Secret block that cannot be read. The message names the block, never a value."""


def ollama_auth(block: str | None = None) -> SecretStr | None:
    """The ``Authorization`` header value: the named Prefect Secret block, else ``$MMEM_OLLAMA_AUTH``, else None."""
    if block:
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
    value = os.environ.get(AUTH_ENV, "").strip()
    return SecretStr(value) if value else None
