"""The whole ``vlselect bench`` at two sizes on local Ray: the packaged SmolLM2 describing a
few questions beside a bare ``generate`` loop, PROGRESS training (Ray Train, DeepSpeed)
beside a one-process fine-tune, and every figure with its reference."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from jobs.cli import main

# Two worlds, SmolLM2 twice, a base and PROGRESS: longer than the default 600 s on a loaded machine.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


def test_bench_every_stage_at_two_sizes(ray_session, tmp_path):
    config = tmp_path / "bench.yaml"
    settings = {"reference_rows": 500, "queries": 64, "skills_limit": 4, "train_budget": 128}
    config.write_text(yaml.safe_dump({"bench": settings}))
    ws = tmp_path / "ws"
    argv = ["bench", "--workspace", str(ws), "--config", str(config), "--sizes", "1000,2000"]
    assert main(argv) == 0
    doc = json.loads((ws / "report" / "bench.json").read_text())
    by_size: dict[int, set[str]] = {}
    for f in doc["figures"]:
        assert f["value"] > 0 and f["reference_value"] > 0 and math.isfinite(f["ratio"]), f
        by_size.setdefault(f["n"], set()).add(f["stage"])
    once = {"skills", "train"}
    assert once <= by_size[1000] and not once & by_size[2000]
    assert by_size[1000] - once == by_size[2000]
    train = {f["metric"] for f in doc["figures"] if f["stage"] == "train"}
    assert train == {"step time", "tokens/s"}
    exponents = {(g["stage"], g["metric"]): g.get("exponent") for g in doc["growth"]}
    assert exponents[("world", "rows/s")] is not None
    assert (ws / "report" / "bench_scaling.png").stat().st_size > 10_000
