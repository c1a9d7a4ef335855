"""What every job shares: connecting to Ray, bounded task submission, summaries."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import ray

log = logging.getLogger("vlselect")


_address: str | None = None
_worker_logs = False

# Every worker process of a job runs this first: the same warning filters as the driver.
WORKER_SETUP_HOOK = "engine.warning_filters.install"
WORKER_LOGS_ENV = "VLSELECT_WORKER_LOGS"


def set_address(address: str | None, worker_logs: bool = False) -> None:
    """Remember the CLI's ``--address`` and ``--worker-logs`` for the stage's first ``connect()``."""
    global _address, _worker_logs
    _address = address
    _worker_logs = worker_logs


def quiet_ray_data_console() -> None:
    """Ray Data's console shows warnings and its progress bars, not an INFO line per dataset
    (``jobs/ray_data_logging.yaml``; ``ray-data.log`` keeps them). Takes effect where
    ``ray.data`` is first imported, so the CLI calls it first; a ``RAY_DATA_LOGGING_CONFIG``
    of your own wins."""
    config = os.path.join(os.path.dirname(__file__), "ray_data_logging.yaml")
    os.environ.setdefault("RAY_DATA_LOGGING_CONFIG", config)


def worker_runtime_env() -> dict[str, Any]:
    """The runtime environment ``connect()`` asks for: the warning filters' setup hook, unless
    the submitted job's own runtime environment names a hook (Ray refuses to merge two)."""
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    injected = json.loads(os.environ.get(RAY_JOB_CONFIG_JSON_ENV_VAR) or "{}")
    if (injected.get("runtime_env") or {}).get("worker_process_setup_hook"):
        return {}
    return {"worker_process_setup_hook": WORKER_SETUP_HOOK}


def connect(address: str | None = None) -> None:
    """Join the Ray cluster at ``address`` (or ``--address``, or ``RAY_ADDRESS``), else start a
    local Ray. Stages call it once their input is checked, so bad input never waits on Ray.

    Inside ``ray job submit`` the supervisor sets ``RAY_ADDRESS``, so the job joins
    the cluster it was submitted to. A no-op when Ray is already initialised.

    Workers' stdout and stderr stay in Ray's logs (``ray logs``, the dashboard; locally
    under :func:`worker_log_dir`) rather than on this terminal, which shows the progress
    bars and summaries; ``--worker-logs`` (or ``VLSELECT_WORKER_LOGS=1``) forwards them here.
    """
    if ray.is_initialized():
        return
    address = address or _address or os.environ.get("RAY_ADDRESS") or None
    forward = _worker_logs or os.environ.get(WORKER_LOGS_ENV) == "1"
    ray.init(
        address=address,
        log_to_driver=forward,
        configure_logging=False,
        runtime_env=worker_runtime_env(),
    )


class WorkerProgress:
    """Progress lines from Ray tasks and actors to this terminal, while their whole output
    stays in Ray's logs: the driver makes a queue (``ray.util.queue.Queue``, an actor of no
    CPU), the workers ``put`` one line per step worth telling (``actors.progress.tell``), and a thread here
    prints each as ``stage: line`` until the block ends.

        with WorkerProgress("base") as progress:
            ray.get(task.remote(..., progress=progress.queue))
    """

    def __init__(self, stage: str) -> None:
        from ray.util.queue import Queue

        self.stage = stage
        self.queue = Queue(actor_options={"num_cpus": 0})
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drain, daemon=True, name=f"{stage}-progress")

    def _drain(self) -> None:
        from ray.util.queue import Empty

        while True:
            try:
                line = self.queue.get(timeout=0.5)
            except Empty:
                if self._stop.is_set():
                    return
                continue
            except Exception:  # noqa: BLE001 - the queue's actor died with the job: stop telling
                return
            print(f"  {self.stage}: {line}", flush=True)

    def __enter__(self) -> WorkerProgress:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.queue.shutdown()


def check_workspace_shared(ws) -> None:
    """Refuse a local workspace path that a node of a multi-node cluster cannot see.

    A probe file is written here and looked for from a zero-CPU task pinned to every other
    alive node. Object-store workspaces are reachable by construction; a one-node Ray needs
    nothing.

    Raises:
        InputError: some node does not see the probe (named, with the fix).
    """
    import uuid

    import pyarrow.fs as pafs
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from engine.errors import InputError

    if not isinstance(ws.fs, pafs.LocalFileSystem):
        return
    here = ray.get_runtime_context().get_node_id()
    others = [n for n in ray.nodes() if n["Alive"] and n["NodeID"] != here]
    if not others:
        return
    probe = ws.path(f".vlselect-probe-{uuid.uuid4().hex[:12]}")
    ws.makedirs()
    ws.write_bytes(probe, b"")
    try:
        look = ray.remote(num_cpus=0, max_retries=0)(os.path.exists)
        seen = ray.get([
            look.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
            .remote(probe)
            for n in others
        ])  # fmt: skip
    finally:
        ws.discard(probe)
    blind = [n["NodeManagerAddress"] for n, ok in zip(others, seen, strict=True) if not ok]
    if blind:
        raise InputError(
            f"the workspace {ws.root} is on a disk that {len(blind)} of the cluster's "
            f"{len(others) + 1} nodes cannot see ({', '.join(blind[:5])}): pass --workspace "
            "an object-store URI (s3://bucket/prefix) or a path on a file system every node "
            "mounts"
        )


def worker_log_dir() -> str | None:
    """Where this node's Ray workers write their logs (None before ``connect()``)."""
    if not ray.is_initialized():
        return None
    node = getattr(ray._private.worker.global_worker, "node", None)
    return node.get_logs_dir_path() if node is not None else None


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


@contextmanager
def unwrap_input_errors() -> Iterator[None]:
    """Re-raise a task's InputError as itself: its message, not Ray's traceback around it."""
    from engine.errors import InputError

    try:
        yield
    except ray.exceptions.RayTaskError as err:
        if isinstance(err.cause, InputError):
            raise err.cause from None
        raise


class Timer:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message (and the exception)."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure_logging(level: str = "INFO", fmt: str = "text") -> None:
    """The root logger's level and format: 'text' for people, 'json' for log pipelines."""
    handler = logging.StreamHandler()
    handler.setFormatter(
        JsonFormatter()
        if fmt == "json"
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    # faiss's loader tells at INFO which CPU build it tried: not what a person needs
    logging.getLogger("faiss.loader").setLevel(max(logging.WARNING, logging.root.level))


# Summary keys that count rows; each becomes a sample of vlselect_stage_rows{stage, kind}.
_ROW_COUNTS = ("records_in", "accepted", "rejected", "rows", "vectors", "ok", "failed",
               "generated", "cached", "selected", "spent", "revealed", "rows_assigned")  # fmt: skip
_metrics: dict[str, Any] = {}


def export_stage_metrics(stage: str, summary: dict[str, Any]) -> None:
    """A finished stage's row counts and seconds as Ray metrics (the dashboard's Metrics
    view, Prometheus at each node's metrics export port). A no-op without Ray."""
    if not ray.is_initialized():
        return
    from ray.util.metrics import Counter, Gauge

    if not _metrics:
        _metrics["rows"] = Counter(
            "vlselect_stage_rows", "Rows a finished stage counted, by kind", ("stage", "kind")
        )
        _metrics["seconds"] = Gauge(
            "vlselect_stage_seconds", "Wall time of a stage's last run", ("stage",)
        )
        _metrics["runs"] = Counter("vlselect_stage_runs", "Stage runs finished", ("stage",))
    for kind in _ROW_COUNTS:
        value = summary.get(kind)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            _metrics["rows"].inc(value, tags={"stage": stage, "kind": kind})
    if isinstance(summary.get("seconds"), int | float):
        _metrics["seconds"].set(float(summary["seconds"]), tags={"stage": stage})
    _metrics["runs"].inc(1, tags={"stage": stage})


def print_summary(
    title: str, rows: list[tuple[str, Any]], extra: dict[str, Any] | None = None
) -> None:
    """A short aligned summary block, then one JSON line for machines (grep
    'vlselect-summary'); the counts in ``extra`` also go out as Ray metrics."""
    width = max(len(k) for k, _ in rows)
    print(f"\n== {title} ==")
    for key, value in rows:
        print(f"  {key.ljust(width)}  {value}")
    if extra is not None:
        print("vlselect-summary " + json.dumps({"stage": title, **extra}, default=str))
        export_stage_metrics(title, extra)
