"""Training the tiny LLaVA's base, once per world (from scratch it never learns
to look at the image in minutes on 2 cores; with this base it does).

1. The vision tower learns per-patch attribute heads (colour, shape, size, glyph, row,
   column) on the base's own scenes, then is frozen (the pretrained CLIP of LLaVA).
2. The language model learns the scene language (``engine.llava.language``): scenes
   given as their cells' words, every family's questions, captions and the text family,
   so that it reasons before it sees an image (the pretrained LLM of LLaVA).
3. The projector learns to caption the base's images with the LM frozen (LLaVA's
   stage 1): each scene's objects in a random order ("small green ring in row 1 column
   4. large red circle in ..."), image tokens before the prompt; it learns to put each
   patch where the LM reads that cell's words. With ``language_steps: 0`` and
   ``caption_trains: projector+lm`` the LM learns from these captions alone (the random
   order is what teaches it to look a patch up by its content; ``caption_style: rows``
   teaches only a fixed reading order).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from engine.devices import resolve_device
from engine.llava.chat import LLAVA_CHAT_TEMPLATE
from engine.llava.config import BaseTrainConfig, LlavaModelConfig
from engine.llava.data import IGNORE, collate, model_inputs
from engine.llava.language import language_accuracy, pretrain_language
from engine.llava.model import build_llava, make_processor, pixel_values
from engine.llava.scenes import (
    ATTRIBUTES,
    Scenes,
    check_grid,
    generate_scene_texts,
    generate_scenes,
)
from engine.llava.tokenizer import build_world_tokenizer, load_tokenizer
from engine.llava.train import torch_stepper, train_loop
from engine.world.config import WorldConfig

Log = Callable[[str], None]


def make_tokenizer(cfg: LlavaModelConfig, world: WorldConfig):
    """The offline world tokenizer, or the hub id / folder ``cfg.tokenizer`` names (given
    llava-hf's chat template when it has none)."""
    if cfg.tokenizer == "world":
        return build_world_tokenizer(world, cfg.max_length)
    tokenizer = load_tokenizer(cfg.tokenizer)
    tokenizer.chat_template = tokenizer.chat_template or LLAVA_CHAT_TEMPLATE
    return tokenizer


def _heads(tower_width: int, grid: int):
    """One linear head per attribute (and row, column) over each patch feature."""
    import torch

    sizes = {**ATTRIBUTES, "row": grid, "col": grid}
    return torch.nn.ModuleDict({k: torch.nn.Linear(tower_width, n) for k, n in sizes.items()})


def _position_labels(n: int, grid: int) -> dict[str, np.ndarray]:
    cells = np.arange(grid * grid)
    return {"row": np.tile(cells // grid, (n, 1)), "col": np.tile(cells % grid, (n, 1))}


def _patch_features(tower, pixels, layer: int):
    """(B, 3, H, W) -> (B, patches, width): the hidden state the projector reads, CLS dropped."""
    out = tower(pixel_values=pixels, output_hidden_states=True)
    return out.hidden_states[layer][:, 1:]


def attribute_accuracy(tower, heads, scenes: Scenes, layer: int, device) -> dict[str, float]:
    """Per-attribute accuracy of the heads on ``scenes``: colour, shape and size over
    occupied cells, glyph over cards, row and column over all cells."""
    import torch

    tower.eval()
    preds: dict[str, list[np.ndarray]] = {k: [] for k in heads}
    with torch.no_grad():
        for i in range(0, len(scenes), 128):
            feats = _patch_features(
                tower, pixel_values(scenes.images[i : i + 128]).to(device), layer
            )
            for k, head in heads.items():
                preds[k].append(head(feats).argmax(-1).cpu().numpy())
    labels = {**scenes.labels, **_position_labels(len(scenes), scenes.grid)}
    occupied = scenes.labels["shape"] != ATTRIBUTES["shape"] - 1
    card = scenes.labels["glyph"] != ATTRIBUTES["glyph"] - 1
    where = {"colour": occupied, "shape": occupied, "size": occupied, "glyph": card}
    out = {}
    for k in heads:
        hit = np.concatenate(preds[k]) == labels[k]
        mask = where.get(k, np.ones_like(hit))
        out[k] = float(hit[mask].mean()) if mask.any() else float("nan")
    return out


def pretrain_vision(
    model, train: Scenes, held_out: Scenes, cfg: BaseTrainConfig, layer: int, device, log: Log
) -> dict[str, float]:
    """Train ``model``'s vision tower with attribute heads, freeze it; held-out accuracies."""
    import torch

    tower = model.model.vision_tower
    heads = _heads(tower.config.hidden_size, train.grid).to(device)
    params = list(tower.parameters()) + list(heads.parameters())
    stepper = torch_stepper(tower, [{"params": params, "lr": cfg.vision_lr}], cfg.vision_steps)
    labels = {**train.labels, **_position_labels(len(train), train.grid)}
    rng = np.random.default_rng(cfg.seed)
    tower.train()
    for step in range(cfg.vision_steps):
        idx = rng.integers(0, len(train), cfg.vision_batch)
        feats = _patch_features(tower, pixel_values(train.images[idx]).to(device), layer)
        loss = 0.0
        for k, head in heads.items():
            target = labels[k][idx]
            if k == "glyph":
                # Over card cells only: as one class among 'no card' on every cell, a digit
                # is 2% of the glyph head's targets and the head learns little but 'none'.
                target = np.where(target == ATTRIBUTES["glyph"] - 1, IGNORE, target)
                if (target == IGNORE).all():
                    continue
            loss = loss + torch.nn.functional.cross_entropy(
                head(feats).flatten(0, 1), torch.from_numpy(target).flatten().to(device)
            )
        stepper.backward(loss)
        stepper.step()
        if (step + 1) % 100 == 0:
            log(f"vision step {step + 1}/{cfg.vision_steps}: loss {float(loss.detach()):.4f}")
    acc = attribute_accuracy(tower, heads, held_out, layer, device)
    tower.requires_grad_(False)
    tower.eval()
    return acc


def _caption_examples(scenes: Scenes, idx) -> list[dict]:
    return [
        {"image": scenes.images[i], "question": scenes.prompt, "answer": scenes.captions[i]}
        for i in idx
    ]


def caption_metrics(model, processor, scenes: Scenes, max_length: int) -> dict[str, float]:
    """Teacher-forced caption loss (mean per token) and token accuracy on ``scenes``."""
    import torch

    model.eval()
    nll, hits, count = 0.0, 0, 0
    with torch.no_grad():
        for i in range(0, len(scenes), 64):
            ex = _caption_examples(scenes, range(i, min(i + 64, len(scenes))))
            inputs = model_inputs(collate(ex, processor, max_length=max_length), model)
            labels = inputs.pop("labels")[:, 1:]
            logits = model(**inputs).logits[:, :-1].float()
            mask = labels != IGNORE
            nll += float(
                torch.nn.functional.cross_entropy(logits[mask], labels[mask], reduction="sum")
            )
            hits += int((logits.argmax(-1)[mask] == labels[mask]).sum())
            count += int(mask.sum())
    return {"caption_loss": nll / max(count, 1), "caption_token_accuracy": hits / max(count, 1)}


def align_captions(
    model, processor, train: Scenes, cfg: BaseTrainConfig, max_length: int, log: Log
) -> list[float]:
    """Train the projector (and with ``caption_trains: projector+lm`` the language model;
    the tower stays frozen) to caption ``train``."""
    with_lm = cfg.caption_trains == "projector+lm"
    trainable = [
        p
        for n, p in model.named_parameters()
        if "vision_tower" not in n and (with_lm or "multi_modal_projector" in n)
    ]
    stepper = torch_stepper(
        model, [{"params": trainable, "lr": cfg.caption_lr}], cfg.caption_steps, warmup=cfg.warmup
    )
    rng = np.random.default_rng(cfg.seed + 1)
    batches = (
        collate(
            _caption_examples(train, rng.integers(0, len(train), cfg.caption_batch)),
            processor,
            max_length=max_length,
        )
        for _ in range(cfg.caption_steps)
    )
    return train_loop(stepper, batches, log_every=100, log=lambda m: log("caption " + m))


def train_base(
    world: WorldConfig, model_cfg: LlavaModelConfig, cfg: BaseTrainConfig, log: Log = print
):
    """Build and train the base. Returns (model on CPU, its processor, metrics dict).

    Metrics: vision patch accuracy per attribute, caption loss and token accuracy on
    held-out scenes, seconds per phase.
    """
    import torch

    check_grid(world, model_cfg.vision.image_size, model_cfg.vision.patch_size)
    device, _ = resolve_device(cfg.device, "float32", "float32", cfg.torch_threads)
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    tokenizer = make_tokenizer(model_cfg, world)
    processor = make_processor(tokenizer, model_cfg)
    model = build_llava(model_cfg, tokenizer).to(device)
    n = max(cfg.vision_scenes, cfg.caption_scenes)
    look = {
        "card_share": cfg.card_share,
        "caption_style": cfg.caption_style,
        "domains": cfg.domains,
    }
    scenes = generate_scenes(world, cfg.seed, 0, n, **look)
    held_out = generate_scenes(world, cfg.seed, n, cfg.eval_scenes, **look)
    t_scenes = time.perf_counter()
    log(f"{n + cfg.eval_scenes} base scenes in {t_scenes - t0:.1f} s; training the tower")
    vision = pretrain_vision(
        model,
        scenes.take(np.arange(cfg.vision_scenes)),
        held_out,
        cfg,
        model_cfg.vision.feature_layer,
        device,
        log,
    )
    t_vision = time.perf_counter()
    log(f"tower: {vision} in {t_vision - t_scenes:.1f} s")
    language = {}
    if cfg.language_steps:
        log("the LM learns the scene language")
        look = {"families": cfg.language_families, "text_share": cfg.language_text_share,
                "domains": cfg.domains}  # fmt: skip
        texts = generate_scene_texts(world, cfg.seed, 0, cfg.language_scenes, **look)
        held_texts = generate_scene_texts(
            world, cfg.seed, cfg.language_scenes, cfg.eval_scenes * 4, **look
        )
        lang_losses = pretrain_language(
            model, processor, texts, steps=cfg.language_steps, batch=cfg.language_batch,
            lr=cfg.language_lr, caption_share=cfg.language_caption_share,
            caption_style=cfg.caption_style, warmup=cfg.warmup,
            max_length=model_cfg.max_length, log=log, seed=cfg.seed + 2,
        )  # fmt: skip
        language = {
            "language_accuracy": language_accuracy(
                model, processor, held_texts, model_cfg.max_length
            ),
            "language_train_loss_last": float(np.mean(lang_losses[-100:])),
        }
        log(f"scene-language accuracy (held-out questions): {language['language_accuracy']}")
    t_language = time.perf_counter()
    log(f"aligning on captions ({cfg.caption_trains})")
    losses = align_captions(
        model, processor, scenes.take(np.arange(cfg.caption_scenes)), cfg, model_cfg.max_length, log
    )
    captions = caption_metrics(model, processor, held_out, model_cfg.max_length)
    t_end = time.perf_counter()
    metrics = {
        "vision_patch_accuracy": vision,
        **language,
        **captions,
        "caption_train_loss_last": float(np.mean(losses[-20:])) if losses else None,
        "seconds": {
            "scenes": round(t_scenes - t0, 1),
            "vision": round(t_vision - t_scenes, 1),
            "language": round(t_language - t_vision, 1),
            "captions": round(t_end - t_language, 1),
            "total": round(t_end - t0, 1),
        },
        "device": str(device),
    }
    return model.cpu(), processor, metrics
