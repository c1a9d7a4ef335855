"""QA fine-tuning from the base: PEFT LoRA on the language model, the projector trained
fully with its own learning rate, the vision tower frozen (LLaVA-1.5's recipe)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from engine.llava.config import FinetuneConfig
from engine.llava.data import EpochBatcher
from engine.llava.evaluate import answer_correct
from engine.llava.train import torch_stepper, train_loop

PROJECTOR = "multi_modal_projector"


def prepare_for_finetune(model, cfg: FinetuneConfig):
    """Freeze the tower; wrap the LM in LoRA adapters (PEFT) with the projector (and, if
    set, the LM's embeddings and head) trained in full. Returns the model to train
    (a ``PeftModel`` with LoRA, else ``model`` itself with the LM trainable)."""
    import torch

    torch.manual_seed(cfg.seed)
    if cfg.lora is None:
        for n, p in model.named_parameters():
            p.requires_grad_("vision_tower" not in n)
        return model
    from peft import LoraConfig, get_peft_model

    full = [PROJECTOR] + (["embed_tokens", "lm_head"] if cfg.lora.train_embeddings else [])
    targets = "|".join(cfg.lora.target_modules)
    peft_cfg = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        # a regex, so that only the language model's layers get adapters
        target_modules=rf".*language_model.*\.({targets})",
        modules_to_save=full,
        bias="none",
    )
    return get_peft_model(model, peft_cfg)


def param_groups(model, cfg: FinetuneConfig) -> list[dict]:
    """Trainable parameters in two groups: the projector at ``projector_lr``, the rest
    (adapters, or the LM) at ``lr``. Pass to AdamW or to ``deepspeed.initialize``."""
    proj, rest = [], []
    for n, p in model.named_parameters():
        if p.requires_grad:
            (proj if PROJECTOR in n else rest).append(p)
    return [
        {"params": rest, "lr": cfg.lr, "name": "lm"},
        {"params": proj, "lr": cfg.projector_lr, "name": "projector"},
    ]


def epoch_batches(
    processor,
    examples: Sequence[Mapping[str, Any]],
    cfg: FinetuneConfig,
    max_length: int,
    *,
    blank_images: bool = False,
):
    """Shuffled batches over ``cfg.epochs`` passes (a fractional last pass is cut short);
    every example is encoded once however many passes draw it (``EpochBatcher``)."""
    n = len(examples)
    batcher = EpochBatcher(examples, processor, max_length=max_length, blank_images=blank_images)
    steps = total_steps(n, cfg)
    rng = np.random.default_rng(cfg.seed)
    order = np.zeros(0, np.int64)
    for _ in range(steps):
        if len(order) < cfg.batch_size:
            order = np.concatenate([order, rng.permutation(n)])
        idx, order = order[: cfg.batch_size], order[cfg.batch_size :]
        yield batcher.batch(idx.tolist())


def steps_for(rows: int, epochs: float, batch_size: int) -> int:
    """Optimiser steps to pass ``epochs`` times over ``rows`` rows in batches of
    ``batch_size`` (at least one): the one step rule of every fine-tune, PROGRESS's rounds
    included."""
    return max(1, math.ceil(epochs * rows / batch_size))


def total_steps(n_examples: int, cfg: FinetuneConfig) -> int:
    return steps_for(n_examples, cfg.epochs, cfg.batch_size)


def finetune(
    model,
    processor,
    examples: Sequence[Mapping[str, Any]],
    cfg: FinetuneConfig,
    max_length: int,
    *,
    blank_images: bool = False,
    log: Callable[[str], None] = print,
    log_every: int = 50,
    progress: str | None = None,
):
    """Fine-tune a base on chat ``examples`` (``engine.llava.chat``: an image and whole
    conversations, or a question and its answer). Returns
    (trained model, per-step losses). ``blank_images`` trains the text-only prior;
    ``progress`` names a progress bar over the steps."""
    model = prepare_for_finetune(model, cfg)
    steps = total_steps(len(examples), cfg)
    stepper = torch_stepper(
        model,
        param_groups(model, cfg),
        steps,
        warmup=cfg.warmup,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
    )
    batches = epoch_batches(processor, examples, cfg, max_length, blank_images=blank_images)
    losses = train_loop(
        stepper, batches, log_every=log_every, log=log, progress=progress, total=steps
    )
    return model, losses


def accuracy_by_group(
    model,
    processor,
    examples: Sequence[Mapping[str, Any]],
    groups: Sequence[str],
    max_length: int,
    *,
    blank_images: bool = False,
    batch_size: int = 128,
) -> dict[str, float]:
    """Normalized-match accuracy per group (e.g. family) and 'overall'."""
    correct, _ = answer_correct(
        model,
        processor,
        examples,
        max_length=max_length,
        batch_size=batch_size,
        max_new_tokens=8,
        blank_images=blank_images,
    )
    g = np.asarray(groups)
    out = {str(k): float(correct[g == k].mean()) for k in sorted(set(groups))}
    out["overall"] = float(correct.mean())
    return out
