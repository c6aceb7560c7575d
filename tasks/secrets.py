# SHIM(17): moved; deleted by the final import rewrite
from tasks.runtime.secrets import AUTH_ENV, HostAuth, SecretUnavailable, host_auth, ollama_auth  # noqa: F401
