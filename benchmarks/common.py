"""What the benchmarks share: peak memory sampling, the results table and JSON."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import threading
import time
from pathlib import Path

import numpy as np
import psutil

from engine.quality import markdown_table


class PeakRSS:
    """Samples the RSS of this process and of all its descendants (Ray's processes)."""

    def __init__(self, interval: float = 0.2):
        self.interval, self.driver, self.total = interval, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        me = psutil.Process()
        while not self._stop.is_set():
            try:
                own = me.memory_info().rss
                total = own
                for child in me.children(recursive=True):
                    with contextlib.suppress(psutil.Error):
                        total += child.memory_info().rss
                self.driver, self.total = max(self.driver, own), max(self.total, total)
            except psutil.Error:
                pass
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def timed_cli(argv: list[str]) -> tuple[float, PeakRSS]:
    """Run ``vlselect argv`` in this process: its wall seconds and peak memory.

    Raises:
        RuntimeError: the command exited non-zero (its own message is above).
    """
    from jobs.cli import main as cli

    with PeakRSS() as mem:
        start = time.perf_counter()
        code = cli(argv)
        seconds = time.perf_counter() - start
    if code != 0:
        raise RuntimeError(f"`vlselect {' '.join(argv)}` exited with {code}")
    return seconds, mem


def machine() -> dict:
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
    }


def report(name: str, rows: list[dict], header: list[str], out: str, **extra) -> None:
    """Print ``rows`` as a markdown table and write them, with the machine, as JSON to ``out``."""
    print("\n" + markdown_table(header, [[r.get(h, "") for h in header] for r in rows]))
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"benchmark": name, "machine": machine(), **extra, "rows": rows}
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\nwrote {path}")


def timings(search, queries: np.ndarray, batch: int, stream) -> dict:
    """p50/p99 of one request at a time, and queries/s of ``stream`` over all queries."""
    for i in range(0, min(len(queries), 4 * batch), batch):  # warm-up
        search(queries[i : i + batch])
    latencies = []
    for i in range(0, len(queries), batch):
        start = time.perf_counter()
        search(queries[i : i + batch])
        latencies.append(time.perf_counter() - start)
    start = time.perf_counter()
    answer = stream(queries)
    seconds = time.perf_counter() - start
    return {
        "qps": round(len(queries) / seconds, 1),
        "p50_ms": round(1000 * float(np.percentile(latencies, 50)), 2),
        "p99_ms": round(1000 * float(np.percentile(latencies, 99)), 2),
        "requests": len(latencies),
        "answer": answer,
    }
