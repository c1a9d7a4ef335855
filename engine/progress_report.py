"""What a PROGRESS run leaves for people and for LLaVA's trainer: ``selected.json``,
``ids.txt`` and the plots of its rounds.

``selected.json`` is LLaVA's conversation format (id, image, conversations), in round
order, so
LLaVA's own training scripts take it as-is. A row whose image came in by reference
keeps that reference (relative to the image root the pool was ingested with); an
inline image is written to ``<run>/images/<id>.png`` and referenced from there.
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from engine.artifacts import Pool
from engine.pool import ids_text, llava_record
from engine.shards import with_pool_columns
from engine.workspace import Workspace, atomic_output

TOP_CLUSTERS = 12  # Δk lines drawn: more is unreadable


def read_rounds(jsonl: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in jsonl.splitlines() if line.strip()]


def round_records(ws: Workspace, run_dir: str, path: str, pool: tuple[list[str], list[int]]):
    """One round file's rows as LLaVA records (writes inline images). A round file holds
    ids, pool rows and answers: the image and the conversation are read by pool row from
    ``pool`` (its files and their row counts)."""
    table = pq.read_table(path, filesystem=ws.fs)
    table = with_pool_columns(ws.fs, table, *pool, ["image", "image_ref", "conversations"])
    table = table.select(["id", "image", "image_ref", "conversations"])
    return [
        llava_record(row, lambda rel, data: ws.write_bytes(f"{run_dir}/{rel}", data))
        for row in table.to_pylist()
    ]


def _figure_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def plot_rounds(rounds: list[dict[str, Any]]) -> dict[str, bytes]:
    """PNG bytes of three figures: Δk per cluster over rounds (the clusters picked most),
    picks per cluster and round (a heat map), and the budget spent per round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    out = {}
    x = [r["round"] for r in rounds]
    totals: dict[str, int] = {}
    for r in rounds:
        for c, n in r["picks_per_cluster"].items():
            totals[c] = totals.get(c, 0) + n
    top = sorted(totals, key=lambda c: -totals[c])[:TOP_CLUSTERS]

    fig, ax = plt.subplots(figsize=(7, 4))
    for c in top:
        ys = [r["delta"].get(c, np.nan) for r in rounds]
        ax.plot(x, ys, marker="o", label=f"cluster {c}")
    ax.axhline(0, color="grey", lw=0.8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="round", ylabel="Δk (relative progress)", title="Δk per cluster (most picked)")
    ax.legend(fontsize=7, ncol=2)
    out["delta.png"] = _figure_bytes(fig)
    plt.close(fig)

    order = sorted(totals, key=lambda c: -totals[c])
    grid = np.array([[r["picks_per_cluster"].get(c, 0) for c in order] for r in rounds], float)
    fig, ax = plt.subplots(figsize=(8, 3.5))
    im = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="viridis")
    ax.set(
        xlabel="cluster (most picked first)", ylabel="round", title="Picks per cluster and round"
    )
    fig.colorbar(im, ax=ax, label="rows")
    out["picks.png"] = _figure_bytes(fig)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.step(x, [r["spent"] for r in rounds], where="post", label="spent")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.axhline(rounds[-1]["budget"], color="red", ls="--", label="budget")
    ax.set(xlabel="round", ylabel="rows revealed", title="Budget curve")
    ax.legend()
    out["budget.png"] = _figure_bytes(fig)
    plt.close(fig)
    return out


def write_outputs(ws: Workspace, run_dir: str, rounds_jsonl: str) -> dict[str, str]:
    """selected.json, ids.txt and plots/*.png under ``run_dir``; their paths.

    Round by round: selected.json (in round order) is streamed, so the driver holds one
    round's records at a time, never the selection's."""
    shards = Pool.open(ws).shards
    pool = (shards, [pq.ParquetFile(f, filesystem=ws.fs).metadata.num_rows for f in shards])
    ids: list[pa.Array] = []
    with (
        atomic_output(ws.fs, f"{run_dir}/selected.json") as tmp,
        ws.fs.open_output_stream(tmp) as out,
    ):
        out.write(b"[")
        first = True
        for path in ws.list_files(run_dir, "rounds", suffix=".parquet"):
            for record in round_records(ws, run_dir, path, pool):
                out.write((b"\n" if first else b",\n") + json.dumps(record).encode())
                first = False
            ids.append(pq.read_table(path, columns=["id"], filesystem=ws.fs).column("id"))
        out.write(b"\n]\n")
    every = (
        pa.chunked_array(ids, pa.string()).combine_chunks() if ids else pa.array([], pa.string())
    )
    ws.write_bytes(f"{run_dir}/ids.txt", ids_text(every))
    paths = {"selected": f"{run_dir}/selected.json", "ids": f"{run_dir}/ids.txt"}
    rounds = read_rounds(rounds_jsonl)
    if rounds:
        for name, png in plot_rounds(rounds).items():
            ws.write_bytes(f"{run_dir}/plots/{name}", png)
        paths["plots"] = f"{run_dir}/plots"
    return paths
