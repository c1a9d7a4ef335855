"""The PROGRESS workers' training step on a LLaVA-1.5-7B-shaped layer stack, measured beside
the memory plan's estimate for the same stack.

The model is llava-hf's LLaVA-1.5-7B configuration (configs/models/llava-1.5-7b-hf) with
``--layers`` of its 32 decoder layers (and ``--vision-layers`` of the tower's 24), random
weights, in bf16: the recipe of configs/progress-llava.yaml (LoRA r=128 on the seven
projections, the projector trained, gradient checkpointing, SDPA), through the workers' own
``prepare_for_finetune`` and ``deepspeed_stepper`` (ZeRO ``--zero-stage``, one rank) and
``train_step``. A batch is ``--micro-batch`` samples of ``--seq-len`` tokens: the 576 image
tokens of one 336 px image each, a user turn and an answer (the labels).

Per row: ms a step, tokens/s, the peak of torch's allocator (allocated and reserved) after
the engine is built, and the plan's total less its fixed CUDA overhead (what the allocator
should see) for one worker at the same shapes. On a CPU (``--device cpu``) there is no
allocator peak: the rows time the step only, and ``--small`` shrinks the stack (widths too)
to a smoke run of the same path.

    python benchmarks/llava_memory.py --device cuda [--layers 4] [--micro-batch 16 8] \\
        [--out $OUT/llava_memory.json]
    python benchmarks/llava_memory.py --device cpu --small
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import report  # noqa: E402

CONFIG = ROOT / "configs" / "models" / "llava-1.5-7b-hf" / "config.json"
RECIPE = ROOT / "configs" / "progress-llava.yaml"
HEADER = ["layers", "micro-batch", "seq", "zero", "ms/step", "tokens/s", "allocated GiB",
          "reserved GiB", "plan GiB", "plan / allocated", "loss"]  # fmt: skip


def stack_config(layers: int, vision_layers: int, narrow: bool = False):
    """LLaVA-1.5-7B's ``LlavaConfig`` with fewer decoder (and tower) layers; ``narrow``
    also shrinks the widths 16-fold (the CPU smoke run: the 7B widths cost minutes a step
    in bf16 on a CPU), keeping the 336 px image and its 576 tokens."""
    from transformers import LlavaConfig

    config = LlavaConfig.from_dict(json.loads(CONFIG.read_text()))
    config.text_config.num_hidden_layers = layers
    config.vision_config.num_hidden_layers = vision_layers
    if narrow:
        for part in (config.text_config, config.vision_config):
            part.hidden_size //= 16
            part.intermediate_size //= 16
            part.num_attention_heads //= 8
        text = config.text_config
        text.num_key_value_heads = text.num_attention_heads
        text.head_dim = text.hidden_size // text.num_attention_heads
        config.vision_config.projection_dim //= 16
    # the feature layer (-2) must exist in a shortened tower
    config.vision_feature_layer = max(config.vision_feature_layer, -vision_layers)
    return config


def recipe():
    """The shipped 7B config's fine-tune section (LoRA r=128, its learning rates)."""
    import yaml

    from engine.llava.config import FinetuneConfig

    section = yaml.safe_load(RECIPE.read_text())["progress"]["finetune"]
    return FinetuneConfig.model_validate(section)


def synthetic_batch(config, micro_batch: int, seq_len: int, seed: int = 0) -> dict:
    """``collate``'s keys: [bos, 576 image tokens, a user turn, an answer], right-padded
    to nothing (every row full); labels on the answer's second half of the text."""
    import torch

    g = torch.Generator().manual_seed(seed)
    image_tokens = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
    text = seq_len - 1 - image_tokens
    if text < 16:
        raise SystemExit(f"--seq-len {seq_len} leaves {text} text tokens after the image")
    vocab = config.text_config.vocab_size
    ids = torch.randint(3, config.image_token_index, (micro_batch, seq_len), generator=g)
    ids[:, 0] = 1  # bos
    ids[:, 1 : 1 + image_tokens] = config.image_token_index
    labels = torch.full_like(ids, -100)
    answer = 1 + image_tokens + text // 2
    labels[:, answer:] = ids[:, answer:]
    size = config.vision_config.image_size
    return {
        "input_ids": ids.clamp(max=vocab - 1),
        "attention_mask": torch.ones_like(ids),
        "labels": labels,
        "pixel_values": torch.randn(micro_batch, 3, size, size, generator=g),
    }


def one_rank_group(device: str) -> None:
    """A one-rank process group (the workers' Ray Train group, of one)."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}  # fmt: skip
    os.environ.update(env)
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")


def measure(args, layers: int, micro_batch: int) -> dict:
    import torch
    from transformers import LlavaForConditionalGeneration

    from engine.llava import prepare_for_finetune, train_step
    from engine.llava.memory import CUDA_OVERHEAD_GIB, plan_memory
    from engine.llava.train import deepspeed_stepper

    cuda = args.device.startswith("cuda")
    config = stack_config(layers, args.vision_layers, narrow=args.small)
    finetune = recipe()
    torch.manual_seed(0)
    with torch.device(args.device):
        model = LlavaForConditionalGeneration._from_config(
            config, dtype=torch.bfloat16, attn_implementation="sdpa"
        )
    model.gradient_checkpointing_enable({"use_reentrant": False})
    model.config.text_config.use_cache = False
    model = prepare_for_finetune(model, finetune)
    stepper = deepspeed_stepper(model, finetune, micro_batch=micro_batch, accumulation=1,
                                zero_stage=args.zero_stage, precision="bf16",
                                total_steps=1000)  # fmt: skip
    batch = synthetic_batch(config, micro_batch, args.seq_len)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    losses = [train_step(stepper, batch)]  # the first step allocates the optimizer state
    sync()
    start = time.perf_counter()
    losses += [train_step(stepper, batch) for _ in range(args.steps)]
    sync()
    seconds = (time.perf_counter() - start) / args.steps
    plan = plan_memory(config, finetune, zero_stage=args.zero_stage, micro_batch=micro_batch,
                       seq_len=args.seq_len, workers=1, precision="bf16",
                       gradient_checkpointing=True)  # fmt: skip
    planned = round(plan.total_gib - CUDA_OVERHEAD_GIB, 2)
    row = {"layers": layers, "micro-batch": micro_batch, "seq": args.seq_len,
           "zero": args.zero_stage, "ms/step": round(1000 * seconds, 1),
           "tokens/s": round(micro_batch * args.seq_len / seconds, 1),
           "plan GiB": planned, "loss": f"{losses[0]:.3f} -> {losses[-1]:.3f}",
           "plan": plan.model_dump()}  # fmt: skip
    if cuda:
        allocated = torch.cuda.max_memory_allocated() / 2**30
        row["allocated GiB"] = round(allocated, 2)
        row["reserved GiB"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
        row["plan / allocated"] = round(planned / allocated, 2)
    del stepper, model
    if cuda:
        torch.cuda.empty_cache()
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--layers", type=int, nargs="+", default=[4], help="decoder layers (of 32)")
    p.add_argument("--vision-layers", type=int, default=24, help="tower layers (of 24)")
    p.add_argument("--micro-batch", type=int, nargs="+", default=[16, 8])
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--zero-stage", type=int, default=2, choices=[2, 3])
    p.add_argument("--steps", type=int, default=3, help="timed steps after the first")
    p.add_argument("--small", action="store_true",
                   help="CPU smoke: 1 layer, 2 tower layers, widths / 16, 640 tokens")  # fmt: skip
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/llava_memory.json"))
    args = p.parse_args()
    if args.small:
        args.layers, args.vision_layers, args.micro_batch = [1], 2, [1]
        args.seq_len, args.steps = 640, 1
    if not args.device.startswith("cuda"):
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from engine.warning_filters import install

    install()
    one_rank_group(args.device)
    rows = [measure(args, n, b) for n in args.layers for b in args.micro_batch]
    report("llava_memory", rows, HEADER, args.out, device=args.device,
           recipe=str(RECIPE.relative_to(ROOT)))  # fmt: skip


if __name__ == "__main__":
    main()
