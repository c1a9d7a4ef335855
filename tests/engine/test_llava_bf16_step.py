"""The training step the PROGRESS workers run, in bf16 on the CPU: the tiny LLaVA saved in
llava-hf's layout, loaded in bf16 by the one loader, gradient checkpointing on, LoRA through
``prepare_for_finetune``, a DeepSpeed ZeRO-2 engine (``deepspeed_stepper``) in a
one-process gloo group, over a batch of three-turn conversations (``collate``)."""

from __future__ import annotations

import socket

import numpy as np
import pytest

from engine.llava import collate, load_checkpoint, prepare_for_finetune, train_step
from engine.llava.config import FinetuneConfig
from engine.llava.train import deepspeed_stepper
from tests.engine.test_llava_chat import THREE_TURNS
from tests.tiny_llava import save_random_llava


@pytest.fixture
def one_process_group(monkeypatch):
    """A gloo process group of one rank, as Ray Train gives each worker (of many)."""
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                       "DS_ACCELERATOR": "cpu"}.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_a_bf16_step_with_gradient_checkpointing_trains_the_adapters_only(
    tmp_path, one_process_group
):
    import torch

    folder = tmp_path / "tiny-llava-hf"
    save_random_llava(folder)
    loaded = load_checkpoint(str(folder), dtype="bf16", attention="sdpa", max_length=160)
    model = loaded.model
    model.gradient_checkpointing_enable({"use_reentrant": False})
    model.config.text_config.use_cache = False
    finetune = FinetuneConfig.model_validate(
        {
            "lora": {"r": 4, "alpha": 8, "train_embeddings": False},
            "lr": 1e-2,
            "projector_lr": 1e-2,
            "batch_size": 2,
            "warmup": 0.0,
        }  # fmt: skip
    )
    model = prepare_for_finetune(model, finetune)
    stepper = deepspeed_stepper(model, finetune, micro_batch=2, accumulation=1, zero_stage=2,
                                precision="bf16", total_steps=8)  # fmt: skip
    engine = stepper.model
    assert engine.bfloat16_enabled() and engine.zero_optimization_stage() == 2
    module = engine.module
    assert module.is_gradient_checkpointing
    frozen = {n: p.detach().clone() for n, p in module.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    assert {p.dtype for p in module.parameters()} == {torch.bfloat16}  # 16-bit weights
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    examples = [{"id": "a", "image": image, "conversations": THREE_TURNS},
                {"id": "b", "image": image, "conversations": THREE_TURNS[:2]}]  # fmt: skip
    batch = collate(examples, loaded.processor, max_length=loaded.max_length)
    losses = [train_step(stepper, batch) for _ in range(6)]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    # fp32 master weights and Adam moments live in the ZeRO optimizer, not the module
    master = engine.optimizer.single_partition_of_fp32_groups
    assert master and all(p.dtype == torch.float32 for p in master)
    after = dict(module.named_parameters())
    assert all(torch.equal(after[n].detach(), v) for n, v in frozen.items())  # base untouched
    changed = [n for n, v in trained.items() if not torch.equal(after[n].detach(), v)]
    assert any("lora_B" in n for n in changed) and any(
        "multi_modal_projector" in n for n in changed
    )
