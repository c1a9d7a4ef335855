"""``FakeOpenAI``: a real OpenAI-compatible HTTP server on loopback, answering by rules.

A test peer for the openai backend (stdlib ``http.server`` in a thread, nothing
external): it can answer well, answer garbage, refuse, fail with any status, hang
past the client's timeout, send broken JSON, or die, per question and per call.

As its own process, for fault tests that SIGKILL the server and start it again on the
same port (``--log`` gets one line per question served, so a test can count them)::

    python -m tests.fake_openai --port 8123 --delay 0.05 --log served.txt
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

    def __init__(self, rule=None, port: int = 0):
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

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
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


def serve_forever(port: int, delay_s: float, log_path: str | None) -> None:
    """Answer every question well after ``delay_s``, appending each served one to ``log_path``."""
    log = open(log_path, "a", buffering=1) if log_path else None  # noqa: SIM115 - until killed

    def slow_rule(question: str, n: int):
        time.sleep(delay_s)
        if log:
            log.write(json.dumps(question) + "\n")
        return default_rule(question, n)

    server = FakeOpenAI(slow_rule, port=port)
    print(f"serving {server.base_url}", flush=True)
    server.server.serve_forever()


class FakeOpenAIProcess:
    """``serve_forever`` in a child process: ``kill()`` SIGKILLs it, ``start()`` starts it
    again on the same port, ``served()`` lists every question answered so far."""

    def __init__(self, log_path: str, delay_s: float = 0.0):
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.log_path = log_path
        self.delay_s = delay_s
        self.proc = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> FakeOpenAIProcess:
        import subprocess
        import sys
        import urllib.request

        cmd = [sys.executable, "-m", "tests.fake_openai", "--port", str(self.port)]
        cmd += ["--delay", str(self.delay_s), "--log", self.log_path]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:  # up when a request gets any HTTP answer (GET is not served: 501)
            try:
                urllib.request.urlopen(self.base_url, timeout=1)
            except urllib.error.HTTPError:
                return self
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"fake server on port {self.port} did not start") from None
                time.sleep(0.05)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def served(self) -> list[str]:
        with open(self.log_path) as f:
            return [json.loads(line) for line in f if line.endswith("\n")]

    def __enter__(self) -> FakeOpenAIProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.kill()


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay", type=float, default=0.0, help="seconds before each answer")
    parser.add_argument("--log", help="file that gets one JSON line per question served")
    args = parser.parse_args()
    serve_forever(args.port, args.delay, args.log)
