"""The local Ollama-protocol server, driven by the official ``ollama`` client over loopback HTTP."""

from __future__ import annotations

import asyncio
import base64
import io
import time

import httpx
import ollama
import psutil
import pytest
from PIL import Image

from llmcalls.client import LLMClient, is_retryable
from llmcalls.requests import ERROR, OK, REJECTED, ImageRef, LLMRequest, LLMUnavailable
from llmcalls.server import Faults, Limits, make_state, running_server, teacher_response
from reminders.parse import parse_response

CONV = ("conversation:\nQ: is the photo in color\nA: yes\nQ: how many circles are there\nA: two\n"
        "Q: what color is the circle")
ATTACK_S = 1.0  # every attack is answered or refused within this (also a long generation's fair share)


def _png(color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), color).save(buf, format="PNG")
    return buf.getvalue()


def _run(coro):
    return asyncio.run(coro)


def test_teacher_speaks_the_ollama_api_and_writes_valid_reminders():
    state = make_state(teacher=True)
    with running_server(state) as url:
        async def go():
            c = ollama.AsyncClient(host=url)
            listed = await c.list()
            shown = await c.show("mmem-teacher")
            msgs = [{"role": "system", "content": "instructions"},
                    {"role": "user", "content": CONV, "images": [_png()]}]
            whole = await c.chat(model="mmem-teacher", messages=msgs, options={"temperature": 0})
            parts = [p async for p in await c.chat(model="mmem-teacher", messages=msgs, stream=True)]
            gen = await c.generate(model="mmem-teacher", prompt=CONV)
            return listed, shown, whole, parts, gen

        listed, shown, whole, parts, gen = _run(go())
    assert [m.model for m in listed.models] == ["mmem-teacher:latest"]
    assert shown.modelinfo["mmem.backend"] == "teacher" and "vision" in shown.capabilities
    reminder, answer = parse_response(whole.message.content)
    assert "what color is the circle" in reminder and "is the photo in color" in reminder
    assert answer and whole.eval_count > 0 and whole.done
    assert "".join(p.message.content for p in parts) == whole.message.content and parts[-1].done
    assert gen.response == whole.message.content  # same conversation, same deterministic answer
    assert whole.message.content == teacher_response(CONV)


def test_check_fails_fast_with_what_to_run():
    with running_server(make_state(teacher=True)) as url:
        async def go():
            async with LLMClient(url) as c:
                assert await c.check("mmem-teacher") == "teacher"
                with pytest.raises(LLMUnavailable, match="ollama pull gemma3:27b"):
                    await c.check("gemma3:27b")
                # a missing model mid-run is not retried: one request, then the actionable error
                with pytest.raises(LLMUnavailable, match="ollama pull"):
                    await c.chat(LLMRequest("gemma3:27b", ({"role": "user", "content": "Q: hi"},)))
        _run(go())

    async def nobody():
        async with LLMClient("http://127.0.0.1:9", timeout_s=2) as c:
            await c.check("gemma3:27b")

    with pytest.raises(LLMUnavailable, match="no Ollama server answers at http://127.0.0.1:9"):
        _run(nobody())


def test_request_hash_covers_model_options_messages_and_image_content(tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    a.write_bytes(_png())
    b.write_bytes(_png((0, 0, 255)))
    import hashlib

    def req(path, model="m", options=None, text=CONV):
        ref = ImageRef(str(path), hashlib.sha256(path.read_bytes()).hexdigest())
        message = {"role": "user", "content": text, "images": (ref,)}
        return LLMRequest(model, (message,), options or {"seed": 0})

    base = req(a).request_hash
    assert base == req(a).request_hash
    assert len({base, req(b).request_hash, req(a, model="n").request_hash,
                req(a, options={"seed": 1}).request_hash, req(a, text=CONV + "?").request_hash}) == 5
    assert "sha256:" in req(a).prompt_json
    assert base64.b64encode(a.read_bytes()).decode() not in req(a).prompt_json
    # an image that changed after ingest is refused, not sent under a stale key
    r = req(a)
    a.write_bytes(_png((1, 2, 3)))
    with running_server(make_state(teacher=True)) as url:
        async def go():
            async with LLMClient(url) as c:
                return await c.chat(LLMRequest("mmem-teacher", r.messages, r.options))
        res = _run(go())
    assert res.status == REJECTED and "changed" in res.error and res.attempts == 0


@pytest.mark.parametrize("fault", ["error", "drop", "stall"])
def test_transient_faults_are_retried_until_they_pass_or_attempts_run_out(fault):
    rate = {"error": {"error_rate": 0.5}, "drop": {"drop_rate": 0.5}, "stall": {"stall_rate": 0.5}}[fault]
    state = make_state(teacher=True, faults=Faults(**rate, stall_s=5, seed=3))
    reqs = [LLMRequest("mmem-teacher", ({"role": "user", "content": f"Q: q{i}\nA: a\nQ: again {i}"},))
            for i in range(12)]
    with running_server(state) as url:
        async def go(max_attempts):
            async with LLMClient(url, timeout_s=0.5, max_attempts=max_attempts, backoff_s=0.01,
                                 backoff_max_s=0.05) as c:
                return await asyncio.gather(*(c.chat(r) for r in reqs))

        patient = _run(go(8))
        state.seen.clear()
        hasty = _run(go(1))
    assert all(r.status == OK and parse_response(r.response)[0] for r in patient)
    assert sum(r.attempts for r in patient) > len(reqs)  # some needed retries
    assert state.requests[fault] > 0
    # with one attempt the same seeded draws fail some requests: recorded, not raised
    failed = [r for r in hasty if r.status == ERROR]
    assert failed and all(r.attempts == 1 for r in hasty)


def test_fault_draws_are_seeded_and_independent_of_arrival_order():
    f = Faults(error_rate=0.2, drop_rate=0.1, untagged_rate=0.1, seed=7)
    draws = [f.draw(f"body{i}".encode(), 0) for i in range(2000)]
    assert draws == [f.draw(f"body{i}".encode(), 0) for i in range(2000)]
    share = {k: draws.count(k) / len(draws) for k in ("error", "drop", "untagged")}
    assert abs(share["error"] - 0.2) < 0.04 and abs(share["drop"] - 0.1) < 0.03
    # a retry draws anew
    assert any(f.draw(f"b{i}".encode(), 0) != f.draw(f"b{i}".encode(), 1) for i in range(50))
    assert not is_retryable(ollama.ResponseError("bad", 400)) and is_retryable(ollama.ResponseError("x", 503))


def test_hf_checkpoint_backend_serves_a_tiny_gemma3_with_images(tiny_checkpoint):
    state = make_state(tiny_checkpoint)
    with running_server(state) as url:
        async def go():
            c = ollama.AsyncClient(host=url)
            shown = await c.show("tiny-gemma3")
            msgs = [{"role": "system", "content": "Summarise."},
                    {"role": "user", "content": CONV, "images": [_png()]}]
            opts = {"temperature": 0, "num_predict": 6, "seed": 0}
            one = await c.chat(model="tiny-gemma3", messages=msgs, options=opts)
            two = await c.chat(model="tiny-gemma3", messages=msgs, options=opts)
            chunks = await c.chat(model="tiny-gemma3", messages=msgs, options=opts, stream=True)
            streamed = [p async for p in chunks]
            return shown, one, two, streamed

        shown, one, two, streamed = _run(go())
    assert shown.modelinfo["mmem.backend"] == "hf:tiny-gemma3" and "vision" in shown.capabilities
    assert one.message.content == two.message.content  # greedy decoding is deterministic
    assert 0 < one.eval_count <= 6 and one.prompt_eval_count > 20
    assert "".join(p.message.content for p in streamed) == one.message.content


def test_requests_past_the_in_flight_limit_get_503():
    state = make_state(teacher=True, latency_s=0.5, parallel=1, limits=Limits(max_requests=2))
    with running_server(state) as url:
        async def go():
            async with httpx.AsyncClient(base_url=url, timeout=10) as c:
                body = {"model": "mmem-teacher", "stream": False,
                        "messages": [{"role": "user", "content": CONV}]}
                answers = await asyncio.gather(*(c.post("/api/chat", json=body) for _ in range(4)))
                return [r.status_code for r in answers]

        codes = _run(go())
    assert sorted(codes) == [200, 200, 503, 503] and state.refused["busy"] == 2


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from training.tiny_models import tiny_gemma3

    return tiny_gemma3(tmp_path_factory.mktemp("hf") / "tiny-gemma3", seed=0)


def test_checkpoint_prompt_is_fitted_to_num_ctx_and_turns_are_fair(tiny_checkpoint):
    """A 40 KB prompt (40 K tokens with the character tokenizer) is cut to ``num_ctx`` keeping its end,
    ``num_predict`` is capped, a cut through an image is refused, and a short request arriving
    behind a long generation is answered in its fair share of the model, not after it."""
    limits = Limits(max_ctx=512, max_predict=160, slice_s=0.02)
    state = make_state(tiny_checkpoint, limits=limits)
    rss0 = psutil.Process().memory_info().rss
    with running_server(state) as url:
        async def go():
            c = ollama.AsyncClient(host=url)
            await c.chat(model="tiny-gemma3", messages=[{"role": "user", "content": "warm up"}],
                         options={"num_predict": 2})

            async def timed(content, opts, delay=0.0, images=None):
                await asyncio.sleep(delay)
                t0 = time.perf_counter()
                msg = {"role": "user", "content": content, **({"images": images} if images else {})}
                r = await c.chat(model="tiny-gemma3", messages=[msg], options={"temperature": 0, **opts})
                return r, time.perf_counter() - t0

            (big, big_s), (_, small_s) = await asyncio.gather(
                timed("Q: " + "word " * 8_000 + "\nQ: what color", {"num_ctx": 10**9, "num_predict": 8}),
                timed("Q: hi", {"num_predict": 2}))
            capped, _ = await timed("Q: hi", {"num_predict": 10**9, "num_ctx": 10**9})
            (long, long_s), (short, short_s) = await asyncio.gather(
                timed("Q: tell me everything", {"num_predict": 160}),
                timed("Q: hi", {"num_predict": 2}, delay=0.2))
            with pytest.raises(ollama.ResponseError) as refused:
                await c.chat(model="tiny-gemma3", options={"num_ctx": 256}, messages=[
                    {"role": "user", "content": "look", "images": [_png()]},
                    {"role": "user", "content": "y" * 40_000}])
            return big, big_s, small_s, capped, long, long_s, short, short_s, refused.value

        big, big_s, small_s, capped, long, long_s, short, short_s, refused = _run(go())
    assert big_s < ATTACK_S and small_s < ATTACK_S
    assert big.prompt_eval_count <= limits.max_ctx and big.eval_count <= 8
    assert capped.eval_count <= limits.max_predict
    assert long.eval_count > 100 and short.eval_count <= 2
    assert short_s < long_s / 3, (short_s, long_s)  # one lock around whole generations: short_s ~ long_s
    assert refused.status_code == 400 and "num_ctx" in refused.error
    assert psutil.Process().memory_info().rss - rss0 < 512 << 20
