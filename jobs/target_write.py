"""The outputs of ``vlselect target``: per benchmark its selected records, ids, report,
cross-ranks and rejects, written together once every benchmark is selected, and the
selection's commit (``engine.artifacts.Selection``).

The records are gathered by one Ray task per pool shard and streamed into each
``selected.json``, so the driver never holds a selection's records."""

from __future__ import annotations

import contextlib
from collections import Counter

import numpy as np
import pyarrow as pa
import ray
from tqdm import tqdm

from engine.artifacts import SelectionMeta
from engine.crossrank import CrossRanks
from engine.kmeans import split_positions
from engine.pool import ids_text
from engine.target_report import (
    cluster_report,
    cluster_tally,
    clusterings,
    crossrank_table,
    scatter_png,
    shard_part,
)
from engine.workspace import Workspace, atomic_output


class Staged:
    """Per-benchmark results held until every benchmark is done, then written together."""

    def __init__(self, ws: Workspace, root: str, single: bool):
        self.ws, self.root, self.single, self.items = ws, root, single, {}

    def dir(self, name: str) -> str:
        return self.root if self.single else f"{self.root}/{name}"

    def put(self, name, ranks: CrossRanks, decision, top, vecs, chosen, reference) -> None:
        self.items[name] = (ranks, decision, top["concept"], top["skill"], vecs["skill_text"],
                            chosen)  # fmt: skip
        self.ws.write_bytes(f"{self.dir(name)}/crossranks.png",
                            scatter_png(name, ranks, reference, decision))  # fmt: skip


def write_outputs(cfg, ws, plan, staged: Staged, reports, embed_stats, timer, attempt) -> dict:
    """Every benchmark's outputs: one task per pool shard gathers its share of the
    records, ids and cluster counts (``shard_part``), and the driver streams the parts
    into each ``selected.json`` shard by shard, so it never holds a selection's records."""
    names = list(staged.items)
    dirs = {b: staged.dir(b) for b in names}
    chosen = {b: staged.items[b][-1] for b in names}
    shown = {b: np.unique(np.concatenate(staged.items[b][2:4])) for b in names}
    shown = {b: rows[rows >= 0] for b, rows in shown.items()}
    per_file = {b: split_positions(np.sort(chosen[b].rows), plan.pool_rows) for b in names}
    shown_per_file = {b: split_positions(shown[b], plan.pool_rows) for b in names}
    task = ray.remote(num_cpus=0.25)(shard_part)
    refs = [
        task.remote(ws, f, {b: per_file[b][i] for b in names},
                    {b: shown_per_file[b][i] for b in names}, dirs)
        for i, f in enumerate(plan.pool_files)
    ]  # fmt: skip
    ids = {b: [] for b in names}
    shown_ids = {b: [] for b in names}
    with contextlib.ExitStack() as stack:
        streams = {}
        for b in names:
            tmp = stack.enter_context(atomic_output(ws.fs, f"{dirs[b]}/selected.json"))
            streams[b] = stack.enter_context(ws.fs.open_output_stream(tmp))
            streams[b].write(b"[\n")
        started = dict.fromkeys(names, False)
        for ref in tqdm(refs, unit="shard", desc="records", mininterval=1.0):
            part = ray.get(ref)
            for b, got in part.items():
                ids[b].append(got["ids"])
                shown_ids[b].append(got["shown"])
                if got["json"]:
                    streams[b].write((b",\n" if started[b] else b"") + got["json"])
                    started[b] = True
            del part
        for b in names:
            streams[b].write(b"\n]\n")
            streams[b].close()
    ids = {b: pa.concat_arrays(parts) if parts else pa.array([], pa.string())
           for b, parts in ids.items()}  # fmt: skip
    counts = _cluster_counts(ws, ids)
    for report, bench in zip(reports, plan.benchmarks, strict=True):
        ranks, decision, top_c, top_s, text, picked = staged.items[bench.name]
        out_dir = staged.dir(bench.name)
        in_row_order = ids[bench.name]
        if len(in_row_order) != len(picked):
            raise RuntimeError(
                f"{len(picked) - len(in_row_order)} selected rows are not in the pool: the "
                f"index is older than the pool; rebuild it with `vlselect index`"
            )
        order = np.searchsorted(np.sort(picked.rows), picked.rows)
        report["clusters"] = counts[bench.name]
        report["skills"] = embed_stats
        shown_table = pa.concat_arrays(shown_ids[bench.name]) if shown[bench.name].size else None
        top_ids = [_ids_of(top, shown[bench.name], shown_table) for top in (top_c, top_s)]
        ws.write_table(f"{out_dir}/crossranks.parquet",
                       crossrank_table(bench.ids, ranks, *top_ids, text))  # fmt: skip
        ws.write_json(f"{out_dir}/rejects.json", bench.rejects)
        ws.write_bytes(f"{out_dir}/ids.txt", ids_text(in_row_order.take(pa.array(order))))
        ws.write_json(f"{out_dir}/report.json", report)
    summary = {"name": cfg.name, "pool": plan.pool, "budget": plan.budget,
               "benchmarks": [{k: r[k] for k in ("benchmark", "usable", "rejected", "prediction",
                               "confidence", "margin", "mode", "selected", "seconds")} for r in reports],
               "seconds": round(timer.seconds, 2), "path": attempt.dir}  # fmt: skip
    if not staged.single:
        ws.write_json(attempt.path("summary.json"), {**summary, "reports": reports})
    meta = SelectionMeta(
        name=cfg.name,
        pool=plan.pool,
        budget=plan.budget,
        benchmarks=[b.name for b in plan.benchmarks],
        single=staged.single,
        summary=summary,
        config=cfg.model_dump(mode="json"),
    )
    attempt.commit(meta)
    return summary


def _cluster_counts(ws: Workspace, ids: dict[str, pa.Array]) -> dict[str, dict]:
    """Each selection's spread over every committed clustering: a task per assignments
    file tallies the selected ids it holds (the ids go to the object store once)."""
    found = {c: cl for c, cl in clusterings(ws).items() if cl.assignments}
    selected = ray.put(ids)
    task = ray.remote(num_cpus=0.25)(cluster_tally)
    refs = {c: [task.remote(ws, f, selected) for f in cl.assignments] for c, cl in found.items()}
    out: dict[str, dict] = {b: {} for b in ids}
    for c, parts in refs.items():
        tallies = {b: Counter() for b in ids}
        for part in ray.get(parts):
            for b, tally in part.items():
                tallies[b].update(tally)
        for b, tally in tallies.items():
            out[b][c] = cluster_report(found[c], tally)
    return out


def _ids_of(rows: np.ndarray, shown: np.ndarray, shown_ids: pa.Array | None) -> list:
    """The string id of each of ``rows`` (int64 (q,), -1: None) from the sorted rows
    ``shown`` and their ids."""
    if shown_ids is None:
        return [None] * len(rows)
    at = np.searchsorted(shown, np.maximum(rows, 0))
    got = shown_ids.take(pa.array(np.minimum(at, len(shown) - 1))).to_pylist()
    return [g if r >= 0 else None for g, r in zip(got, rows, strict=True)]
