"""The memory plan against the allocator: the workers' bf16 training step on a
LLaVA-1.5-7B-shaped stack (benchmarks/llava_memory.py) on one GPU. Marked ``gpu``."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
ROOT = Path(__file__).resolve().parents[2]


def test_the_plan_covers_what_the_7b_step_allocates(tmp_path):
    out = tmp_path / "llava_memory.json"
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "llava_memory.py"), "--device", "cuda",
         "--layers", "2", "--micro-batch", "4", "--out", str(out)],
        check=True, timeout=900,
    )  # fmt: skip
    (row,) = json.loads(out.read_text())["rows"]
    assert all(math.isfinite(float(x)) for x in row["loss"].split(" -> "))
    # the plan may overestimate, never fall short by more than the allocator's slack
    assert 0.9 <= row["plan / allocated"] <= 1.5, row
