"""What a targeted selection leaves for people and for LLaVA's trainer.

``<ws>/selections/<name>/``: ``selected.json`` (LLaVA conversation format: id, image,
conversations; an image that came in by reference keeps its reference, relative to the
pool's image root; an inline image is written to ``images/<id>.png``), ``ids.txt``,
``report.json``, ``crossranks.parquet`` (per benchmark sample: its two cross-ranks,
censoring flags, top neighbours and skill text) and ``crossranks.png`` (the paper's
Figure 1: the benchmark's samples by their two cross-ranks, the reference behind them).
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
from engine.workspace import Workspace

TOP_CLUSTERS = 20


def pool_records(ws: Workspace, pool_file: str, wanted: dict[str, set[str]], out_dirs: dict):
    """LLaVA records of the ``wanted`` ids found in one pool shard, per selection.

    Args:
        wanted: selection key -> the ids it selected.
        out_dirs: selection key -> its output folder (inline images are written there).
    Returns:
        ``{key: {id: record}}`` for the ids of this shard.
    """
    ids = pq.read_table(pool_file, columns=["id"], filesystem=ws.fs).column("id")
    every = set().union(*wanted.values()) if wanted else set()
    mask = pc.is_in(ids, pa.array(sorted(every), pa.string()))
    if not pc.any(mask).as_py():
        return {key: {} for key in wanted}
    table = pq.read_table(
        pool_file, columns=["id", "image", "image_ref", "conversations"], filesystem=ws.fs
    ).filter(mask)
    out: dict[str, dict] = {key: {} for key in wanted}
    for row in table.to_pylist():
        for key, chosen in wanted.items():
            if row["id"] not in chosen:
                continue
            out_dir = out_dirs[key]
            out[key][row["id"]] = llava_record(
                row, lambda rel, data, d=out_dir: ws.write_bytes(f"{d}/{rel}", data)
            )
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


def cluster_counts(ws: Workspace, found: dict[str, Clustering], selections: dict[str, list[str]]):
    """Per selection and clustering: rows per cluster (the largest ``TOP_CLUSTERS``), the
    clusters touched, and how evenly (normalised entropy, 1.0 = spread over every cluster)."""
    out: dict[str, dict] = {key: {} for key in selections}
    for name, clustering in found.items():
        files = clustering.assignments
        if not files:
            continue
        table = pa.concat_tables(
            pq.read_table(f, columns=["id", "cluster"], filesystem=ws.fs) for f in files
        )
        label = dict(zip(table["id"].to_pylist(), table["cluster"].to_pylist(), strict=True))
        for key, ids in selections.items():
            counts = Counter(label[i] for i in ids if i in label)
            n = sum(counts.values())
            p = np.array(list(counts.values()), float) / max(n, 1)
            k = clustering.meta.k or len(counts)
            entropy = float(-(p * np.log(p)).sum() / np.log(k)) if k > 1 and n else 0.0
            out[key][name] = {
                "spaces": clustering.meta.spaces,
                "k": k,
                "rows_with_cluster": n,
                "clusters_touched": len(counts),
                "evenness": round(entropy, 4),
                "top": {str(c): m for c, m in counts.most_common(TOP_CLUSTERS)},
            }
    return out


def crossrank_table(
    ids: list[str],
    ranks: CrossRanks,
    top_concept: np.ndarray,
    top_skill: np.ndarray,
    skill_text: list[str | None],
) -> pa.Table:
    """One row per benchmark sample: id, r_cs, r_sc (int64), censored_cs/_sc, depth_c/_s,
    top_concept, top_skill (pool ids), skill_text."""
    return pa.table(
        {
            "id": pa.array(ids, pa.string()),
            "r_cs": ranks.r_cs,
            "r_sc": ranks.r_sc,
            "censored_cs": ranks.censored_cs,
            "censored_sc": ranks.censored_sc,
            "depth_c": ranks.depth_c,
            "depth_s": ranks.depth_s,
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

    def jitter(r):  # equal integer ranks would hide each other
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


def write_selection(
    ws: Workspace, out_dir: str, order: list[str], records: dict[str, dict], report: dict
) -> None:
    """selected.json (in selection order), ids.txt and report.json under ``out_dir``."""
    missing = [i for i in order if i not in records]
    if missing:
        raise RuntimeError(
            f"{len(missing)} selected ids are not in the pool (e.g. {missing[:3]}): the index "
            f"is older than the pool; rebuild it with `vlselect embed` and `vlselect index`"
        )
    rows = [records[i] for i in order]
    ws.write_bytes(f"{out_dir}/selected.json", json.dumps(rows, indent=1).encode())
    ws.write_bytes(f"{out_dir}/ids.txt", "".join(i + "\n" for i in order).encode())
    ws.write_json(f"{out_dir}/report.json", report)
