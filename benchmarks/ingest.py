"""World generation and ingestion throughput and memory, at pool sizes from a flag.

For each size N it measures, in one run:
  * ``world``: generating N samples (Ray tasks, images inline in Parquet);
  * ``ingest parquet``: ingesting that Parquet source (full image decode check);
  * ``ingest llava-json``: ingesting one N-record LLaVA JSON array whose records point
    at 1,000 PNG files on disk (the streamed-JSON path of LLaVA-665K);
  * ``bare``: a single-process loop over the same Parquet (read + PIL decode, no Ray,
    no validation, nothing written) as the reference; ingest's rate is given as a
    ratio to it.
Peak memory is sampled (RSS, every 0.2 s) for the driver alone and for the driver
plus every Ray process, so bounded memory shows as a flat driver peak across N.

    python benchmarks/ingest.py --sizes 10000,100000,1000000 --out benchmarks/results/ingest.json
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import report, timed_cli  # noqa: E402
from engine.artifacts import World  # noqa: E402
from engine.workspace import Workspace  # noqa: E402


def timed(label: str, n: int, argv: list[str]) -> dict:
    seconds, mem = timed_cli(argv)
    return {
        "stage": label,
        "n": n,
        "seconds": round(seconds, 2),
        "rows_per_s": round(n / seconds, 1),
        "driver_peak_mib": round(mem.driver / 2**20, 1),
        "total_peak_mib": round(mem.total / 2**20, 1),
    }


def source_files(ws: Path) -> list[str]:
    """The world's committed Parquet source (``vlselect world``'s ``source/``), sorted."""
    return World.open(Workspace.open(str(ws))).files("source", ".parquet")


def bare_loop(files: list[str], limit: int) -> dict:
    """Reference: read the Parquet ``files`` and decode each image in one process, nothing else."""
    start, n = time.perf_counter(), 0
    for file in files:
        for batch in pq.ParquetFile(file).iter_batches(batch_size=2048, columns=["image"]):
            for data in batch.column(0).to_pylist():
                if data is not None:
                    with Image.open(io.BytesIO(data)) as img:
                        img.load()
                n += 1
                if n >= limit:
                    break
            if n >= limit:
                break
        if n >= limit:
            break
    seconds = time.perf_counter() - start
    return {
        "stage": "bare read+decode (1 process)",
        "n": n,
        "seconds": round(seconds, 2),
        "rows_per_s": round(n / seconds, 1),
    }


def write_llava_json(path: Path, n: int, images: Path, template: str) -> None:
    """N records cycling over 1,000 PNG files: the layout of LLaVA-665K (paths under a root),
    their images and conversations from the Parquet file ``template``."""
    images.mkdir(parents=True, exist_ok=True)
    table = pq.read_table(template).slice(0, 1000).to_pylist()
    table = [r for r in table if r["image"] is not None]
    for i, row in enumerate(table):
        (images / f"{i:04d}.png").write_bytes(row["image"])
    with open(path, "w") as f:
        f.write("[\n")
        for i in range(n):
            row = table[i % len(table)]
            rec = {
                "id": f"j{i:08d}",
                "image": f"images/{i % len(table):04d}.png",
                "conversations": row["conversations"],
            }
            f.write(("," if i else "") + json.dumps(rec) + "\n")
        f.write("]\n")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--workdir", default="/tmp/vlselect-bench-ingest")
    parser.add_argument("--out", default="benchmarks/results/ingest.json")
    parser.add_argument("--bare-limit", type=int, default=50_000)
    args = parser.parse_args()
    import ray

    ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    rows = []
    for n in [int(s) for s in args.sizes.split(",")]:
        base = Path(args.workdir) / f"n{n}"
        shutil.rmtree(base, ignore_errors=True)
        ws = base / "ws"
        world_args = [
            "world",
            "--out",
            str(ws),
            "--size",
            str(n),
            "--set",
            "test_size=0",
            "--set",
            "benchmarks=[]",
        ]
        rows.append(timed("world (generate)", n, world_args))
        rows.append(timed("ingest parquet", n, ["ingest", "--workspace", str(ws)]))
        source = source_files(ws)
        bare = bare_loop(source, min(n, args.bare_limit))
        rows.append(bare)
        rows[-2]["ratio_to_bare"] = round(rows[-2]["rows_per_s"] / bare["rows_per_s"], 3)
        src = base / "llava" / "data.json"
        write_llava_json(src, n, base / "llava" / "images", source[0])
        rows[-1]["json_bytes"] = src.stat().st_size
        rows.append(
            timed(
                "ingest llava-json",
                n,
                ["ingest", "--workspace", str(base / "ws_json"), "--source", str(src)],
            )
        )
        rows[-1]["json_mib"] = round(src.stat().st_size / 2**20, 1)
        shutil.rmtree(base, ignore_errors=True)
    header = [
        "stage",
        "n",
        "seconds",
        "rows_per_s",
        "ratio_to_bare",
        "driver_peak_mib",
        "total_peak_mib",
    ]
    report("ingest", rows, header, args.out)


if __name__ == "__main__":
    main()
