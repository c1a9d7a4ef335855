"""Fault injection on this machine: find a Ray worker by its process title and SIGKILL it.

Ray names each worker process ``ray::<actor class or task name>`` (with ``.<method>``
while it runs a call), which the OS shows as the process's command line. Killing the
process, not ``ray.kill``, is what a crash or the OOM killer does: nothing in Ray or in
the worker gets to clean up.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable

import psutil


def ray_worker_pids(title: str) -> list[int]:
    """Pids of live Ray worker processes whose title contains ``title``."""
    pids = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmdline = " ".join(proc.info["cmdline"] or [])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if cmdline.startswith("ray::") and title in cmdline:
            pids.append(proc.info["pid"])
    return pids


def sigkill(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):  # it died on its own in between
            os.kill(pid, signal.SIGKILL)


def wait_for(condition: Callable[[], object], timeout_s: float, what: str) -> object:
    """Poll ``condition`` every 50 ms until it returns something truthy; fail after timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"gave up after {timeout_s:g} s waiting for {what}")
