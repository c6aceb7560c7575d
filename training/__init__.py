"""training package: the SFT and memory-model stage, pure (no Prefect): a run's plan (``plan``) and
run (``run``), LoRA SFT of Gemma3 (``sft``), the memory model (``memory_model`` and its parts) and
its loop (``memory_loop``), and the tiny random-weight models the tests and the demo train."""
