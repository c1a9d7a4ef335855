"""A real OpenAI-compatible LLM server on loopback, for slow tests.

Starts ``scripts/serve_llm.sh`` (vLLM's CPU build serving the packaged SmolLM2-135M-Instruct) as a
subprocess in its own process group, on a free port of 127.0.0.1, and waits until
``GET /v1/models`` lists the model. No tests here.

    from tests.llm_server import llm_server

    with llm_server() as srv:
        requests.post(f"{srv.base_url}/chat/completions", json={"model": srv.model, ...})
        srv.kill()  # SIGKILL the whole server (API server, engine, worker): a crash
        srv.restart()  # the same port again

Skips (``pytest.skip``) when the server is not installed, naming the install command.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]
SERVE_SCRIPT = ROOT / "scripts" / "serve_llm.sh"
INSTALL_COMMAND = "bash scripts/install_llm_server.sh"
MODEL_NAME = "smollm2-135m-instruct"
# vLLM starts in about 1-2 minutes on 2 idle cores (three Python processes import it); allow for a
# busy machine.
DEFAULT_STARTUP_TIMEOUT_S = float(os.environ.get("VLSELECT_LLM_STARTUP_TIMEOUT", "420"))


def llm_venv() -> Path:
    return Path(os.environ.get("VLSELECT_LLM_VENV", ROOT / ".venv-llm"))


def llm_model_dir() -> Path:
    default = Path.home() / ".cache" / "vlselect" / "smollm2-135m-instruct-hf"
    return Path(os.environ.get("VLSELECT_LLM_DIR", default))


def installed() -> bool:
    return (llm_venv() / "bin" / "python").exists() and (llm_model_dir() / "config.json").exists()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LLMServer:
    """One server process group on 127.0.0.1:port; ``start`` blocks until it answers."""

    def __init__(self, port: int | None = None, startup_timeout: float | None = None):
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.model = MODEL_NAME
        self.startup_timeout = startup_timeout or DEFAULT_STARTUP_TIMEOUT_S
        self.proc: subprocess.Popen | None = None
        self.log_path = Path(tempfile.mkstemp(prefix=f"llm-server-{self.port}-", suffix=".log")[1])
        self.startup_s: float | None = None
        self._shm_files: set[str] = set()

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def start(self) -> LLMServer:
        if not installed():
            pytest.skip(
                f"no LLM server installed ({llm_venv()}, {llm_model_dir()}): run {INSTALL_COMMAND}"
            )
        if self.running:
            raise RuntimeError(f"LLM server already running on port {self.port}")
        with self.log_path.open("ab") as log:
            log.write(f"\n==== start on port {self.port} at {time.ctime()} ====\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                ["bash", str(SERVE_SCRIPT), str(self.port)],
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: kill() takes every process
            )
        self._wait_ready()
        return self

    def _models(self, timeout: float = 5.0) -> list[str] | None:
        try:
            with urllib.request.urlopen(f"{self.base_url}/models", timeout=timeout) as r:
                return [m["id"] for m in json.load(r)["data"]]
        except (OSError, ValueError, KeyError):
            return None

    def _wait_ready(self) -> None:
        t0 = time.monotonic()
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"LLM server exited with code {self.proc.returncode} before answering "
                    f"(log {self.log_path}):\n{self.log_tail()}"
                )
            models = self._models()
            if models is not None:
                if self.model not in models:
                    self.stop()
                    raise RuntimeError(f"LLM server serves {models}, not {self.model}")
                self.startup_s = time.monotonic() - t0
                self._shm_files = self._group_shm_files()
                return
            if time.monotonic() - t0 > self.startup_timeout:
                self.stop()
                raise TimeoutError(
                    f"LLM server did not answer GET {self.base_url}/models within "
                    f"{self.startup_timeout:.0f} s (log {self.log_path}):\n{self.log_tail()}"
                )
            time.sleep(0.5)

    def _signal_group(self, sig: int) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)

    def _group_processes(self) -> list[psutil.Process]:
        if self.proc is None:
            return []
        procs = []
        for p in psutil.process_iter():
            with contextlib.suppress(psutil.Error, OSError):
                if os.getpgid(p.pid) == self.proc.pid and p.status() != psutil.STATUS_ZOMBIE:
                    procs.append(p)
        return procs

    def _group_shm_files(self) -> set[str]:
        """The /dev/shm files (vLLM's shared-memory queues, semaphores) the server has mapped."""
        files: set[str] = set()
        for p in self._group_processes():
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{p.pid}/maps").read_text().splitlines():
                    path = line.split(maxsplit=5)[-1]
                    if path.startswith("/dev/shm/"):
                        files.add(path.removesuffix(" (deleted)"))
        return files

    def _group_alive(self) -> bool:
        """Whether a live (not zombie) process of the server's group remains."""
        return bool(self._group_processes())

    def _wait_port_closed(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.settimeout(1.0)
                if s.connect_ex((self.host, self.port)) != 0:
                    return
            time.sleep(0.2)

    def kill(self) -> None:
        """SIGKILL the whole process group, with no chance to clean up: a crash."""
        if self.proc is None:
            return
        self._signal_group(signal.SIGKILL)
        self.proc.wait()
        self._wait_port_closed()
        # A killed vLLM leaves its shared-memory segments behind: remove the ones it had mapped.
        for path in self._shm_files:
            with contextlib.suppress(OSError):
                os.unlink(path)
        self._shm_files = set()

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (vLLM shuts its engine down), SIGKILL whatever is left after ``timeout``."""
        if self.proc is None:
            return
        deadline = time.monotonic() + timeout
        if self.proc.poll() is None:
            self._signal_group(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=timeout)
        # The engine and worker processes finish their own shutdown after the API server exits;
        # whatever of the group is still alive at the deadline gets SIGKILL.
        while self._group_alive() and time.monotonic() < deadline:
            time.sleep(0.2)
        self._signal_group(signal.SIGKILL)
        self.proc.wait()
        self._wait_port_closed()

    def restart(self) -> LLMServer:
        """Start again on the same port (after ``kill`` or ``stop``, or stopping it first)."""
        self.stop()
        return self.start()

    def __enter__(self) -> LLMServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@contextlib.contextmanager
def llm_server(
    port: int | None = None, startup_timeout: float | None = None
) -> Iterator[LLMServer]:
    """Start a server (skip if not installed), yield it, stop it."""
    server = LLMServer(port=port, startup_timeout=startup_timeout)
    server.start()
    try:
        yield server
    finally:
        server.stop()
