# SHIM(17): moved; deleted by the final import rewrite
from llmcalls.cache import Journal, ResponseCache, key_path, read_journal  # noqa: F401
from llmcalls.client import LLMClient, is_retryable  # noqa: F401
from llmcalls.requests import (  # noqa: F401
    ERROR,
    OK,
    REJECTED,
    ImageRef,
    LLMRequest,
    LLMResult,
    LLMUnavailable,
    full_name,
)
