"""What every job shares: connecting to Ray, bounded task submission, summaries."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import ray

log = logging.getLogger("vlselect")


_address: str | None = None


def set_address(address: str | None) -> None:
    """Remember the CLI's ``--address`` for the stage's first ``connect()``."""
    global _address
    _address = address


def connect(address: str | None = None) -> None:
    """Join the Ray cluster at ``address`` (or ``--address``, or ``RAY_ADDRESS``), else start a
    local Ray. Stages call it once their input is checked, so bad input never waits on Ray.

    Inside ``ray job submit`` the supervisor sets ``RAY_ADDRESS``, so the job joins
    the cluster it was submitted to. A no-op when Ray is already initialised.
    """
    if ray.is_initialized():
        return
    address = address or _address or os.environ.get("RAY_ADDRESS") or None
    ray.init(address=address, log_to_driver=True, configure_logging=False)


def cluster_cpus() -> int:
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def bounded_submit(
    submit: Callable[[Any], ray.ObjectRef],
    work: Iterable[Any],
    max_in_flight: int,
) -> Iterator[Any]:
    """Submit ``submit(item)`` for each item with at most ``max_in_flight`` pending; yield results.

    Results come back in completion order. Backpressure keeps the driver's memory
    bounded however long ``work`` is: it is consumed only as results drain.
    """
    pending: list[ray.ObjectRef] = []
    for item in work:
        pending.append(submit(item))
        if len(pending) >= max_in_flight:
            done, pending = ray.wait(pending, num_returns=1)
            yield ray.get(done[0])
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        yield ray.get(done[0])


class Timer:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start


def print_summary(
    title: str, rows: list[tuple[str, Any]], extra: dict[str, Any] | None = None
) -> None:
    """A short aligned summary block, then one JSON line for machines (grep 'vlselect-summary')."""
    width = max(len(k) for k, _ in rows)
    print(f"\n== {title} ==")
    for key, value in rows:
        print(f"  {key.ljust(width)}  {value}")
    if extra is not None:
        print("vlselect-summary " + json.dumps({"stage": title, **extra}, default=str))
