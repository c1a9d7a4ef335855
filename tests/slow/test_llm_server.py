"""The real OpenAI-compatible server (vLLM CPU, SmolLM2-135M-Instruct) on loopback: it answers a
chat completion, stops answering when killed, and answers again after a restart on the same port.

Needs ``bash scripts/install_llm_server.sh`` (skips otherwise). Two server starts of about one to
two minutes each on 2 cores.
"""

from __future__ import annotations

import concurrent.futures

import pytest
import requests

from tests.llm_server import llm_server

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]


def chat(srv, content: str, max_tokens: int = 32, timeout: float = 120.0) -> dict:
    r = requests.post(
        f"{srv.base_url}/chat/completions",
        json={
            "model": srv.model,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens,
            "temperature": 0,
        },
        timeout=timeout,
    )
    r.raise_for_status()
    return r.json()


def answer(reply: dict) -> str:
    return reply["choices"][0]["message"]["content"]


def test_chat_completion_survives_kill_and_restart():
    with llm_server() as srv:
        assert srv.base_url == f"http://127.0.0.1:{srv.port}/v1"
        models = requests.get(f"{srv.base_url}/models", timeout=10).json()
        assert [m["id"] for m in models["data"]] == ["smollm2-135m-instruct"]

        reply = chat(srv, "What is the capital of France? Answer in one word.")
        assert answer(reply).strip(), reply
        assert reply["model"] == "smollm2-135m-instruct"
        assert reply["usage"]["completion_tokens"] > 0
        assert reply["choices"][0]["finish_reason"] in ("stop", "length")
        # The chat template came through the GGUF conversion: the prompt is the ChatML one
        # (system turn added by SmolLM2's template), not the bare text.
        assert reply["usage"]["prompt_tokens"] > 20

        # A few requests at once, as the skills stage sends them.
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            replies = list(pool.map(lambda i: chat(srv, f"Name a colour ({i})."), range(4)))
        assert all(answer(r).strip() for r in replies)

        port = srv.port
        srv.kill()
        assert not srv.running
        with pytest.raises(requests.exceptions.ConnectionError):
            chat(srv, "Are you there?", timeout=10)

        srv.restart()
        assert srv.port == port
        assert srv.running
        assert answer(chat(srv, "Say hello.")).strip()

    assert not srv.running
    with pytest.raises(requests.exceptions.ConnectionError):
        chat(srv, "Still there?", timeout=10)
