"""A worker's progress line, sent to the driver's terminal on purpose (the rest of a worker's
output stays in Ray's logs): the queue is ``jobs.runtime.WorkerProgress``'s."""

from __future__ import annotations

from typing import Any


def tell(progress: Any, line: str) -> None:
    """``line`` to the driver's ``WorkerProgress`` queue (``progress``; None when the caller
    has none) and to this worker's own log."""
    print(line, flush=True)
    if progress is not None:
        progress.put_nowait(line)
