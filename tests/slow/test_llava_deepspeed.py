"""The shared ``train_step`` drives a DeepSpeed engine (ZeRO-2, gloo, CPU) as it drives a
torch optimizer: the same tiny LoRA LLaVA, the same batch, the loss falls."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import json, os, sys
import deepspeed, torch
from engine.llava import (FinetuneConfig, LlavaModelConfig, build_llava, build_world_tokenizer,
    collate, make_processor, param_groups, prepare_for_finetune, train_step)
from engine.llava.train import DeepSpeedStepper
from engine.world.config import WorldConfig
from engine.world.generate import generate_sample
from tests.engine.test_llava import TINY

world = WorldConfig()
tok = build_world_tokenizer(world)
model_cfg = LlavaModelConfig.model_validate(TINY)
model = build_llava(model_cfg, tok)
cfg = FinetuneConfig.model_validate({"lora": {"r": 4, "alpha": 8}, "lr": 1e-2, "projector_lr": 1e-2})
model = prepare_for_finetune(model, cfg)
groups = [{k: v for k, v in g.items() if k != "name"} for g in param_groups(model, cfg)]
deepspeed.init_distributed(dist_backend="gloo")
engine, _, _, _ = deepspeed.initialize(
    model=model,
    optimizer=torch.optim.AdamW(groups),
    config={
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": 2},
        "zero_allow_untested_optimizer": True,
    },
)
examples = []
for i in range(4):
    s, img = generate_sample(world, "test", i)
    examples.append({"image": img, "question": s.question, "answer": s.answer})
batch = collate(examples, make_processor(tok, model_cfg), max_length=160)
stepper = DeepSpeedStepper(engine)
losses = [train_step(stepper, batch) for _ in range(15)]
print("RESULT " + json.dumps(losses))
"""


@pytest.mark.slow
def test_train_step_runs_a_deepspeed_zero2_engine_on_cpu(tmp_path):
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29517",
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "DS_ACCELERATOR": "cpu",
        "PYTHONPATH": str(ROOT),
    }
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    assert lines, out.stdout[-3000:] + out.stderr[-3000:]
    losses = json.loads(lines[-1].removeprefix("RESULT "))
    assert losses[-1] < 0.5 * losses[0]
