"""The one training step every trainer shares: base pretraining, the QA benchmark, and
the Ray Train DeepSpeed job.

``train_step(stepper, batch)`` runs forward, backward and the optimizer step through
a small adapter, so a plain torch optimizer (``TorchStepper``) and a DeepSpeed engine
(``DeepSpeedStepper``: ``engine.backward`` / ``engine.step``, which clip, step the
scheduler and zero the gradients themselves) go through the same code.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from engine.llava.data import model_inputs

TORCH_DTYPE = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def resolve_precision(precision: str, cuda: bool) -> str:
    """'auto' -> bf16 on a GPU that has it, fp16 on an older GPU, fp32 on CPU (bf16
    matmuls on CPU are slower than fp32 ones); an explicit choice is kept."""
    if precision != "auto":
        return precision
    if not cuda:
        return "fp32"
    import torch

    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def resolve_attention(attention: str, cuda: bool, precision: str) -> str:
    """'auto' -> flash_attention_2 on a GPU in 16 bit when flash-attn is installed, else
    PyTorch's SDPA (which itself picks a flash or memory-efficient kernel on GPUs)."""
    if attention != "auto":
        return attention
    import importlib.util

    flash = cuda and precision != "fp32" and importlib.util.find_spec("flash_attn") is not None
    return "flash_attention_2" if flash else "sdpa"


def deepspeed_config(
    micro_batch: int, accumulation: int, zero_stage: int, clip: float, precision: str = "fp32"
) -> dict:
    """The DeepSpeed config the engine runs with (the optimiser and schedule are ours).

    bf16: 16-bit weights and compute, fp32 master weights and Adam moments in the ZeRO
    optimizer. fp16: the same with dynamic loss scaling (2^16 to start, halved on
    overflow, the step skipped). fp32: neither."""
    zero: dict[str, Any] = {"stage": zero_stage}
    if zero_stage == 3:
        # Gathered 16-bit weights on save, so the LoRA adapter is written whole.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    if precision == "bf16":
        config["bf16"] = {"enabled": True}
    elif precision == "fp16":
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16,
                          "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1}  # fmt: skip
    return config


class Stepper(Protocol):
    """What ``train_step`` needs of a trainer: the model to call, backward, step."""

    model: Any

    def backward(self, loss) -> None: ...

    def step(self) -> None: ...


@dataclass
class TorchStepper:
    """A torch optimizer (and optional LR scheduler) with gradient clipping."""

    model: Any
    optimizer: Any
    scheduler: Any = None
    max_grad_norm: float | None = 1.0

    def backward(self, loss) -> None:
        loss.backward()

    def step(self) -> None:
        import torch

        if self.max_grad_norm:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)


@dataclass
class DeepSpeedStepper:
    """A DeepSpeed engine: its config holds clipping, scheduler and accumulation."""

    model: Any  # deepspeed.DeepSpeedEngine

    def backward(self, loss) -> None:
        self.model.backward(loss)

    def step(self) -> None:
        self.model.step()


def deepspeed_stepper(model, finetune, *, micro_batch: int, accumulation: int, zero_stage: int,
                      precision: str, total_steps: int) -> DeepSpeedStepper:  # fmt: skip
    """A DeepSpeed engine around ``model`` (already wrapped by ``prepare_for_finetune``):
    AdamW over its trainable parameters in ``param_groups`` (the projector at its own lr),
    one cosine schedule over ``total_steps``, ZeRO ``zero_stage`` in ``precision``.

    Needs ``torch.distributed`` (Ray Train's process group; DeepSpeed starts one from
    RANK/WORLD_SIZE/MASTER_ADDR otherwise) and, on a CPU, ``DS_ACCELERATOR=cpu``."""
    import deepspeed
    import torch

    from engine.llava.finetune import param_groups

    groups = [{k: v for k, v in g.items() if k != "name"} for g in param_groups(model, finetune)]
    optimizer = torch.optim.AdamW(
        [g for g in groups if g["params"]], weight_decay=finetune.weight_decay
    )
    schedule = cosine_lambda(total_steps, finetune.warmup)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
        config=deepspeed_config(
            micro_batch, accumulation, zero_stage, finetune.max_grad_norm, precision
        ),
    )
    return DeepSpeedStepper(engine)


def train_step(stepper: Stepper, batch: Mapping[str, Any]) -> float:
    """One optimisation step on ``batch`` (from ``collate``, labels included).

    The loss is the mean cross-entropy over the batch's answer tokens (transformers'
    causal LM loss over labels != -100). Returns it as a Python float.
    """
    model = stepper.model
    model.train()
    out = model(**model_inputs(batch, model))
    stepper.backward(out.loss)
    stepper.step()
    return float(out.loss.detach())


def cosine_lambda(total_steps: int, warmup: float) -> Callable[[int], float]:
    """LR multiplier: linear warm-up over ``warmup`` of the steps, then cosine to 0."""
    warm = max(1, int(round(total_steps * warmup))) if warmup > 0 else 0

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, total_steps - warm)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


def torch_stepper(
    model,
    param_groups: list[dict],
    total_steps: int,
    *,
    warmup: float = 0.03,
    weight_decay: float = 0.0,
    max_grad_norm: float | None = 1.0,
) -> TorchStepper:
    """AdamW over ``param_groups`` (each with its own 'lr') and one cosine schedule."""
    import torch

    groups = [g for g in param_groups if g["params"]]
    opt = torch.optim.AdamW(groups, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_lambda(total_steps, warmup))
    return TorchStepper(model, opt, sched, max_grad_norm)


def train_loop(
    stepper: Stepper,
    batches: Iterable[Mapping[str, Any]],
    *,
    log_every: int = 0,
    log: Callable[[str], None] = print,
    progress: str | None = None,
    total: int | None = None,
) -> list[float]:
    """``train_step`` over ``batches``; returns every step's loss. ``progress`` names a
    tqdm bar (``total`` steps) that shows the running loss."""
    losses = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        batches = bar = tqdm(batches, total=total, desc=progress, leave=False)
    for i, batch in enumerate(batches):
        losses.append(train_step(stepper, batch))
        if bar is not None and i % 10 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
        if log_every and (i + 1) % log_every == 0:
            recent = losses[-log_every:]
            log(f"step {i + 1}: loss {sum(recent) / len(recent):.4f}")
    return losses
