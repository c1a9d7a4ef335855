"""``vlselect progress`` end to end on one local Ray: a tiny world, a tiny base, two
Ray Train workers with DeepSpeed ZeRO-2 on gloo (its faults: tests/faults)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from engine.artifacts import Pool, ProgressRun
from engine.workspace import Workspace
from jobs.cli import main
from tests.engine.test_llava import TINY, TINY_TRAIN
from tests.synthetic_space import clustered_labelled, write_space

POOL = 300
TINY_RUN = {
    "budget": 0.2,  # 60 rows
    "warmup": 0.09,  # 27 rows
    "round_size": 10,  # then rounds of 10, 10, 10, 3
    "selection": {"metric": "loss", "eval_per_cluster": 5},
    "finetune": {
        "lora": {"r": 4, "alpha": 8},
        "lr": 1e-2,
        "projector_lr": 1e-2,
        "epochs": 1,
        "batch_size": 8,
    },
    "micro_batch": 4,
    "num_workers": 2,
    "worker": {"num_cpus": 0.5},
    "eval_batch": 16,
}


def summary_of(out: str) -> dict:
    line = [x for x in out.splitlines() if x.startswith("vlselect-summary ")][-1]
    return json.loads(line.removeprefix("vlselect-summary "))


def pool_with_spaces(ws: Path, size: int, *world_flags: str, clusters: int) -> Path:
    """A ``size``-row world at ``ws``, ingested, with synthetic dino and text spaces of
    ``clusters`` clusters each (PROGRESS clusters them; no encoder needed)."""
    assert main(["world", "--out", str(ws), "--size", str(size), *world_flags]) == 0
    assert main(["ingest", "--workspace", str(ws)]) == 0
    ids = Pool.open(Workspace.open(str(ws))).read_table(["id"]).column("id").to_pylist()
    for space, dim, seed in (("dino", 24, 1), ("text", 16, 2)):
        vectors, _ = clustered_labelled(len(ids), dim, clusters, seed=seed)
        write_space(ws, space, vectors, ids=ids, shard_rows=100)
    return ws


@pytest.fixture(scope="module")
def tiny_ws(ray_session, tmp_path_factory) -> tuple[Path, Path]:
    return build_tiny_ws(tmp_path_factory)


def build_tiny_ws(tmp_path_factory) -> tuple[Path, Path]:
    """A 300-row world, ingested, with synthetic dino/text spaces and a tiny base; and the
    run's config file."""
    ws = pool_with_spaces(tmp_path_factory.mktemp("progress") / "ws", POOL, clusters=12)
    config = tmp_path_factory.mktemp("cfg") / "run.yaml"
    config.write_text(
        yaml.safe_dump({"base": {"model": TINY, "train": TINY_TRAIN}, "progress": TINY_RUN})
    )
    assert main(["base", "--workspace", str(ws), "--config", str(config)]) == 0
    return ws, config


@pytest.mark.parametrize("zero_stage", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_progress_runs_rounds_to_the_exact_budget(ray_session, tiny_ws, capsys, zero_stage):
    ws, config = tiny_ws
    name = f"tiny{zero_stage}"
    args = ["--config", str(config), "--name", name, "--set", f"zero_stage={zero_stage}"]
    code = main(["progress", "--workspace", str(ws), *args])
    assert code == 0, capsys.readouterr().err[-3000:]
    out = capsys.readouterr().out
    summary = summary_of(out)
    assert summary["spent"] == summary["budget"] == 60 and summary["revealed"] == 60
    run = ProgressRun.open(Workspace.open(str(ws)), name)
    run_dir = Path(run.dir)

    rounds = [json.loads(x) for x in (run_dir / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [0, 1, 2, 3, 4]
    # rank 0's line per trained round reaches this terminal (worker output does not)
    told = [x.split(":")[1].strip() for x in out.splitlines() if x.startswith("  progress: round")]
    assert told == [f"round {r['round']}" for r in rounds], out[-2000:]
    assert rounds[0]["kind"] == "warmup" and rounds[0]["picks"] == 27
    assert [r["picks"] for r in rounds[1:]] == [10, 10, 10, 3]
    assert [r["spent"] for r in rounds] == [27, 37, 47, 57, 60]
    assert all(r["delta"] for r in rounds[1:])  # every selection round had a Δk

    files = sorted((run_dir / "rounds").glob("round-*.parquet"))
    assert len(files) == 5  # one per round, none for the empty ask that ends the run
    ids = [i for f in files for i in pq.read_table(f).column("id").to_pylist()]
    assert len(ids) == len(set(ids)) == 60  # nothing picked or revealed twice
    # The reveal read rows by pool row and left the image bytes in the pool: a round
    # file names each row's pool row, which holds that id.
    revealed = pa.concat_tables(pq.read_table(f) for f in files)
    assert "image" not in revealed.column_names and revealed["pool_row"].type == pa.int64()
    pool = Pool.open(Workspace.open(str(ws))).read_table(["id", "image"])
    rows = revealed["pool_row"].to_numpy()
    assert pool["id"].take(pa.array(rows)).to_pylist() == ids
    selected = json.loads((run_dir / "selected.json").read_text())
    assert [r["id"] for r in selected] == ids
    with_image = [r for r, row in zip(selected, rows, strict=True) if pool["image"][row].as_py()]
    assert with_image and all((run_dir / r["image"]).read_bytes()[:4] == b"\x89PNG"
                              for r in with_image)  # fmt: skip
    assert all(r["conversations"][1]["from"] == "gpt" for r in selected)
    assert (run_dir / "ids.txt").read_text().split() == ids
    for plot in ("delta.png", "picks.png", "budget.png"):
        assert (run_dir / "plots" / plot).stat().st_size > 1000
    assert (run_dir / "adapter" / "adapter_config.json").exists()
    assert run.meta.spent == run.meta.budget == 60 and run.meta.rounds == 5
    meta = run.meta.summary
    assert meta["final_metrics"]["round"] == 4
    assert np.isfinite(meta["final_metrics"]["train_loss"])
    rounds = meta["train_rounds"]  # every round's training, from Ray Train's checkpoints
    assert [r["round"] for r in rounds] == [0, 1, 2, 3, 4]
    assert sum(r["rows"] for r in rounds) == 60 and all(r["train_seconds"] > 0 for r in rounds)


def test_bad_budgets_are_refused(tiny_ws, capsys):
    ws, config = tiny_ws
    base = ["progress", "--workspace", str(ws), "--config", str(config), "--name", "bad"]
    assert main([*base, "--budget", "301"]) == 2
    assert "exceeds the clustered pool of 300" in capsys.readouterr().err
    assert main([*base, "--set", "warmup=100"]) == 2
    assert "warm-up 100 rows exceeds the budget of 60" in capsys.readouterr().err
    assert main([*base, "--set", "micro_batch=3"]) == 2
    assert "not a multiple of micro_batch" in capsys.readouterr().err
    assert main(["progress", "--workspace", str(ws), "--config", str(config)]) == 2
    assert "--name" in capsys.readouterr().err


def test_the_warmup_job_takes_what_the_in_memory_selector_takes(ray_session, tiny_ws):
    """select_warmup_ids (shard tasks, a shuffle by cluster, a task per cluster, the
    orders left in the object store and only their heads read) picks exactly the rows
    engine.warmup.select_warmup picks from the same features in one process."""
    from benchmarks.references import space_features
    from engine.artifacts import Clustering
    from engine.progress_config import ProgressConfig
    from engine.warmup import select_warmup
    from jobs.progress import ensure_clustering
    from jobs.progress_warmup import select_warmup_ids

    w = Workspace.open(str(tiny_ws[0]))
    cfg = ProgressConfig(name="warm-check", seed=3, warmup_sigma=0.5, max_kernel_rows=20)
    clustering = ensure_clustering(cfg, w, cfg.warmup_clusters, (10, 10, 5000))
    ids = pa.concat_tables(pq.read_table(f, columns=["id", "cluster"]) for f in
                           Clustering.open(w, cfg.warmup_clusters).assignments)  # fmt: skip
    features = space_features(w, clustering.meta.spaces)
    pool_ids = Pool.open(w).read_table(["id"]).column("id").to_pylist()
    assert ids["id"].to_pylist() == pool_ids == sorted(pool_ids)  # rows in id order
    centroids = np.load(clustering.path("centroids.npy"))
    for total in (27, 1000):
        rows = select_warmup(features, ids["cluster"].to_numpy(), centroids, total,
                             cfg.warmup_temperature, cfg.warmup_sigma, cfg.max_kernel_rows,
                             cfg.seed)  # fmt: skip
        picked = select_warmup_ids(cfg, w, total)
        assert len(picked) == min(total, POOL) and len(set(picked)) == len(picked)
        assert sorted(picked) == [pool_ids[r] for r in rows]


def test_rounds_drawn_by_uncertainty_reveal_only_the_picks(ray_session, tiny_ws, capsys):
    """selection.within 'uncertainty': the job orders the clusters' prototypes (Ray Data),
    the trainer answers each round's candidates from image and question, the coordinator
    draws by them; candidates are offered, never revealed."""
    from engine.within import DIVERSITY_FOLDER, DIVERSITY_MARKER

    ws, config = tiny_ws
    args = ["--config", str(config), "--name", "unsure", "--set", "selection.within=uncertainty",
            "--set", "selection.candidates=2"]  # fmt: skip
    code = main(["progress", "--workspace", str(ws), *args])
    assert code == 0, capsys.readouterr().err[-3000:]
    summary = summary_of(capsys.readouterr().out)
    assert summary["spent"] == summary["revealed"] == 60
    run_dir = Path(ProgressRun.open(Workspace.open(str(ws)), "unsure").dir)
    marker = json.loads((run_dir / DIVERSITY_FOLDER / DIVERSITY_MARKER).read_text())
    assert marker["rows"] == POOL
    ranks = pa.concat_tables(pq.read_table(p) for p in marker["parts"])
    assert sorted(ranks["id"].to_pylist()) == sorted(set(ranks["id"].to_pylist()))
    rounds = [json.loads(x) for x in (run_dir / "rounds.jsonl").read_text().splitlines()]
    for r in rounds[1:]:
        guided = r["picks"] - r["explore"]
        # ceil(2 x quota) per cluster: at least twice the guided picks were offered
        assert 2 * guided <= r["candidates"] <= 2 * guided + len(r["picks_per_cluster"])
    ids = [i for f in sorted((run_dir / "rounds").glob("*.parquet"))
           for i in pq.read_table(f).column("id").to_pylist()]  # fmt: skip
    assert len(ids) == len(set(ids)) == 60
