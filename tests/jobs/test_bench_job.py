"""``vlselect bench`` on local Ray at 1,000 rows (the stages that need no LLM or training;
the slow suite runs those), the report's pieces, and the refusals."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from benchmarks.bench import BenchConfig
from benchmarks.suite import Figure
from benchmarks.suite_report import growth, seconds_for_n
from engine.workspace import Workspace
from jobs.cli import main

FAST_STAGES = "world,ingest,embed,cluster,retrieval,coordinator"


@pytest.fixture(scope="module")
def bench_ws(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    config = root / "bench.yaml"
    config.write_text(
        yaml.safe_dump({"bench": {"reference_rows": 400, "queries": 96, "query_batch": 16}})
    )
    ws = root / "ws"
    argv = ["bench", "--workspace", str(ws), "--config", str(config), "--sizes", "1000"]
    assert main([*argv, "--stages", FAST_STAGES]) == 0
    return ws


def test_every_figure_has_its_reference_and_ratio(bench_ws):
    doc = json.loads((bench_ws / "report" / "bench.json").read_text())
    figures = doc["figures"]
    stages = {f["stage"] for f in figures}
    assert stages == {"world", "ingest", "embed:dino", "embed:text", "cluster", "retrieval",
                      "coordinator", "e2e"}  # fmt: skip
    for f in figures:
        assert f["n"] == 1000 and f["value"] > 0 and f["reference_value"] > 0, f
        assert f["reference"] and math.isfinite(f["ratio"]) and f["ratio"] > 0, f
    metrics = {f["metric"] for f in figures if f["stage"] == "retrieval"}
    assert metrics == {"build time", "queries/s", "p50 latency", "p99 latency"}
    e2e = next(f for f in figures if f["stage"] == "e2e")
    jobs = [f for f in figures if f["stage"] in ("world", "ingest", "embed:dino", "embed:text")]
    assert e2e["value"] > sum(f["seconds"] for f in jobs)  # cluster and index count too
    assert all(f["peak_total_mib"] > 0 for f in jobs)


def test_report_lists_figures_plot_and_artifacts(bench_ws):
    report = bench_ws / "report"
    page = (report / "bench.md").read_text()
    assert "| coordinator | round latency (ms) | 1,000 |" in page
    assert "## Growth with pool size" in page and "## Artifacts" in page
    assert str(report / "bench.json") in page
    assert (report / "bench_scaling.png").read_bytes().startswith(b"\x89PNG")
    assert not (bench_ws / "n1000").exists()  # removed unless keep: true


def test_ratio_is_speed_either_way():
    rate = Figure("ingest", 10, "rows/s", "rows/s", 50.0, "bare", 100.0)
    time = Figure("cluster", 10, "k-means time", "s", 4.0, "faiss", 2.0, higher_is_better=False)
    assert rate.ratio == 0.5 and time.ratio == 0.5
    assert math.isnan(Figure("x", 1, "rows/s", "rows/s", 0.0, "r", 1.0).ratio)


def test_growth_exponent_is_the_log_log_slope():
    def fig(n, value, metric="rows/s", unit="rows/s"):
        return Figure("s", n, metric, unit, value, "r", 1.0).as_dict()

    linear = growth([fig(1000, 100.0), fig(100_000, 100.0)])  # constant rate: linear time
    assert linear[0]["exponent"] == 1.0
    flat = growth([fig(1000, 5.0, "round latency", "ms"), fig(100_000, 5.0, "round latency", "ms")])
    assert flat[0]["exponent"] == 0.0
    qps = growth([fig(1000, 1000.0, "queries/s", "q/s"), fig(100_000, 100.0, "queries/s", "q/s")])
    assert qps[0]["exponent"] == 0.5  # each query 10x slower over a 100x pool
    assert seconds_for_n(fig(1000, 100.0)) == 10.0
    assert seconds_for_n(fig(1000, 2.0, "queries/s", "q/s")) is None
    assert seconds_for_n(fig(1000, 3.0, "p50 latency", "ms")) is None


def test_config_refuses_tiny_sizes_and_unknown_stages():
    with pytest.raises(ValueError, match="at least 1,000 rows"):
        BenchConfig(sizes=[10])
    with pytest.raises(ValueError, match="stages"):
        BenchConfig(stages=["world", "telepathy"])
    assert BenchConfig(sizes=[100_000, 10_000, 10_000]).sizes == [10_000, 100_000]


def test_remote_workspace_is_refused(tmp_path):
    import pyarrow.fs as pafs

    from benchmarks.bench import main as bench_main
    from engine.errors import InputError

    remote = Workspace(uri="s3://bucket/bench", fs=pafs.LocalFileSystem(), root=str(tmp_path))
    with pytest.raises(InputError, match="local or mounted workspace path"):
        bench_main(BenchConfig(sizes=[1000]), remote)
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_bad_sizes_flag_is_a_clear_error(capsys):
    assert main(["bench", "--workspace", "/tmp/unused-bench", "--sizes", "10k"]) == 2
    err = capsys.readouterr().err
    assert "invalid bench config" in err and "sizes.0" in err and "'10k'" in err
