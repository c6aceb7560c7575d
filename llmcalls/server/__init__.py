"""A local server that speaks the part of the Ollama HTTP API the official ``ollama`` client uses.

Why: no Ollama and no Gemma3 weights exist on these machines, yet the reminders stage must run
its real client path end to end (health check, chat with images, retries), and evaluation must
query local checkpoints through the same client. So this serves ``/api/chat``, ``/api/generate``
(streaming and not), ``/api/tags``, ``/api/show``, ``/api/ps`` and ``/api/version`` from one of:

- ``HFBackend``: a local Hugging Face checkpoint (a tiny random Gemma3 in the tests, a fine-tuned
  LoRA adapter later), through transformers' processor and the model's forward pass;
- ``TeacherBackend``: a deterministic stand-in, NOT a language model, that composes a valid
  ``<reminder>...</reminder>`` plus an answer sentence from the conversation it is sent, so the
  demo has real rows for every stage downstream. It says so in its banner, in ``/api/show``
  (``details.family = "mmem-teacher"``, ``model_info["mmem.backend"] = "teacher"``), which
  the client copies into the ``backend`` column of every row it writes.

Around any backend: ``latency_s`` and ``parallel`` model a server that serves N generations at
once with a fixed latency (the client benchmark), and ``Faults`` injects 500s, stalls, dropped
connections and answers without the tag at seeded rates (the retry tests, the reliability suite).
``auth`` makes every route require one exact ``Authorization`` header (what an Ollama behind an
auth proxy wants), answering 401 otherwise without echoing what was sent.

Sturdy by default, because any local user or any web page open in the user's browser can reach a
loopback port (``Limits`` holds every bound):

- a request naming a foreign ``Host`` (DNS rebinding; checked on connections that arrive over
  loopback) or sent by a foreign ``Origin`` gets 403: loopback names and addresses pass, plus
  configured origins and their host names (as Ollama's ``OLLAMA_ORIGINS``);
- headers and body must arrive within ``read_timeout_s`` each (slow clients are dropped, 408), a
  body past ``max_body_bytes`` gets 413 without being held in memory, headers are capped in size,
  and past ``max_requests`` requests in flight the answer is 503 (the client retries it);
- a body that is not a JSON object, or options of the wrong type, get 400;
- the prompt is fitted to ``num_ctx`` (the start is cut, the end kept, see ``HFBackend``) and
  ``num_predict`` is capped, so a big request cannot become a long forward pass;
- CPU work (tokenizing, parsing, the teacher) runs in worker threads, not on the event loop, and
  the parsing is linear in the text;
- generations take turns on the model in short time slices, first come first served, so a short
  request waits for at most one slice of each request ahead of it per token slice, never for a
  whole long generation.

Binds 127.0.0.1 unless told otherwise. No Prefect here.

The modules: ``protocol`` (bounds, request parsing, answers), ``teacher`` and ``hf`` (the
backends), ``faults``, ``guard`` (the middleware), ``app`` (the routes), ``run`` (serving).
"""

from llmcalls.server.app import ServerState, build_app
from llmcalls.server.faults import Faults, strip_reminder
from llmcalls.server.guard import is_loopback_name, origin_allowed
from llmcalls.server.hf import HFBackend
from llmcalls.server.protocol import SERVER_VERSION, Backend, BadRequest, Generation, Limits, MiB
from llmcalls.server.run import banner, make_state, running_server, serve
from llmcalls.server.teacher import TEACHER_FAMILY, TeacherBackend, parse_conversation, teacher_response

__all__ = [
    "SERVER_VERSION",
    "TEACHER_FAMILY",
    "Backend",
    "BadRequest",
    "Faults",
    "Generation",
    "HFBackend",
    "Limits",
    "MiB",
    "ServerState",
    "TeacherBackend",
    "banner",
    "build_app",
    "is_loopback_name",
    "make_state",
    "origin_allowed",
    "parse_conversation",
    "running_server",
    "serve",
    "strip_reminder",
    "teacher_response",
]
