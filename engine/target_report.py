"""What a targeted selection leaves for people and for LLaVA's trainer.

``<ws>/selections/<name>/``: ``selected.json`` (LLaVA conversation format: id, image,
conversations, in pool order; an image that came in by reference keeps its reference,
relative to the pool's image root; an inline image is written to ``images/<id>.png``),
``ids.txt`` (in the order the selection took them),
``report.json``, ``crossranks.parquet`` (per benchmark sample: its two cross-ranks,
censoring flags, top-group sizes, top neighbours and skill text) and ``crossranks.png`` (the paper's
Figure 1: the benchmark's samples by their two cross-ranks, the reference behind them).

The records, ids and cluster counts are gathered per pool shard in tasks
(``shard_part``), each reading only the row groups that hold its selected rows; the
driver streams the parts into ``selected.json`` one shard at a time.
"""

from __future__ import annotations

import io
import json
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from engine.artifacts import Clustering
from engine.crossrank import CrossRanks, Decision
from engine.pool import llava_record
from engine.shards import read_rows
from engine.workspace import Workspace

TOP_CLUSTERS = 20


def shard_part(
    ws: Workspace,
    pool_file: str,
    wanted: dict[str, np.ndarray],
    shown: dict[str, np.ndarray],
    out_dirs: dict[str, str],
) -> dict[str, dict]:
    """One pool shard's share of every selection's outputs (a task per shard).

    Args:
        wanted: selection key -> int64 (n,) sorted rows of this shard it selected (local).
        shown: selection key -> int64 (m,) local rows whose ids the cross-rank table shows.
        out_dirs: selection key -> its output folder (inline images are written there).
    Returns:
        Per key: ``ids`` (string (n,), the selected rows' ids in row order), ``json``
        (bytes: their LLaVA records, comma-separated, for ``selected.json``) and
        ``shown`` (string (m,) ids).
    """
    every = np.unique(np.concatenate([*wanted.values(), *shown.values(), np.zeros(0, np.int64)]))
    ids = read_rows(ws.fs, pool_file, every, ["id"]).column("id").combine_chunks()
    out = {}
    for key, rows in wanted.items():
        where = pa.array(np.searchsorted(every, rows))
        records = read_rows(ws.fs, pool_file, rows, RECORD_COLUMNS).to_pylist()
        write = lambda rel, data, d=out_dirs[key]: ws.write_bytes(f"{d}/{rel}", data)  # noqa: E731
        text = ",\n".join(json.dumps(llava_record(r, write)) for r in records)
        out[key] = {
            "ids": ids.take(where),
            "json": text.encode(),
            "shown": ids.take(pa.array(np.searchsorted(every, shown.get(key, every[:0])))),
        }
    return out


RECORD_COLUMNS = ["id", "image", "image_ref", "conversations"]


def cluster_tally(ws: Workspace, assignments: str, selected: dict[str, pa.Array]) -> dict:
    """Rows per cluster of each selection (key -> string ids) found in one assignments
    file (a task per file): ``{key: {cluster: rows}}``."""
    table = pq.read_table(assignments, columns=["id", "cluster"], filesystem=ws.fs)
    out = {}
    for key, ids in selected.items():
        mine = table.filter(pc.is_in(table.column("id"), value_set=ids)).column("cluster")
        values, counts = np.unique(mine.to_numpy(), return_counts=True)
        out[key] = dict(zip(values.tolist(), counts.tolist(), strict=True))
    return out


def clusterings(ws: Workspace) -> dict[str, Clustering]:
    """Committed clusterings of the workspace, by name."""
    parent = ws.path(*Clustering.FOLDER)
    infos = ws.fs.get_file_info(pafs.FileSelector(parent, allow_not_found=True))
    found = {}
    for info in infos:
        if info.type == pafs.FileType.Directory:
            done = Clustering.find(ws, info.base_name)
            if done is not None:
                found[info.base_name] = done
    return found


def cluster_report(clustering: Clustering, counts: Counter) -> dict:
    """One selection's spread over one clustering: rows per cluster (the largest
    ``TOP_CLUSTERS``), the clusters touched, and how evenly (normalised entropy, 1.0 =
    spread over every cluster)."""
    n = sum(counts.values())
    p = np.array(list(counts.values()), float) / max(n, 1)
    k = clustering.meta.k or len(counts)
    entropy = float(-(p * np.log(p)).sum() / np.log(k)) if k > 1 and n else 0.0
    return {
        "spaces": clustering.meta.spaces,
        "k": k,
        "rows_with_cluster": n,
        "clusters_touched": len(counts),
        "evenness": round(entropy, 4),
        "top": {str(c): m for c, m in counts.most_common(TOP_CLUSTERS)},
    }


def crossrank_table(
    ids: list[str],
    ranks: CrossRanks,
    top_concept: np.ndarray,
    top_skill: np.ndarray,
    skill_text: list[str | None],
) -> pa.Table:
    """One row per benchmark sample: id, r_cs, r_sc (float64: a tied top group's
    geometric mean), censored_cs/_sc, depth_c/_s, ties_c/_s (int64: rows in each
    list's top group), top_concept, top_skill (pool ids: the first of each top group
    as the index listed it), skill_text."""
    return pa.table(
        {
            "id": pa.array(ids, pa.string()),
            "r_cs": ranks.r_cs,
            "r_sc": ranks.r_sc,
            "censored_cs": ranks.censored_cs,
            "censored_sc": ranks.censored_sc,
            "depth_c": ranks.depth_c,
            "depth_s": ranks.depth_s,
            "ties_c": ranks.ties_c,
            "ties_s": ranks.ties_s,
            "top_concept": pa.array(list(top_concept), pa.string()),
            "top_skill": pa.array(list(top_skill), pa.string()),
            "skill_text": pa.array(skill_text, pa.string()),
        }
    )


def scatter_png(
    name: str, ranks: CrossRanks, reference: CrossRanks | None, decision: Decision
) -> bytes:
    """PNG bytes: each benchmark sample at (R_c|s, R_s|c), log-log; censored ranks drawn
    hollow at depth + 1; the reference's samples in grey; each set's median as a cross."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(0)

    def jitter(r):  # equal ranks (integers, or a shared group's mean) would hide each other
        return r * np.exp(rng.uniform(-0.08, 0.08, len(r)))

    fig, ax = plt.subplots(figsize=(5.6, 5))
    if reference is not None and len(reference):
        ax.scatter(jitter(reference.r_cs), jitter(reference.r_sc), s=8, c="0.75",
                   label="pool reference")  # fmt: skip
        ax.plot(np.median(reference.r_cs), np.median(reference.r_sc), "x", c="0.4", ms=12, mew=2)
    cens = ranks.censored_cs | ranks.censored_sc
    x, y = jitter(ranks.r_cs), jitter(ranks.r_sc)
    colour = "tab:blue" if decision.prediction == "concept" else "tab:orange"
    ax.scatter(x[~cens], y[~cens], s=14, c=colour, alpha=0.7, label=f"{name} samples")
    if cens.any():
        ax.scatter(x[cens], y[cens], s=14, facecolors="none", edgecolors=colour,
                   label="censored (beyond depth)")  # fmt: skip
    ax.plot(np.median(ranks.r_cs), np.median(ranks.r_sc), "x", c="k", ms=12, mew=2,
            label="medians")  # fmt: skip
    top = max(ranks.r_cs.max(), ranks.r_sc.max(), 2) * 1.3
    ax.plot([0.8, top], [0.8, top], ls=":", c="0.5", lw=1)
    ax.set(xscale="log", yscale="log", xlim=(0.8, top), ylim=(0.8, top),
           xlabel="R_c|s: rank of the top skill neighbour in the concept ranking",
           ylabel="R_s|c: rank of the top concept neighbour in the skill ranking")  # fmt: skip
    ax.set_title(
        f"{name}: {decision.prediction} (confidence {decision.confidence:.2f}, "
        f"margin {decision.margin:+.2f})",
        fontsize=10,
    )
    ax.legend(fontsize=7, loc="lower right")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()
