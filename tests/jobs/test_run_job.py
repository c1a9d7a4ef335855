"""``vlselect run``: a pipeline config's steps validated, ordered, checked, listed and run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from engine.artifacts import Pool, World
from engine.errors import InputError
from engine.workspace import Workspace
from jobs import run
from jobs.cli import main

ROOT = Path(__file__).resolve().parents[2]


def steps_of(*steps: dict) -> run.RunConfig:
    return run.RunConfig(steps=list(steps))


def test_steps_run_in_dependency_order_whatever_the_listed_order(tmp_path):
    ws = Workspace.open(str(tmp_path / "ws"))
    cfg = steps_of(
        {"index": {"space": "clip"}},
        {"cluster": {"name": "c", "spaces": ["clip"]}},
        {"embed": {"spaces": ["clip"]}},
        {"ingest": {"source": str(tmp_path / "pool.json")}},
    )
    ordered = run.build_steps(cfg, ws)
    assert [s.label for s in ordered] == ["ingest", "embed(clip)", "index(clip)", "cluster(c)"]
    assert run.missing_inputs(ordered, ws) == []


def test_an_input_nothing_writes_is_named_with_the_stage_that_makes_it(tmp_path):
    ws = Workspace.open(str(tmp_path / "ws"))
    steps = run.build_steps(steps_of({"cluster": {"name": "c", "spaces": ["dino", "text"]}}), ws)
    missing = run.missing_inputs(steps, ws)
    assert len(missing) == 2 and "cluster(c) reads embeddings/dino" in missing[0]
    assert "vlselect embed" in missing[0] and "--spaces dino" in missing[0]


def test_every_section_is_validated_before_any_step_runs(tmp_path, capsys):
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(yaml.safe_dump({"pipeline": [
        {"world": {"size": 100}},
        {"ingest": {}},
        {"cluster": {"name": "c", "kk": 3}},
        {"tranin": {}},
    ]}))  # fmt: skip
    ws = tmp_path / "ws"
    assert main(["run", "--workspace", str(ws), "--config", str(pipeline)]) == 2
    err = capsys.readouterr().err
    assert "step 4: unknown stage 'tranin'" in err
    pipeline.write_text(yaml.safe_dump({"pipeline": [{"world": {"size": 100}},
                                                     {"cluster": {"name": "c", "kk": 3}}]}))  # fmt: skip
    assert main(["run", "--workspace", str(ws), "--config", str(pipeline)]) == 2
    err = capsys.readouterr().err
    assert "step 2 (cluster)" in err and "unknown key 'kk'" in err
    assert not ws.exists()  # nothing ran: not even the world of step 1


def test_a_cycle_is_refused():
    ws = Workspace.open("/nonexistent/ws")
    with pytest.raises(InputError, match="cycle"):
        run.order([
            run.Step(1, "a", {}, _Fake([("x", None)], [("y", None)]), None),
            run.Step(2, "b", {}, _Fake([("y", None)], [("x", None)]), None),
        ])  # fmt: skip
    assert ws is not None


class _Fake:
    """A stage module with only its declared reads and writes."""

    def __init__(self, reads, writes):
        from engine.artifacts import Ref

        self._r, self._w = [Ref(*r) for r in reads], [Ref(*w) for w in writes]

    def reads(self, cfg):
        return self._r

    def writes(self, cfg):
        return self._w


def test_dry_run_lists_the_llava_pipeline_on_s3_with_its_resources(s3_server, capsys, tmp_path):
    uri = s3_server.uri("dry")
    config = ROOT / "configs" / "pipeline-llava665k.yaml"
    code = main(["run", "--workspace", uri, "--config", str(config), "--dry-run"])
    out, err = capsys.readouterr()
    # every step listed, with what it reads, writes and asks for
    for label in ("ingest", "embed(clip,dino,text)", "skills", "cluster(progress)",
                  "cluster(warmup)", "index(clip)", "index(skill)", "target(llava20)",
                  "progress(p20)"):  # fmt: skip
        assert label in out, label
    assert "Ray Train worker x8: {'num_cpus': 8.0, 'num_gpus': 1.0" in out
    assert "'accelerator_type': 'A100-80G'" in out
    assert "clip encoder actor" in out and "vLLM engine x4" in out
    summary = json.loads(out.split("vlselect-summary ", 1)[1].splitlines()[0])
    assert [s["stage"] for s in summary["steps"]][:3] == ["ingest", "embed", "skills"]
    assert all(v == "missing" for s in summary["steps"] for v in s["writes"].values())
    # the 7B checkpoint lives outside the workspace, so every workspace input has its step
    assert code == 0 and summary["missing"] == [], err
    assert not s3_server.fs().get_file_info("vlbucket/dry").size  # nothing written

    # a progress step that names a workspace base instead needs `vlselect base` first
    pipeline = yaml.safe_load(config.read_text())
    next(s for s in pipeline["pipeline"] if "progress" in s)["progress"]["model"] = "llava-1.5-7b"
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(pipeline))
    code = main(["run", "--workspace", uri, "--config", str(tmp_path / "p.yaml"), "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2 and "reads model/llava-1.5-7b" in err and "vlselect base" in err
    assert not s3_server.fs().get_file_info("vlbucket/dry").size


def test_a_run_runs_and_a_second_run_keeps_what_is_current(ray_session, tmp_path, capsys):
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(yaml.safe_dump({"pipeline": [{"ingest": {}}, {"world": {"size": 100}}]}))
    ws = tmp_path / "ws"
    argv = ["run", "--workspace", str(ws), "--config", str(pipeline)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.index("run: step 1/2: world") < out.index("run: step 2/2: ingest")
    space = Workspace.open(str(ws))
    world, pool = World.open(space).manifest, Pool.open(space).manifest
    assert Pool.open(space).meta.accepted == 100
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("current, nothing recomputed") == 2
    assert World.open(space).manifest == world and Pool.open(space).manifest == pool
    assert main([*argv, "--dry-run"]) == 0
    assert out.count("kept if current") == 0 and "kept if current" in capsys.readouterr().out
