"""``vlselect progress --plan`` on the shipped LLaVA-1.5-7B config: the model built from
llava-hf's config.json on the meta device (no weights), its memory per GPU printed, the
80 GB verdict and the 40 GB one; a run whose plan does not fit is refused before launch."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "progress-llava.yaml"
MODEL = ROOT / "configs" / "models" / "llava-1.5-7b-hf"


def _progress(tmp_path, *extra: str) -> list[str]:
    return ["progress", "--workspace", str(tmp_path / "ws"), "--config", str(CONFIG),
            "--model", str(MODEL), *extra]  # fmt: skip


def _figure(out: str, row: str) -> float:
    return float(re.search(rf"^{row}\s+([\d.]+) GiB$", out, re.M).group(1))


def test_the_shipped_7b_config_plans_within_80_gib_and_says_what_fits_40(tmp_path, capsys):
    from jobs.cli import main

    assert main(_progress(tmp_path, "--plan")) == 0
    out, err = capsys.readouterr()
    assert "llama 32x4096, clip_vision_model 24x1024" in out
    assert re.search(r"^parameters\s+340\.8M trainable, 7,063\.4M frozen$", out, re.M), out
    parts = ["model states", "activations", "logits", "layer backward", "ZeRO buffers",
             "overhead"]  # fmt: skip
    total = _figure(out, "total per GPU")
    assert abs(sum(_figure(out, p) for p in parts) - total) < 0.05
    assert total < 80 and re.search(r"^GPU\s+80 GiB: fits$", out, re.M), out
    largest = int(re.search(r"^largest micro-batch\s+(\d+)$", out, re.M).group(1))
    assert largest >= 16  # the shipped micro-batch, with room
    assert re.search(r"^on 40 GiB\s+(fits|does not fit); largest micro-batch \d+", out, re.M)
    assert "Setting accelerator" not in out + err  # DeepSpeed's CPU notice is not shown
    assert not (tmp_path / "ws").exists()  # a plan writes nothing


def test_a_plan_that_does_not_fit_is_refused_naming_the_knobs(tmp_path, capsys):
    from jobs.cli import main

    # no gradient checkpointing at micro-batch 16 x 2048 tokens: the logits and 32 layers'
    # activations of 16 samples do not fit an A100-80G
    code = main(_progress(tmp_path, "--no-gradient-checkpointing"))
    err = capsys.readouterr().err
    assert code == 2, err
    assert "GiB per GPU, more than the workers' 80 GiB" in err
    assert "progress.gradient_checkpointing: true" in err and "--plan" in err
    assert not (tmp_path / "ws").exists()
