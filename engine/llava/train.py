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


def deepspeed_config(micro_batch: int, accumulation: int, zero_stage: int, clip: float) -> dict:
    """The DeepSpeed config the engine runs with (the optimiser and schedule are ours)."""
    zero: dict[str, Any] = {"stage": zero_stage}
    if zero_stage == 3:
        # Gathered 16-bit weights on save, so the LoRA adapter is written whole.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }


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
