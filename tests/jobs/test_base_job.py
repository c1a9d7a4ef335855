"""``vlselect base`` end to end on one local Ray, with a tiny model: built in a Ray task,
cached, reused without training, refused when the config changes."""

from __future__ import annotations

import json

import yaml

from engine.artifacts import BaseModelArtifact
from engine.workspace import Workspace
from engine.world.config import WorldConfig
from jobs.cli import main
from tests.engine.test_llava import TINY, TINY_TRAIN


def _summary(out: str) -> dict:
    line = next(x for x in out.splitlines() if x.startswith("vlselect-summary "))
    return json.loads(line.removeprefix("vlselect-summary "))


def test_base_job_builds_then_reuses(ray_session, tmp_path, capsys):
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "vlselect.yaml").write_text(
        yaml.safe_dump({"world": WorldConfig().model_dump(mode="json")})
    )
    cfg = tmp_path / "base.yaml"
    tiny = {"model": TINY, "train": TINY_TRAIN, "resources": {"num_cpus": 1}}
    cfg.write_text(yaml.safe_dump({"base": tiny}))
    assert main(["base", "--workspace", str(ws), "--config", str(cfg)]) == 0
    first = _summary(capsys.readouterr().out)
    committed = BaseModelArtifact.open(Workspace.open(str(ws)), "tiny-llava")
    assert first["built"] and first["path"] == committed.dir
    assert committed.meta.recipe == first["fingerprint"]
    assert set(first["vision_patch_accuracy"]) >= {"colour", "shape", "glyph", "row"}
    assert main(["base", "--workspace", str(ws), "--config", str(cfg)]) == 0
    second = _summary(capsys.readouterr().out)
    assert not second["built"] and second["fingerprint"] == first["fingerprint"]
    args = ["base", "--workspace", str(ws), "--config", str(cfg), "--set", "train.caption_steps=5"]
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_base_job_without_a_world_exits_2(tmp_path, capsys):
    assert main(["base", "--workspace", str(tmp_path / "empty")]) == 2
    assert "vlselect world" in capsys.readouterr().err
    assert not (tmp_path / "empty").exists()
