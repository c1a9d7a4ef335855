"""Every stage at two pool sizes on this machine: wall time, rows/s, and the peak memory of
the driver and of every Ray process, with the growth from the smaller size to the larger.

    python benchmarks/scale.py --sizes 100000,1000000 [--stages world,ingest,...]

Each stage is the real ``vlselect`` command, run in its own process (``python -m
jobs.cli``) on one workspace per size, so a stage's driver peak is its own and not what
an earlier stage left: ``driver_peak_mib`` samples that process, ``all_peak_mib`` it and
every process under it (the local Ray it starts: raylet, GCS, workers, actors).

Stages, in order (each reads what the ones before wrote):

============  ============================================================================
world         ``vlselect world``: the pool, and one held-out benchmark of ``--questions``
              samples leaning on the rare snow concept (the targeted case that may not
              fill its budget inside its neighbourhood)
ingest        ``vlselect ingest``
embed:clip    ``vlselect embed --spaces clip`` (tiny open_clip tower)
embed:dino    ``vlselect embed --spaces dino`` (tiny DINO)
embed:text    ``vlselect embed --spaces text`` on a world of ``--text-rows`` rows only
              (MiniLM on 2 cores runs ~180 rows/s); its rows/s is reported at that
              size and the report says so
skills        ``vlselect skills`` with every answer already cached: what is measured is
              the stage's own path at pool scale (keys of every row, the cache join, the
              assembly, the skill space's embedding); the LLM's throughput is
              ``benchmarks/skills_throughput.py``'s. The cache is filled beforehand with
              one description per question family, outside the timing.
index:*       ``vlselect index`` of the clip and skill spaces (IVF, 2 shards)
cluster:K     ``vlselect cluster`` on dino at K=1000 and K=5000
target        ``vlselect target``: the benchmark's questions, a budget of 20% of the pool
warmup        PROGRESS's warm-up selection (``jobs.progress_warmup``) of 9% of the pool
              over cluster:5000: features by shard, Ray Data's shuffle by cluster, a task
              per cluster, the quotas' heads read back
progress      the coordinator actor over cluster:5000 (``actors.coordinator``): a 9%
              warm-up, then rounds of 7,500 picks to a 20% budget, each ``next_round``
              with its reveal (the rows read from the pool) and checkpoint, and each
              ``report``; ``seconds`` is their sum, ``round_max_ms`` the slowest round,
              ``select_max_ms`` the slowest draw alone (the actor's own timing)
============  ============================================================================

Beside its stage, embed:dino, embed:clip and embed:text run the same model's bare loop in
one process (``--reference-rows`` rows) and cluster:1000 direct ``faiss.Kmeans`` with the
job's sample and iterations: ``ratio_to_bare`` is the job's rows/s over the loop's (k-means:
the job's seconds over faiss's; ``passes_ratio_to_bare`` its read, fit and assignment passes
alone, without the process's and Ray's start). ``--keep`` reruns some stages on the
workspaces an earlier run left and replaces only their rows. The retrieval targets come
from ``benchmarks/retrieval.py``'s own 1M-row run (``--retrieval``).

Writes ``--out`` (JSON: ``rows`` of ``{stage, n, seconds, rows_per_s, driver_peak_mib,
all_peak_mib, ...}`` and ``targets`` of ``{name, value, target, met}``), the markdown
table beside it and a plot of seconds and driver peak against N.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.scale_report import write  # noqa: E402

STAGES = ("world", "ingest", "embed:clip", "embed:dino", "embed:text", "skills", "index:clip",
          "index:skill", "cluster:1000", "cluster:5000", "target", "warmup", "progress")  # fmt: skip
BENCH = "bench_rare_snow"
ROUND = 7_500


def measure(cmd: list[str], log: Path, interval: float = 0.25) -> dict:
    """Run ``cmd`` in its own process: wall seconds, its peak RSS and that of it and every
    descendant together (MiB). Raises RuntimeError naming the log on failure."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with log.open("a") as out:
        out.write(f"\n$ {' '.join(cmd)}\n")
        out.flush()
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        me, driver, total = psutil.Process(proc.pid), 0, 0
        while proc.poll() is None:
            try:
                own = me.memory_info().rss
                every = own + sum(_rss(c) for c in me.children(recursive=True))
                driver, total = max(driver, own), max(total, every)
            except psutil.Error:
                pass
            time.sleep(interval)
        seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` exited {proc.returncode}: see {log}")
    return {"seconds": round(seconds, 2), "driver_peak_mib": round(driver / 2**20),
            "all_peak_mib": round(total / 2**20)}  # fmt: skip


def _rss(p) -> int:
    try:
        return p.memory_info().rss
    except psutil.Error:
        return 0


def run_stage(argv: list[str], log: Path) -> dict:
    """``vlselect argv`` in its own process, measured."""
    return measure([sys.executable, "-m", "jobs.cli", *argv], log)


def world_args(ws: Path, n: int, questions: int) -> list[str]:
    bench = (f"[{{name: {BENCH}, size: {questions}, leans_on: concept, domains: {{snow: 1.0}}, "
             f"description: 'rare concept, scale benchmark'}}]")  # fmt: skip
    return ["world", "--out", str(ws), "--size", str(n), "--seed", "0",
            "--set", "test_size=0", "--set", f"benchmarks={bench}"]  # fmt: skip


def fill_skill_cache(ws: Path) -> int:
    """One cached description per question family, for every question of the pool and
    the benchmark (outside the timing; the LLM is benchmarks/skills_throughput.py's)."""
    import pyarrow.parquet as pq

    from engine.artifacts import Pool, World
    from engine.text import instruction_text
    from engine.workspace import Workspace
    from tests.jobs.test_target_job import cache_skills

    w = Workspace.open(str(ws))
    questions = set()
    for f in Pool.open(w).shards:
        for turns in pq.read_table(f, columns=["conversations"]).column(0).to_pylist():
            questions.add(instruction_text(turns))
    bench = World.open(w).benchmark(BENCH)
    for turns in pq.read_table(bench, columns=["conversations"]).column(0).to_pylist():
        questions.add(instruction_text(turns))
    cache_skills(ws, sorted(questions))
    return len(questions)


def progress_rounds(ws: Path, out: Path) -> dict:
    """The coordinator actor over cluster:5000: warm-up, then every round to 20% of the
    pool, with synthetic per-cluster scores; run in its own process by ``run_stage``."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    from actors.coordinator import start_coordinator
    from engine.artifacts import Clustering, Pool
    from engine.coordinator import BASELINE
    from engine.resources import Resources
    from engine.selection_rule import ProgressSettings, SelectionRule
    from engine.workspace import Workspace

    w = Workspace.open(str(ws))
    clustering, pool = Clustering.open(w, "k5000"), Pool.open(w)
    n, k = pool.rows, clustering.meta.k
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    settings = ProgressSettings(budget=n // 5, round_size=ROUND, seed=0,
                                rule=SelectionRule(metric="accuracy"))  # fmt: skip
    run_dir = w.path("progress", "scale")
    shutil.rmtree(run_dir, ignore_errors=True)
    actor = start_coordinator(w, run_dir, clustering, pool, settings, "scale-coordinator",
                              Resources(num_cpus=0.5, max_retries=0))  # fmt: skip
    rng = np.random.default_rng(0)
    skill = rng.uniform(0.2, 0.8, k)
    ray.get(actor.status.remote())  # the actor is up: its start is not a round
    every = pa.concat_arrays([pq.read_table(f, columns=["id"]).column("id").combine_chunks()
                              for f in clustering.assignments])  # fmt: skip
    pick = np.sort(rng.choice(len(every), size=int(0.09 * len(every)), replace=False))
    warm = every.take(pa.array(pick)).to_pylist()
    timings = {"warmup": 0.0, "rounds": [], "reports": [], "selects": []}
    a = time.perf_counter()
    ray.get(actor.warmup.remote(warm))
    timings["warmup"] = time.perf_counter() - a
    t = BASELINE
    while True:
        ids = ray.get(actor.eval_ids.remote(t))
        labels = np.asarray(ray.get(actor.labels_of.remote(ids)), np.int64)
        right = rng.random(len(ids)) < np.clip(skill + 0.02 * rng.standard_normal(k), 0, 1)[labels]
        a = time.perf_counter()
        ray.get(actor.report.remote(t, right.astype(float).tolist(), None))
        timings["reports"].append(time.perf_counter() - a)
        t = 0 if t == BASELINE else t + 1
        if t == 0:
            continue  # round 0 is the warm-up, already revealed
        a = time.perf_counter()
        got = ray.get(actor.next_round.remote(t))
        if got["rows"] == 0:
            break
        timings["rounds"].append(time.perf_counter() - a)
        # The draw alone, as the actor timed it: Δk, softmax, quotas, the draw, the ledger
        timings["selects"].append(got["select_s"])
    out.write_text(json.dumps(timings))
    return timings


def warmup_selection(ws: Path) -> None:
    """The warm-up selection of 9% of the pool over cluster:5000, as ``vlselect progress``
    runs it; run in its own process by ``measure``."""
    import ray

    from engine.artifacts import Pool
    from engine.progress_config import ProgressConfig
    from engine.workspace import Workspace
    from jobs.progress_warmup import select_warmup_ids

    w = Workspace.open(str(ws))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    cfg = ProgressConfig(name="scale", warmup_clusters="k5000")
    total = int(0.09 * Pool.open(w).rows)
    picked = select_warmup_ids(cfg, w, total)
    if len(picked) != total or len(set(picked)) != total:
        raise RuntimeError(f"the warm-up picked {len(picked)} rows ({len(set(picked))} distinct) "
                           f"of {total}")  # fmt: skip


def sizes_of(text: str) -> list[int]:
    return [int(float(s)) for s in text.split(",") if s]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--questions", type=int, default=10_000)
    parser.add_argument("--text-rows", type=int, default=20_000)
    parser.add_argument("--workdir", default="/tmp/vlselect-scale")
    parser.add_argument("--out", default="benchmarks/results/scale.json")
    parser.add_argument("--reference-rows", type=int, default=20_000,
                        help="rows the bare embedding loops run on")  # fmt: skip
    parser.add_argument("--retrieval", default="benchmarks/results/retrieval_1m.json",
                        help="benchmarks/retrieval.py's JSON whose targets join this table")  # fmt: skip
    parser.add_argument("--repeat", type=int, default=2,
                        help="runs of cluster:1000 and of its faiss reference; the fastest counts")  # fmt: skip
    parser.add_argument("--note", default="",
                        help="provenance written into the JSON and markdown: which rows come "
                        "from which run (with --keep, rows of earlier runs stay)")  # fmt: skip
    parser.add_argument("--keep", action="store_true",
                        help="rerun --stages on the workspaces an earlier run left (no world "
                        "stage), replacing their rows in --out and keeping the others")  # fmt: skip
    parser.add_argument("--progress-only", help=argparse.SUPPRESS)  # the progress stage's process
    parser.add_argument("--warmup-only", help=argparse.SUPPRESS)  # the warm-up stage's process
    args = parser.parse_args()
    if args.warmup_only:
        warmup_selection(Path(args.warmup_only))
        return
    if args.progress_only:
        ws, out = args.progress_only.split(",")
        progress_rounds(Path(ws), Path(out))
        return
    stages = args.stages.split(",")
    if unknown := sorted(set(stages) - set(STAGES)):
        parser.error(f"unknown stages {unknown}; the stages are {', '.join(STAGES)}")
    out = Path(args.out)
    rows: list[dict] = []
    if args.keep:
        if "world" in stages:
            parser.error("--keep reruns stages on kept workspaces: leave world out of --stages")
        rerun = {(s, n) for s in stages for n in sizes_of(args.sizes)}
        rows = [r for r in json.loads(out.read_text())["rows"] if (r["stage"], r["n"]) not in rerun]
    for n in sizes_of(args.sizes):
        root = Path(args.workdir) / f"n{n}"
        if args.keep:
            if not (root / "ws").is_dir():
                parser.error(f"--keep: no workspace at {root / 'ws'} from an earlier run")
        else:
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir(parents=True)
        fresh = run_size(root, n, stages, args)
        rows = sorted(rows + fresh, key=lambda r: (r["n"], STAGES.index(r["stage"])))
        write(out, rows, args)  # what is done is kept


def run_size(root: Path, n: int, stages: list[str], args) -> list[dict]:
    ws, log = root / "ws", root / "stages.log"
    w = ["--workspace", str(ws)]
    rows = []

    def add(stage: str, measured: dict, rows_done: int, **extra) -> None:
        row = {"stage": stage, "n": n, **measured,
               "rows_per_s": round(rows_done / measured["seconds"], 1), **extra}  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)

    commands = {
        "world": world_args(ws, n, args.questions),
        "ingest": ["ingest", *w, "--set", "overwrite=true"],
        "embed:clip": ["embed", *w, "--spaces", "clip", "--set", "overwrite=true"],
        "embed:dino": ["embed", *w, "--spaces", "dino", "--set", "overwrite=true"],
        "index:clip": ["index", *w, "--space", "clip", "--shards", "2", "--factory",
                       "IVF1024,Flat"],
        "index:skill": ["index", *w, "--space", "skill", "--shards", "2", "--factory",
                        "IVF256,Flat"],
        "cluster:1000": ["cluster", *w, "--name", "k1000", "--spaces", "dino", "--k", "1000",
                         "--set", "overwrite=true"],
        "cluster:5000": ["cluster", *w, "--name", "k5000", "--spaces", "dino", "--k", "5000",
                         "--set", "overwrite=true"],
        "target": ["target", *w, "--from-world", "--budget", "0.2", "--name", "scale",
                   "--reference", "200", "--overwrite"],
    }  # fmt: skip
    for stage in [s for s in STAGES if s in stages]:
        if stage in ("embed:clip", "embed:dino"):
            measured = run_stage(commands[stage], log)
            space = stage.split(":")[1]
            add(stage, measured, n, **bare_figures(ws, space, n, measured, args.reference_rows))
        elif stage == "cluster:1000":
            job = functools.partial(run_stage, commands[stage], log)
            measured, figures = kmeans_figures(ws, job, args.repeat)
            add(stage, measured, n, **figures)
        elif stage in commands:
            add(stage, run_stage(commands[stage], log), n)
        elif stage == "embed:text":
            small = min(n, args.text_rows)
            text_ws = root / "text-ws"
            run_stage(world_args(text_ws, small, 10), log)
            run_stage(["ingest", "--workspace", str(text_ws)], log)
            measured = run_stage(["embed", "--workspace", str(text_ws), "--spaces", "text",
                                  "--set", "overwrite=true"], log)  # fmt: skip
            bare = bare_figures(text_ws, "text", small, measured, args.reference_rows)
            add(stage, measured, small, **bare,
                note=f"run on {small:,} rows; its rows/s applies at {n:,}")  # fmt: skip
        elif stage == "skills":
            unique = fill_skill_cache(ws)
            add(stage, run_stage(["skills", *w, "--set", "overwrite=true"], log), n,
                note=f"{unique:,} unique questions, all cached: no LLM call timed")  # fmt: skip
        elif stage == "warmup":
            me = [sys.executable, str(Path(__file__).resolve()), "--warmup-only", str(ws)]
            add(stage, measure(me, log), n, note="9% of the pool over K=5000")
        elif stage == "progress":
            timings_file = root / "progress.json"
            me = [sys.executable, str(Path(__file__).resolve()), "--progress-only"]
            measured = measure([*me, f"{ws},{timings_file}"], log)
            t = json.loads(timings_file.read_text())
            rounds = t["rounds"]
            measured["seconds"] = round(t["warmup"] + sum(rounds) + sum(t["reports"]), 2)
            add(stage, measured, n, rounds=len(rounds),
                round_mean_ms=round(1000 * sum(rounds) / max(len(rounds), 1), 1),
                round_max_ms=round(1000 * max(rounds, default=0), 1),
                select_max_ms=round(1000 * max(t["selects"], default=0), 1),
                report_max_ms=round(1000 * max(t["reports"], default=0), 1),
                note=f"K=5000, rounds of {ROUND:,} with reveal and checkpoint")  # fmt: skip
    return rows


def bare_figures(ws: Path, space: str, n: int, measured: dict, limit: int) -> dict:
    """The embed job's rows/s against the same model's bare loop in one process on the
    first ``limit`` rows (``benchmarks.references.bare_embed``)."""
    from benchmarks.references import bare_embed

    rows, seconds = bare_embed(ws, space, min(n, limit))
    bare = rows / seconds
    return {"bare_rows_per_s": round(bare, 1),
            "ratio_to_bare": round(n / measured["seconds"] / bare, 3)}  # fmt: skip


def kmeans_figures(ws: Path, run_job, repeat: int) -> tuple[dict, dict]:
    """The cluster job against direct ``faiss.Kmeans`` with its sample size and iterations,
    the load of the features and the assignment of every row included: each run
    ``repeat`` times, the fastest of each kept (the same fit took 11-20 s over nine runs
    in a row on this machine). Returns (the job's measure, the figures)."""
    from benchmarks.references import bare_kmeans, clustering_figures
    from engine.artifacts import Clustering
    from engine.workspace import Workspace

    w = Workspace.open(str(ws))
    jobs = []
    for _ in range(repeat):
        measured = run_job()
        jobs.append((measured, clustering_figures(Clustering.open(w, "k1000"))))
    measured, meta = min(jobs, key=lambda job: job[0]["seconds"])
    bare = min(bare_kmeans(w, 1000, meta, 0, ["dino"]) for _ in range(repeat))
    # The job's own read, fit and assignment passes, without the process's and Ray's start
    work = meta["read_seconds"] + meta["fit_seconds"] + meta["assign_seconds"]
    figures = {"bare_seconds": round(bare, 2),
               "ratio_to_bare": round(measured["seconds"] / bare, 3),
               "read_s": meta["read_seconds"], "fit_s": meta["fit_seconds"],
               "assign_s": meta["assign_seconds"], "passes_ratio_to_bare": round(work / bare, 3),
               "runs_s": [job[0]["seconds"] for job in jobs]}  # fmt: skip
    return measured, figures


if __name__ == "__main__":
    main()
