"""The whole ``vlselect demo`` on local Ray (a 300-row world, the tiny LLM for skills, a tiny
base) and its HTML report opened in headless Chromium: every figure decoded and shown."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from engine.text import instruction_text
from jobs.cli import main
from tests.engine.test_llava import TINY, TINY_TRAIN
from tests.jobs.test_progress_job import TINY_RUN
from tests.jobs.test_target_job import cache_skills

pytestmark = pytest.mark.slow
# Without the background-networking flags Chromium keeps dialling out of a closed network.
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


@pytest.fixture(scope="module")
def demo_ws(ray_session, tmp_path_factory):
    """The demo on a 300-row world whose questions' skills are already in the skills cache
    (the stand-in answers of the target job's tests: SmolLM2 would take minutes, the
    tiny random LLM's answers do not parse), with the tiny base and PROGRESS recipe."""
    root = tmp_path_factory.mktemp("demo-full")
    ws = root / "ws"
    assert main(["world", "--out", str(ws), "--size", "300"]) == 0
    questions = []
    for f in [*(ws / "world" / "source").glob("*.parquet"), *(ws / "benchmarks").glob("*.parquet")]:
        turns = pq.read_table(f, columns=["conversations"]).column(0).to_pylist()
        questions += [instruction_text(t) for t in turns]
    cache_skills(ws, questions)
    stages = {
        "base": {"model": TINY, "train": TINY_TRAIN},
        "progress": {k: v for k, v in TINY_RUN.items() if k != "budget"},
    }
    config = root / "demo.yaml"
    config.write_text(yaml.safe_dump({"demo": {"size": 300, "stages": stages}}))
    assert main(["demo", "--workspace", str(ws), "--config", str(config)]) == 0
    return ws


def test_every_stage_ran_and_accounted_for_its_rows(demo_ws):
    s = json.loads((demo_ws / "report" / "summary.json").read_text())
    assert s["ingest"]["accepted"] + s["ingest"]["rejected"] == s["ingest"]["records_in"] == 300
    assert s["skills"]["ok"] + s["skills"]["failed"] == 300 and s["skills"]["generated"] == 0
    assert [r["space"] for r in s["index"]] == ["clip", "skill"]
    benches = s["target"]["benchmarks"]
    assert len(benches) == 4 and all(b["selected"] == s["target"]["budget"] == 60 for b in benches)
    assert s["progress"]["spent"] == s["progress"]["budget"] == 60
    assert (demo_ws / "selections" / "demo" / benches[0]["benchmark"] / "ids.txt").exists()
    assert (demo_ws / "progress" / "demo" / "ids.txt").exists()


def test_report_opens_in_headless_chromium_with_every_figure(demo_ws, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium on this machine (Debian: apt-get install chromium)")
    page = demo_ws / "report" / "index.html"
    figures = len(re.findall(r'class="figure"', page.read_text()))
    assert figures == 2 + 4 + 3  # clusters, 4 cross-rank scatters, PROGRESS's three plots
    profile = ["--user-data-dir=" + str(tmp_path / "profile")]
    dom = subprocess.run(
        [chromium, *CHROMIUM_FLAGS, *profile, "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout  # fmt: skip
    assert f'data-figures-loaded="{figures}"' in dom and f'data-figures="{figures}"' in dom
    shot = tmp_path / "report.png"
    subprocess.run(
        [chromium, *CHROMIUM_FLAGS, *profile, f"--screenshot={shot}", "--window-size=1200,2400",
         page.as_uri()],
        capture_output=True, timeout=120, check=True,
    )  # fmt: skip
    pixels = np.asarray(Image.open(shot).convert("L"))
    assert pixels.shape == (2400, 1200) and pixels.std() > 10  # drawn, not a blank page
