"""``FakeOpenAI``: a real OpenAI-compatible HTTP server on loopback, answering by rules.

A test peer for the openai backend (stdlib ``http.server`` in a thread, nothing
external): it can answer well, answer garbage, refuse, fail with any status, hang
past the client's timeout, send broken JSON, or die, per question and per call.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

API_KEY = "sk-test-SECRET-never-printed"


class FakeOpenAI:
    """An OpenAI-compatible chat server on 127.0.0.1 whose ``rule`` picks each answer.

    ``rule(question, n)`` (n: this question's call count, from 1) returns ("ok", text) |
    ("status", code) | ("sleep", seconds) | ("broken", body) | ("die", None): the last
    answers 503 and shuts the server down, so later requests are refused.
    ``calls`` counts requests per question; ``auth`` records Authorization headers.
    """

    def __init__(self, rule=None):
        self.rule = rule or default_rule
        self.calls: Counter = Counter()
        self.auth: set = set()
        self.temperatures: list = []
        self.lock = threading.Lock()
        self.stopped = False
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length))
                question = body["messages"][-1]["content"]
                with fake.lock:
                    fake.calls[question] += 1
                    n = fake.calls[question]
                    fake.auth.add(self.headers.get("Authorization"))
                    fake.temperatures.append(body.get("temperature"))
                kind, value = fake.rule(question, n)
                if kind == "die":
                    threading.Thread(target=fake.stop, daemon=True).start()
                    kind, value = "status", 503
                if kind == "sleep":
                    time.sleep(value)
                    kind, value = "ok", "counting"
                if kind == "status":
                    self._send(value, b'{"error": "injected"}')
                elif kind == "broken":
                    self._send(200, value.encode())
                else:
                    reply = {
                        "choices": [{"message": {"role": "assistant", "content": value}}],
                        "usage": {"prompt_tokens": 50, "completion_tokens": 6},
                    }
                    self._send(200, json.dumps(reply).encode())

            def _send(self, code, data):
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and left

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def stop(self) -> None:
        with self.lock:
            if self.stopped:
                return
            self.stopped = True
        self.server.shutdown()
        self.server.server_close()


def default_rule(question: str, n: int):
    return "ok", "object counting, object recognition"
