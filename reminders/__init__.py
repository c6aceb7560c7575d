"""The reminders stage, pure Python: every cleaned dialog -> one prompt (``prompts``) -> the LLM's
answer parsed and checked (``parse``) -> each prompt's fate (``outcome``) -> the ``reminders`` and
``quarantine`` rows (``write``) and the run's summary (``summary``); ``export`` reads the table back
out. The LLM calls themselves (cache, shards, journals) are ``llmcalls``'; the Prefect wiring is
``tasks.reminders`` and ``flows.reminders``.

Every prompt ends in exactly one of three states, and the counts reconcile:

- valid: a row in ``reminders``;
- quarantined: a ``quarantine`` row with its reason (bad format, a 4xx, a changed image);
- failed: the call still failed after its retries; its shard failed, the finished calls are in
  the cache, and a re-run makes only the missing calls.
"""

STAGE = "reminders"
