"""``vlselect demo`` on local Ray, without its LLM and training stages (the slow suite runs
them): world -> ingest -> embed -> cluster -> index -> the HTML report, and its refusals."""

from __future__ import annotations

import base64
import json
import re

import pytest
import yaml

from jobs.cli import main


@pytest.fixture(scope="module")
def demo_ws(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    config = root / "demo.yaml"
    config.write_text(yaml.safe_dump({"demo": {"size": 200, "targeted": False, "progress": False}}))
    ws = root / "ws"
    assert main(["demo", "--workspace", str(ws), "--config", str(config)]) == 0
    return ws


def test_the_demo_is_a_run_and_a_second_one_recomputes_nothing(demo_ws, capsys):
    """The demo runs jobs/pipeline-demo.yaml through ``vlselect run``: its steps in order,
    and on the same workspace every one of them is current."""
    from engine.artifacts import Clustering, Index, Pool
    from engine.workspace import Workspace

    ws = Workspace.open(str(demo_ws))
    before = [Pool.open(ws).manifest, Clustering.open(ws, "progress").manifest,
              Index.open(ws, "clip").manifest]  # fmt: skip
    config = demo_ws.parent / "demo.yaml"
    assert main(["demo", "--workspace", str(demo_ws), "--config", str(config)]) == 0
    out = capsys.readouterr().out
    steps = re.findall(r"^run: step \d+/\d+: (\S+)", out, re.M)
    assert steps == ["world", "ingest", "embed(clip,dino,text)", "cluster(progress)", "index(clip)"]
    assert out.count("current, nothing recomputed") >= 3  # world, ingest, cluster
    assert [Pool.open(ws).manifest, Clustering.open(ws, "progress").manifest,
            Index.open(ws, "clip").manifest] == before  # fmt: skip


def test_report_shows_the_clusters(demo_ws):
    page = (demo_ws / "report" / "index.html").read_text()
    pngs = [base64.b64decode(s) for s in re.findall(r"base64,([^\"]+)\"", page)]
    assert len(pngs) == 2 and all(p.startswith(b"\x89PNG") for p in pngs)
    assert "Skill clusters" in page and "Targeted selection" not in page


def test_summary_counts_every_row(demo_ws):
    s = json.loads((demo_ws / "report" / "summary.json").read_text())
    assert s["world"]["pool_size"] == 200
    assert s["ingest"]["records_in"] == s["ingest"]["accepted"] + s["ingest"]["rejected"] == 200
    assert s["cluster"]["k"] == 10 and sum(s["cluster"]["sizes"]) == 200
    assert [r["space"] for r in s["index"]] == ["clip"] and s["index"][0]["rows"] == 200
    assert s["report"] == str(demo_ws / "report" / "index.html")


def test_a_bad_stage_section_is_refused_before_any_work(tmp_path, capsys):
    config = tmp_path / "demo.yaml"
    config.write_text(yaml.safe_dump({"demo": {"stages": {"progress": {"budget": -1}}}}))
    assert main(["demo", "--workspace", str(tmp_path / "ws"), "--config", str(config)]) == 2
    assert "budget" in capsys.readouterr().err
    assert not (tmp_path / "ws").exists()
    config.write_text(yaml.safe_dump({"demo": {"stages": {"trian": {}}}}))
    assert main(["demo", "--workspace", str(tmp_path / "ws"), "--config", str(config)]) == 2
    assert "unknown stages ['trian']" in capsys.readouterr().err
