"""What the benchmarks share: peak memory sampling, the results table and JSON."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import threading
from pathlib import Path

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
