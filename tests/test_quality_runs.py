"""The quality benchmark's trainings side by side on Ray actors: the same results as one
after the other on the driver's threads, stored whole, and never trained twice."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.quality_runs import Bench, RunSpec, train_all
from engine.llava import FinetuneConfig
from tests.jobs.test_progress_job import build_tiny_ws

RECIPE = FinetuneConfig(
    lora={"r": 4, "alpha": 8}, lr=1e-2, projector_lr=1e-2, epochs=2, batch_size=8
)


@pytest.fixture(scope="module")
def bench(ray_session, tmp_path_factory) -> Bench:
    ws, _ = build_tiny_ws(tmp_path_factory)
    return Bench.open(str(ws), RECIPE, str(ws))


def stored(bench: Bench) -> dict[str, int]:
    """Each stored run's file and when it was written (ns)."""
    return {p.name: p.stat().st_mtime_ns for p in bench.runs_dir.iterdir()}


def test_runs_side_by_side_match_the_driver_and_are_not_trained_again(bench):
    specs = [
        RunSpec("a", np.arange(0, 40), seed=0, evals=("test",)),
        RunSpec("b", np.arange(40, 64), seed=1, evals=("test",)),
        RunSpec("prior", np.arange(0, 24), seed=0, blank=True, evals=("test",)),
    ]
    alone = bench.train_and_score(specs[0])  # the driver's torch, all its threads

    got = train_all(bench, specs, workers=None, desc="tiny")  # 2 CPUs: 2 actors, 1 thread each
    assert sorted(got) == ["a", "b", "prior"]
    assert got["a"]["accuracy"] == alone["accuracy"]
    assert got["a"]["final_loss"] == alone["final_loss"]
    assert [got[s.key]["rows"] for s in specs] == [40, 24, 24]
    assert got["prior"]["steps"] == 6  # ceil(2 epochs x 24 rows / 8)
    written = stored(bench)
    assert sorted(written) == ["a.json", "b.json", "prior.json"]  # whole, no partials left

    again = train_all(bench, specs, workers=None, desc="tiny")
    assert again == got and stored(bench) == written  # all cached: nothing trained

    # a run whose rows changed is trained again, and only it
    changed = RunSpec("b", np.arange(40, 60), seed=1, evals=("test",))
    redo = train_all(bench, [specs[0], changed], workers=None, desc="tiny")
    assert redo["a"] == got["a"] and redo["b"]["rows"] == 20
    now = stored(bench)
    assert now["a.json"] == written["a.json"] and now["b.json"] != written["b.json"]
