# SHIM(17): moved; deleted by the final import rewrite
from embed.model import cached_embedder  # noqa: F401
from embed.weights import model_fingerprint  # noqa: F401
