"""The LLM calls every stage makes, and nothing about any one stage: request types and their cache
key (``requests``), the Ollama client (``client``), where an Authorization header comes from
(``auth``), the write-through response cache and its signed journals (``cache``), one shard of
calls (``shard``), the one fill loop (``fill``), and the local Ollama-protocol server (``server``).

Pure Python: no orchestrator import. The Prefect glue (Secret blocks, global concurrency slots)
lives in ``tasks.runtime``.
"""
