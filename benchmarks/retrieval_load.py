"""Retrieval under load: several client processes stream queries at the service for T seconds.

A Flat index of ``--rows`` x ``--dim`` unit vectors (``vlselect index --shards N``) is
served by named shard actors (``RetrievalService.start`` with ``name``). ``--clients``
separate OS processes (multiprocessing spawn) each join the same local Ray cluster as a
driver of their own (``ray.init(address=...)``), find the shards with
``RetrievalService.connect`` and, once all are ready, send one request (``--batch``
queries, top ``--k``) after another for ``--seconds``. Every client times each request,
counts errors, and checks every ``--check-every``-th answer against one in-process
``faiss.IndexFlatIP`` over the same vectors searched with the same batch: a Flat service
answers bit-equal to it (the same float32 scores and the same ids; ties may swap places).

Meanwhile this process samples, every 0.5 s, the RSS of every shard actor's process, of
the raylet (which holds the object store) and of each client. Memory is *flat* when no
process grows by more than ``GROWTH_BOUND_MIB`` between the end of the warm-up (the
first quarter of the run, when workers allocate their buffers) and the end of the run,
both read as the median of 2 s of samples so that one request's transient buffers do not
count. Why 10 MiB: a steady process here wanders by about 1 MiB over a run (allocator
arenas, Python's free lists); 10 MiB is ten times that and 5% of a shard worker's
~200 MiB, and a leak of 10 KB a request (keeping one answer's ids) passes it after
about 1,000 requests (the test's 12 s run serves ~1,500). Longer runs see smaller leaks.

Latency is one request's, as its client sees it: send, every shard searches, merge.
Local Ray listens on 127.0.0.1, so every byte between clients and shards is loopback.

    python benchmarks/retrieval_load.py        # 100k x 128, 2 shards, 4 clients, 120 s: ~2.5 min on 2 cores
    RAY_ADDRESS=auto python benchmarks/retrieval_load.py --seconds 600
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine, report  # noqa: E402
from benchmarks.retrieval import mixture  # noqa: E402
from engine.quality import markdown_table  # noqa: E402

SPACE = "clip"
GROWTH_BOUND_MIB = 10.0
WARMUP_SHARE = 0.25
WINDOW_S = 2.0
QUERIES_PER_CLIENT = 4096


@dataclass
class Load:
    """One load run: the index, the service's shards and the clients' stream."""

    rows: int = 100_000
    dim: int = 128
    shards: int = 2
    clients: int = 4
    seconds: float = 120.0
    batch: int = 32
    k: int = 10
    check_every: int = 4
    centres: int = 2000
    spread: float = 1.5
    shard_cpus: float = 1.0
    threads: int = 1


def prepare(workdir: Path, load: Load) -> Path:
    """The workspace with a Flat index of ``load``'s vectors, reused when it matches."""
    from jobs.cli import main as cli
    from tests.synthetic_space import write_space

    stamp = {k: getattr(load, k) for k in ("rows", "dim", "shards", "centres", "spread")}
    ws, done = workdir / "ws", workdir / "data.json"
    if done.exists() and json.loads(done.read_text()) == stamp:
        return ws
    shutil.rmtree(workdir, ignore_errors=True)
    x, _ = mixture(load.rows, 0, load.dim, load.centres, load.spread)
    write_space(ws, SPACE, x, files=8)  # its pool holds the rows in this order
    np.save(workdir / "vectors.npy", x)
    argv = ["index", "--workspace", str(ws), "--space", SPACE, "--shards", str(load.shards)]
    assert cli([*argv, "--set", f"task.num_cpus={load.shard_cpus}"]) == 0, "index build failed"
    done.write_text(json.dumps(stamp))
    return ws


def same_answer(got_ids, got_scores, want_ids, want_scores) -> bool:
    """Bit-equal scores, and per query the same (score, row) pairs (tied rows may swap)."""
    if not np.array_equal(got_scores, want_scores):
        return False
    return all(
        sorted(zip(s.tolist(), a.tolist(), strict=True))
        == sorted(zip(s.tolist(), b.tolist(), strict=True))
        for s, a, b in zip(want_scores, got_ids, want_ids, strict=True)
    )


def run_client(c: int, spec: dict, barrier, out: str) -> None:
    """One client process: connect, warm up, wait for the others, then stream for T s."""
    import faiss
    import ray

    from actors.retrieval import RetrievalService, ServiceConfig
    from engine.workspace import Workspace

    faiss.omp_set_num_threads(1)  # the clients' own checks must not crowd out the shards
    work, load = Path(spec["workdir"]), Load(**spec["load"])
    x = np.load(work / "vectors.npy", allow_pickle=False)
    queries = np.load(work / "queries.npy", allow_pickle=False)[c :: load.clients]
    exact = faiss.IndexFlatIP(load.dim)
    exact.add(x)
    del x
    ray.init(address=spec["address"], log_to_driver=False, configure_logging=False)
    cfg = ServiceConfig(batch_size=load.batch, max_in_flight=1)
    service = RetrievalService.connect(Workspace.open(spec["ws"]), SPACE, spec["name"], cfg)
    service.search(queries[: load.batch], load.k)  # handles and connections, not timed
    barrier.wait(timeout=300)

    latencies, errors, messages, checked, mismatched = [], 0, [], 0, 0
    start = time.perf_counter()
    n = len(queries) // load.batch
    while time.perf_counter() - start < load.seconds:
        i = len(latencies) + errors
        batch = queries[(i % n) * load.batch : (i % n + 1) * load.batch]
        t = time.perf_counter()
        try:
            got_ids, got_scores = service.search(batch, load.k)
        except Exception as err:  # noqa: BLE001 - counted: the load must see none
            errors += 1
            messages.append(f"{type(err).__name__}: {err}"[:500])
            continue
        latencies.append(time.perf_counter() - t)
        if i % load.check_every == 0:
            want_scores, labels = exact.search(batch, load.k)
            checked += 1
            mismatched += not same_answer(got_ids, got_scores, labels, want_scores)
    result = {"client": c, "pid": os.getpid(), "seconds": time.perf_counter() - start}
    result["latencies_ms"] = [round(1000 * s, 3) for s in latencies]
    result |= {"errors": errors, "error_messages": messages[:5]}
    Path(out).write_text(json.dumps(result | {"checked": checked, "mismatched": mismatched}))
    ray.shutdown()


def _client_main(c: int, spec: dict, barrier, out: str) -> None:
    try:
        run_client(c, spec, barrier, out)
    except BaseException:
        barrier.abort()  # the others and the driver stop waiting for this one
        Path(out).with_suffix(".err").write_text(traceback.format_exc())
        raise


class RSSSampler(threading.Thread):
    """RSS series (seconds since ``start()``, MiB) of named pids, sampled every ``interval``."""

    def __init__(self, pids: dict[str, int], interval: float = 0.5):
        super().__init__(daemon=True)
        self.pids, self.interval, self.halt = pids, interval, threading.Event()
        self.series: dict[str, list[tuple[float, float]]] = {name: [] for name in pids}

    def run(self) -> None:
        t0, procs = time.perf_counter(), {n: psutil.Process(p) for n, p in self.pids.items()}
        while not self.halt.is_set():
            for name, proc in procs.items():
                try:
                    rss = proc.memory_info().rss / 2**20
                except psutil.Error:
                    continue
                self.series[name].append((time.perf_counter() - t0, rss))
            self.halt.wait(self.interval)


def memory_row(name: str, pid: int, samples: list, seconds: float) -> dict:
    """Start, after warm-up, end, peak, the growth in between and the second half's slope."""
    t, m = (np.array(v) for v in zip(*[s for s in samples if s[0] <= seconds], strict=True))
    warm = WARMUP_SHARE * seconds
    after = float(np.median(m[(t >= warm) & (t <= warm + WINDOW_S)]))
    end = float(np.median(m[t >= t[-1] - WINDOW_S]))
    half = t >= seconds / 2
    slope = float(np.polyfit(t[half], m[half], 1)[0]) * 60 if half.sum() >= 3 else float("nan")
    return {
        "process": name,
        "pid": pid,
        "start_mib": round(float(m[0]), 1),
        "after_warmup_mib": round(after, 1),
        "end_mib": round(end, 1),
        "peak_mib": round(float(m.max()), 1),
        "growth_mib": round(end - after, 1),
        "growth_pct": round(100 * (end - after) / after, 2),
        "slope_mib_per_min": round(slope, 2),
        "samples": len(m),
    }


def raylet_pid() -> int | None:
    """The pid of this node's raylet (it hosts the object store), found by its socket."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    socket = next(n["RayletSocketName"] for n in ray.nodes() if n["NodeID"] == node)
    for proc in psutil.process_iter(["name", "cmdline"]):
        if proc.info["name"] == "raylet" and f"--raylet_socket_name={socket}" in (
            proc.info["cmdline"] or []
        ):
            return proc.pid
    return None


def run_load(workdir: Path, ws: Path, load: Load, address: str) -> dict:
    """Start the named service, run the clients against it, and gather what they measured."""
    import ray

    from actors.retrieval import RetrievalService, ServiceConfig
    from engine.workspace import Workspace

    _, queries = mixture(
        load.rows, load.clients * QUERIES_PER_CLIENT, load.dim, load.centres, load.spread
    )
    np.save(workdir / "queries.npy", queries)
    name = f"load-{os.getpid()}"
    cfg = ServiceConfig(
        batch_size=load.batch,
        max_concurrency=max(4, load.clients),
        shard={"num_cpus": load.shard_cpus, "max_retries": -1},
        threads=load.threads,
        name=name,
    )
    spec = {"workdir": str(workdir), "ws": str(ws), "address": address, "name": name}
    spec["load"] = asdict(load)
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(load.clients + 1)
    outs = [workdir / f"client-{c}.json" for c in range(load.clients)]
    for out in outs:
        out.unlink(missing_ok=True)
    with RetrievalService.start(Workspace.open(str(ws)), SPACE, cfg) as service:
        before = service.shard_info()
        here = ray.get_runtime_context().get_node_id()
        pids = {f"shard {i['shard']}": i["pid"] for i in before if i["node"] == here}
        if (raylet := raylet_pid()) is not None:
            pids["raylet"] = raylet
        procs = [
            ctx.Process(target=_client_main, args=(c, spec, barrier, str(outs[c])))
            for c in range(load.clients)
        ]
        for p in procs:
            p.start()
        pids |= {f"client {c}": p.pid for c, p in enumerate(procs)}
        sampler = RSSSampler(pids)
        try:
            barrier.wait(timeout=300)
            sampler.start()
        except threading.BrokenBarrierError:
            pass  # a client failed before the load began: its .err file says why
        finally:
            for p in procs:
                p.join(timeout=load.seconds + 300)
                if p.is_alive():
                    p.kill()
            sampler.halt.set()
            if sampler.is_alive():
                sampler.join()
        after = service.shard_info()
    clients = []
    for c, (p, out) in enumerate(zip(procs, outs, strict=True)):
        if out.exists():
            clients.append(json.loads(out.read_text()))
        else:
            err = out.with_suffix(".err")
            why = err.read_text()[-2000:] if err.exists() else f"exit code {p.exitcode}"
            clients.append({"client": c, "failed": why, "latencies_ms": [], "errors": 1})
    restarted = [
        a["shard"]
        for a, b in zip(after, before, strict=True)
        if a["restarted"] or a["pid"] != b["pid"]
    ]
    memory = [memory_row(n, pids[n], s, load.seconds) for n, s in sampler.series.items() if s]
    return summarize(load, clients, memory, restarted)


def summarize(load: Load, clients: list[dict], memory: list[dict], restarted: list) -> dict:
    lat = np.concatenate([np.array(c["latencies_ms"], dtype=float) for c in clients])
    seconds = max((c.get("seconds", 0.0) for c in clients), default=0.0)
    pct = {f"p{p}_ms": round(float(np.percentile(lat, p)), 2) for p in (50, 90, 99) if len(lat)}
    summary = {
        "clients": load.clients,
        "shards": load.shards,
        "index": f"Flat {load.rows:,} x {load.dim}",
        "batch": load.batch,
        "k": load.k,
        "seconds": round(seconds, 1),
        "requests": len(lat),
        "queries": len(lat) * load.batch,
        "errors": sum(c["errors"] for c in clients),
        "checked": sum(c.get("checked", 0) for c in clients),
        "mismatched": sum(c.get("mismatched", 0) for c in clients),
        "queries_per_s": round(len(lat) * load.batch / seconds, 1) if seconds else 0.0,
        **(pct or dict.fromkeys(("p50_ms", "p90_ms", "p99_ms"))),
        "max_ms": round(float(lat.max()), 2) if len(lat) else None,
        "restarted_shards": restarted,
    }
    per_client = [
        {k: v for k, v in c.items() if k != "latencies_ms"} | {"requests": len(c["latencies_ms"])}
        for c in clients
    ]
    return {"summary": summary, "memory": memory, "clients": per_client}


def failures(result: dict, bound_mib: float = GROWTH_BOUND_MIB) -> list[str]:
    """What broke the guarantee (empty: none): errors, wrong answers, idle clients, growth."""
    s, out = result["summary"], []
    if s["errors"]:
        out.append(f"{s['errors']} failed requests")
    if s["mismatched"]:
        out.append(f"{s['mismatched']} of {s['checked']} checked answers differ from exact faiss")
    if not s["checked"]:
        out.append("no answer was checked")
    out += [
        f"client {c['client']} answered no request: {c.get('failed', '')}"
        for c in result["clients"]
        if not c["requests"]
    ]
    if s["restarted_shards"]:
        out.append(f"shards {s['restarted_shards']} restarted during the load")
    ordered = [s["p50_ms"], s["p90_ms"], s["p99_ms"], s["max_ms"]]
    if None in ordered or ordered != sorted(ordered):
        out.append(f"latency percentiles missing or out of order: {ordered}")
    out += [
        f"{m['process']} grew {m['growth_mib']} MiB after warm-up (bound {bound_mib})"
        for m in result["memory"]
        if not m["growth_mib"] <= bound_mib
    ]
    return out


SUMMARY = ["clients", "shards", "index", "batch", "k", "seconds", "requests", "queries"]
SUMMARY += ["errors", "mismatched", "checked", "queries_per_s", "p50_ms", "p90_ms", "p99_ms"]
SUMMARY += ["max_ms"]
MEMORY = ["process", "start_mib", "after_warmup_mib", "end_mib", "peak_mib", "growth_mib"]
MEMORY += ["growth_pct", "slope_mib_per_min"]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    d = Load()
    for flag in ("rows", "dim", "shards", "clients", "batch", "k", "check_every", "threads"):
        parser.add_argument(f"--{flag.replace('_', '-')}", type=int, default=getattr(d, flag))
    parser.add_argument("--seconds", type=float, default=d.seconds)
    parser.add_argument("--shard-cpus", type=float, default=d.shard_cpus)
    parser.add_argument("--workdir", default="/tmp/vlselect-bench-retrieval-load")
    parser.add_argument("--out", default="benchmarks/results/retrieval_load.json")
    args = parser.parse_args()
    import ray

    load = Load(**{f: getattr(args, f) for f in asdict(d) if hasattr(args, f)})
    local = {"num_cpus": os.cpu_count() or 2, "include_dashboard": False}
    local["_node_ip_address"] = "127.0.0.1"  # clients and shards talk over loopback only
    ray.init(
        log_to_driver=False,
        configure_logging=False,
        **({} if os.environ.get("RAY_ADDRESS") else local),
    )
    workdir = Path(args.workdir)
    ws = prepare(workdir, load)
    result = run_load(workdir, ws, load, ray.get_runtime_context().gcs_address)
    broken = failures(result)
    report(
        "retrieval_load",
        [result["summary"]],
        SUMMARY,
        args.out,
        load=asdict(load),
        growth_bound_mib=GROWTH_BOUND_MIB,
        memory=result["memory"],
        clients=result["clients"],
        failures=broken,
    )
    memory = markdown_table(MEMORY, [[m[h] for h in MEMORY] for m in result["memory"]])
    summary, m = markdown_table(SUMMARY, [[result["summary"][h] for h in SUMMARY]]), machine()
    print("\n" + memory)
    Path(args.out).with_suffix(".md").write_text(
        f"# Retrieval under load\n\n{time.strftime('%Y-%m-%d')}, {m['cpus']} CPUs, "
        f"{m['memory_gib']} GiB; `python benchmarks/retrieval_load.py` {' '.join(sys.argv[1:])}"
        f"\n\n{summary}\n\nRSS of each process (MiB); growth: end minus after warm-up "
        f"(bound {GROWTH_BOUND_MIB} MiB); slope over the second half.\n\n{memory}\n\n"
        f"failures: {'; '.join(broken) or 'none'}\n"
    )
    print("failures:", "; ".join(broken) or "none")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
