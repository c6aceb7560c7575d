"""The teacher: a deterministic stand-in, NOT a language model, that composes a valid
``<reminder>...</reminder>`` plus an answer sentence from the conversation it is sent, so the demo
has real rows for every stage downstream. It says so in its banner and in ``/api/show``."""

from __future__ import annotations

import asyncio
import re

from llmcalls.server.protocol import Generation

TEACHER_FAMILY = "mmem-teacher"

STOP_WORDS = frozenset({
    "a", "an", "the", "is", "are", "was", "were", "be", "of", "in", "on", "at", "to", "it", "its",
    "this", "that", "there", "what", "which", "who", "how", "many", "much", "do", "does", "did", "any",
    "some", "can", "you", "see", "they", "he", "she", "them", "his", "her", "or", "and",
})
WORD_RE = re.compile(r"[a-z0-9]+")


def dialog_line(line: str) -> tuple[str, str] | None:
    """``("Q"|"A", text)`` for a ``Q:``/``A:`` line, else None. String methods, not a regex with
    backtracking, so a line of any length costs time linear in its length."""
    s = line.lstrip()
    if s[:2] in ("Q:", "A:"):
        return s[0], s[2:].strip()
    return None


def parse_conversation(text: str) -> tuple[list[tuple[str, str]], str | None]:
    """``Q:``/``A:`` lines -> answered turns and the open (unanswered) last question, if any."""
    turns, question = [], None
    for line in text.splitlines():
        qa = dialog_line(line)
        if qa is None:
            continue
        role, content = qa
        if role == "Q":
            question = content
        elif question is not None:
            turns.append((question, content))
            question = None
    return turns, question


def _words(text: str) -> set[str]:
    return {w for w in WORD_RE.findall(text.lower()) if w not in STOP_WORDS}


def _clip(text: str, limit: int = 500) -> str:
    """A quote of at most ``limit`` characters: a huge question must not become a huge answer."""
    return text if len(text) <= limit else text[:limit] + "..."


def teacher_response(conversation: str) -> str:
    """A valid reminder answer built only from the conversation: deterministic, and honest about
    what it knows (it never sees the image, so its answer leans on what was already said)."""
    turns, question = parse_conversation(conversation)
    question = question or (turns[-1][0] if turns else "what the image shows")
    said = "; ".join(f'asked "{_clip(q)}", heard "{_clip(a)}"' for q, a in turns[-6:]) \
        or "nothing has been said yet"
    reminder = (
        f"One image, {len(turns)} answered question{'s' if len(turns) != 1 else ''} so far: {said}. "
        f'The open question is "{_clip(question)}", so I look again at the part of the image it is about.'
    )
    asked = _words(question)  # once: per turn it would cost (turns x question length)
    best = max(turns, key=lambda t: len(_words(t[0]) & asked), default=None)
    if best is not None and _words(best[0]) & asked:
        answer = f"Going by the earlier answer, {_clip(best[1]).rstrip('.')}."
    else:
        answer = "I cannot tell that from the conversation alone."
    return f"<reminder>{reminder}</reminder>\n{answer}"


def conversation_of(messages: list[dict]) -> str:
    """The latest user message that holds dialog lines (a repair re-ask comes after it)."""
    for m in reversed(messages):
        content = m.get("content") or ""
        if m.get("role") == "user" and any(dialog_line(line) for line in content.splitlines()):
            return content
    return next((m.get("content") or "" for m in reversed(messages) if m.get("role") == "user"), "")


class TeacherBackend:
    kind = "teacher"
    family = TEACHER_FAMILY
    vision = True

    async def generate(self, messages: list[dict], options: dict) -> Generation:
        return await asyncio.to_thread(self._generate, messages)

    @staticmethod
    def _generate(messages: list[dict]) -> Generation:
        prompt_tokens = sum(len((m.get("content") or "").split()) for m in messages)
        text = teacher_response(conversation_of(messages))
        return Generation(text, prompt_tokens, len(text.split()))
