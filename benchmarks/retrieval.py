"""Retrieval: the sharded service against one in-process faiss index, on clustered data.

For each factory (Flat, IVF, HNSW) it measures, on the same vectors and queries:
  * ``faiss in-process``: one index over all rows, searched batch by batch in this
    process (the reference);
  * ``service, N shards``: ``vlselect index --shards N`` then ``RetrievalService``: every
    batch goes to every shard actor and the top-k lists are merged.

Per row: the build time, queries/s over a pipelined stream of batches
(``max_in_flight`` batches pending, the way ``vlselect search`` runs), p50 and p99
latency of one request (a batch of ``--batch`` queries, sent one at a time),
recall@10 against exact search (a Flat index), and the ratio of queries/s to the
reference of the same factory.

Data: ``--rows`` unit vectors of ``--dim`` drawn around ``--centres`` random directions
with noise of norm ``--spread`` (random vectors in many dimensions are all nearly
orthogonal, which makes recall meaningless); queries are fresh draws from the same
mixture.

    python benchmarks/retrieval.py                        # 100k x 256, 1/2/4 shards: ~5 min on 2 cores
    python benchmarks/retrieval.py --rows 1000000 --factories 'IVF4096,Flat;HNSW32'
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from actors.retrieval import RetrievalService, ServiceConfig  # noqa: E402
from benchmarks.common import report, timings  # noqa: E402
from engine.faiss_index import build_index, set_search_params  # noqa: E402
from engine.workspace import Workspace  # noqa: E402
from jobs.cli import main as cli  # noqa: E402
from tests.synthetic_space import write_space  # noqa: E402

CPUS = os.cpu_count() or 2
K = 10


def mixture(
    rows: int, queries: int, dim: int, centres: int, spread: float
) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors (rows, dim) and queries (queries, dim) drawn around the same centres.

    ``spread`` is the noise's norm against the unit centre: at 1.0 and below every
    neighbour lies in the query's own cluster and IVF finds all of them; at 1.5 the
    clusters overlap enough that nprobe and efSearch matter; at 3.0 little structure is left.
    """
    rng = np.random.default_rng(0)
    c = rng.standard_normal((centres, dim)).astype(np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)

    def draw(n: int) -> np.ndarray:
        v = c[rng.integers(0, centres, n)]
        v = v + spread * rng.standard_normal((n, dim)).astype(np.float32) / np.sqrt(dim)
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    return draw(rows), draw(queries)


def recall(got: np.ndarray, truth: np.ndarray) -> float:
    """Mean share of the true top-k found, per query."""
    return float(
        np.mean([len(set(a) & set(b)) / truth.shape[1] for a, b in zip(got, truth, strict=True)])
    )


def reference(x, queries, factory, params, batch) -> dict:
    """One in-process index over all rows, searched batch by batch."""
    start = time.perf_counter()
    index = build_index(x, factory)
    set_search_params(index, params["nprobe"], params["ef_search"])
    built = time.perf_counter() - start

    def stream(q):
        return np.concatenate(
            [index.search(q[i : i + batch], K)[1] for i in range(0, len(q), batch)]
        )

    t = timings(lambda b: index.search(b, K), queries, batch, stream)
    return {"build_s": round(built, 1), **t}


def service(ws: Path, factory, shards, params, queries, batch) -> dict:
    """``vlselect index`` into ``shards`` shards, then the service over them."""
    start = time.perf_counter()
    argv = ["index", "--workspace", str(ws), "--space", "clip", "--shards", str(shards)]
    assert cli([*argv, "--factory", factory, "--set", f"task.num_cpus={CPUS / shards}"]) == 0
    built = time.perf_counter() - start
    cfg = ServiceConfig(
        batch_size=batch,
        max_in_flight=4,
        nprobe=params["nprobe"],
        ef_search=params["ef_search"],
        # The shards share the machine's cores: each holds its share and as many threads.
        shard={"num_cpus": CPUS / shards, "max_retries": -1},
        threads=max(1, CPUS // shards),
    )
    with RetrievalService.start(Workspace.open(str(ws)), "clip", cfg) as svc:
        t = timings(lambda b: svc.search(b, K), queries, batch, lambda q: svc.search(q, K)[0])
    return {"build_s": round(built, 1), **t}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--centres", type=int, default=2000)
    parser.add_argument("--spread", type=float, default=1.5, help="noise norm per centre")
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=32, help="queries per request")
    parser.add_argument("--shards", default="1,2,4")
    parser.add_argument(
        "--factories", default="Flat;IVF1024,Flat;HNSW32", help="';'-separated factory strings"
    )
    parser.add_argument("--nprobe", type=int, default=16)
    parser.add_argument("--ef-search", type=int, default=64)
    parser.add_argument("--workdir", default="/tmp/vlselect-bench-retrieval")
    parser.add_argument("--out", default="benchmarks/results/retrieval.json")
    args = parser.parse_args()
    import faiss
    import ray

    ray.init(num_cpus=CPUS, include_dashboard=False, log_to_driver=False, configure_logging=False)
    params = {"nprobe": args.nprobe, "ef_search": args.ef_search}
    x, queries = mixture(args.rows, args.queries, args.dim, args.centres, args.spread)
    ws = Path(args.workdir) / "ws"
    shutil.rmtree(args.workdir, ignore_errors=True)
    write_space(ws, "clip", x, files=8)
    exact = faiss.IndexFlatIP(args.dim)
    exact.add(x)
    # The space's rows are the pool's rows in order (write_space made the pool from its
    # ids), so a faiss label is the pool row the service answers with.
    truth = exact.search(queries, K)[1]

    rows = []
    for factory in args.factories.split(";"):
        ref = reference(x, queries, factory, params, args.batch)
        base = {"factory": factory, "batch": args.batch}
        rows.append(
            {**base, "how": "faiss in-process", "shards": 1, **_row(ref, truth, ref["qps"])}
        )
        for shards in [int(s) for s in args.shards.split(",")]:
            got = service(ws, factory, shards, params, queries, args.batch)
            rows.append(
                {**base, "how": "service", "shards": shards, **_row(got, truth, ref["qps"])}
            )
            print(rows[-1], flush=True)
    shutil.rmtree(args.workdir, ignore_errors=True)
    header = ["factory", "how", "shards", "build_s", "qps", "p50_ms", "p99_ms", "recall@10"]
    report(
        "retrieval",
        rows,
        [*header, "ratio_to_in_process"],
        args.out,
        data={
            "rows": args.rows,
            "dim": args.dim,
            "centres": args.centres,
            "spread": args.spread,
            "queries": args.queries,
            "k": K,
            "batch": args.batch,
            **params,
        },
    )


def _row(result: dict, truth: np.ndarray, ref_qps: float) -> dict:
    out = {k: v for k, v in result.items() if k != "answer"}
    out["recall@10"] = round(recall(result["answer"], truth), 4)
    out["ratio_to_in_process"] = round(result["qps"] / ref_qps, 2)
    return out


if __name__ == "__main__":
    main()
