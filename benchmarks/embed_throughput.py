"""Embed throughput: the Ray Data job against a bare single-process loop, in one run.

For each case (an encoder and a pool size) it generates and ingests a shapes world,
then embeds the same images twice on the same cores:
  * ``bare``: one process reads the pool Parquet, decodes and preprocesses, encodes
    with the same model (torch on every core) and writes the vectors as Parquet;
  * ``ray``: ``vlselect embed`` (read -> decode tasks -> encoder actor pool -> shard
    writer), actors and threads as the case's config says.
The ratio ray/bare is the job's efficiency; peak RSS of the driver and of all of
Ray's processes is sampled for both.

Cases: ``vitb32`` (open_clip ViT-B-32 at 224 px, random weights: compute-bound) and
``tiny`` (the embedded default's 64 px tower: the pipeline's overhead dominates).

    python benchmarks/embed_throughput.py --cases vitb32:3000,tiny:100000 \\
        --out benchmarks/results/embed.json
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import PeakRSS, report  # noqa: E402
from engine.artifacts import Pool  # noqa: E402
from engine.encoders import EncoderSpec, load_encoder, preprocess_images  # noqa: E402
from engine.vectors import to_arrow  # noqa: E402
from engine.workspace import Workspace  # noqa: E402
from jobs.cli import main as cli  # noqa: E402

CPUS = os.cpu_count() or 2
CASES = {
    "vitb32": {
        "encoder": {"kind": "open_clip", "model": "ViT-B-32", "weights": "random"},
        "batch_size": 32,
    },
    "tiny": {
        "encoder": {"kind": "open_clip", "model": "tiny-clip", "weights": "random"},
        "batch_size": 256,
    },
}


def ray_config(case: str, actors: int, threads: int) -> dict:
    """``actors`` encoder actors of ``threads`` torch threads; decode tasks get what they leave."""
    space = dict(CASES[case])
    space["encoder"] = {**space["encoder"], "torch_threads": threads}
    space.update(min_actors=actors, max_actors=actors, actor={"num_cpus": 0.8 * CPUS / actors})
    return {"embed": {"spaces": ["clip"], "clip": space, "preprocess": {"num_cpus": 0.2}}}


def bare_loop(ws: Path, case: str, out: Path) -> dict:
    """The reference: everything the job does, in one process, no Ray."""
    spec = EncoderSpec(**CASES[case]["encoder"])
    batch_size = CASES[case]["batch_size"]
    with PeakRSS() as mem:
        start = time.perf_counter()
        encoder = load_encoder(spec)
        n = 0
        for file in Pool.open(Workspace.open(str(ws))).shards:
            ids, vectors = [], []
            for batch in pq.ParquetFile(file).iter_batches(batch_size, columns=["id", "image"]):
                pixels, _ = preprocess_images(batch.column("image").to_pylist(), encoder.prep)
                vectors.append(encoder(pixels))
                ids.extend(batch.column("id").to_pylist())
            table = pa.table({"id": ids, "vector": to_arrow(np.concatenate(vectors))})
            pq.write_table(table, out / Path(file).name)
            n += len(ids)
        seconds = time.perf_counter() - start
    return row(case, "bare loop (1 process)", n, seconds, mem)


def row(case: str, how: str, n: int, seconds: float, mem: PeakRSS) -> dict:
    return {
        "case": case,
        "how": how,
        "n": n,
        "seconds": round(seconds, 2),
        "samples_per_s": round(n / seconds, 1),
        "driver_peak_mib": round(mem.driver / 2**20),
        "total_peak_mib": round(mem.total / 2**20),
    }


def run_case(case: str, n: int, workdir: Path, layouts: list[tuple[int, int]]) -> list[dict]:
    base = workdir / f"{case}-{n}"
    shutil.rmtree(base, ignore_errors=True)
    ws = base / "ws"
    world = ["world", "--out", str(ws), "--size", str(n), "--set", "test_size=0"]
    assert cli([*world, "--set", "benchmarks=[]"]) == 0
    assert cli(["ingest", "--workspace", str(ws)]) == 0
    (base / "bare").mkdir()
    bare = bare_loop(ws, case, base / "bare")
    rows = [bare]
    for actors, threads in layouts:
        config = base / "embed.yaml"
        config.write_text(yaml.safe_dump(ray_config(case, actors, threads)))
        with PeakRSS() as mem:
            start = time.perf_counter()
            argv = ["embed", "--workspace", str(ws), "--config", str(config), "--overwrite"]
            assert cli(argv) == 0
            seconds = time.perf_counter() - start
        how = f"vlselect embed ({actors} actors x {threads} threads)"
        rows.append(row(case, how, n, seconds, mem))
        rows[-1]["ratio_to_bare"] = round(rows[-1]["samples_per_s"] / bare["samples_per_s"], 3)
    shutil.rmtree(base, ignore_errors=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", default="vitb32:3000,tiny:100000", help="CASE:N,...")
    parser.add_argument(
        "--layouts",
        default=f"{CPUS}x1,1x{CPUS}",
        help="encoder pool layouts to measure, ACTORSxTHREADS,...",
    )
    parser.add_argument("--workdir", default="/tmp/vlselect-bench-embed")
    parser.add_argument("--out", default="benchmarks/results/embed.json")
    args = parser.parse_args()
    import ray

    ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    rows = []
    for item in args.cases.split(","):
        case, n = item.split(":")
        layouts = [tuple(int(v) for v in lay.split("x")) for lay in args.layouts.split(",")]
        rows += run_case(case, int(n), Path(args.workdir), layouts)
    header = ["case", "how", "n", "seconds", "samples_per_s", "ratio_to_bare"]
    report("embed", rows, [*header, "driver_peak_mib", "total_peak_mib"], args.out)


if __name__ == "__main__":
    main()
