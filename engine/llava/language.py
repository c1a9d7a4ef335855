"""The base's language model learns the world's scene language before it sees an image.

LLaVA starts from an LLM that already reasons in words: its fine-tune only has to route
what the image shows into that reasoning. A tiny LM trained from scratch has no such
reasoning, and a few hundred QA steps do not build it (ten measured attempts, README).
So the base's LM first learns the world in text: each scene is its grid's cells, each
cell one input vector, the sum of the embeddings of the cell's words ('large' + 'red' +
'circle'; 'card' + '7'; 'empty'), placed where the image tokens will be; after them the
chat turns of every image family's questions (and of captions, and the text-only family),
answers as labels. Stage 1 then trains the projector alone, the LM frozen, to caption
images (``engine.llava.base.align_captions``): it learns to put each image patch where
the LM expects that cell's words, and the LM's reasoning carries over to images.

The scenes come from the base's own world (another seed than the pool's): the LM never
sees a pool, test or benchmark question.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from engine.llava.data import IGNORE, collate, model_inputs, tokenizer_of
from engine.llava.tokenizer import CAPTION_PROMPTS, IMAGE
from engine.llava.train import torch_stepper
from engine.world.answers import object_caption, scene_caption
from engine.world.render import SceneObject

EMPTY = "empty"
Log = Callable[[str], None]


@dataclass
class SceneTexts:
    """n scenes as text: their objects (empty for a text-only sample) and one question each.

    objects: n lists of SceneObject; questions, answers, families: n strings each.
    """

    objects: list[list[SceneObject]]
    questions: list[str]
    answers: list[str]
    families: list[str]
    grid: int

    def __len__(self) -> int:
        return len(self.questions)


def cell_words(objects: Sequence[SceneObject], grid: int) -> list[list[str]]:
    """The words of each of the grid * grid cells, row-major (the tower's patch order)."""
    cells = [[EMPTY] for _ in range(grid * grid)]
    for o in objects:
        shape = ["card", str(o.digit)] if o.shape == "card" else [o.shape]
        cells[o.row * grid + o.col] = [o.size, o.colour, *shape]
    return cells


def cell_token_ids(tokenizer, scenes: Sequence[Sequence[SceneObject]], grid: int):
    """Token ids of each cell's words: int64 (B, grid * grid, W), with a float32 mask of
    the same shape (1 on a word, 0 on padding). Raises ValueError on a word the tokenizer
    does not know (the world's vocabulary and the tokenizer's disagree)."""
    import torch

    unk = tokenizer.unk_token_id
    ids = [[tokenizer.convert_tokens_to_ids(cell) for cell in cell_words(s, grid)] for s in scenes]
    width = max(len(c) for scene in ids for c in scene)
    out = torch.zeros(len(ids), grid * grid, width, dtype=torch.long)
    mask = torch.zeros(len(ids), grid * grid, width)
    for b, scene in enumerate(ids):
        for k, cell in enumerate(scene):
            if unk is not None and unk in cell:
                raise ValueError(f"a cell word of scene {b} is not in the tokenizer: {cell}")
            out[b, k, : len(cell)] = torch.tensor(cell)
            mask[b, k, : len(cell)] = 1
    return out, mask


def scene_forward(model, tokenizer, batch, scenes: Sequence[Sequence[SceneObject]], grid: int):
    """``model``'s output on ``batch`` (from ``collate``) with each example's image tokens
    replaced by its scene's cells: (B, L, d) input embeddings, cell k of the scene at the
    k-th image token. ``scenes`` holds one object list per example that has an image."""
    inputs = model_inputs(batch, model)
    inputs.pop("pixel_values", None)
    ids = inputs.pop("input_ids")
    embed = model.get_input_embeddings()
    embeds = embed(ids)
    if len(scenes):
        words, mask = cell_token_ids(tokenizer, scenes, grid)
        cells = (embed(words.to(ids.device)) * mask.to(ids.device)[..., None]).sum(2)
        is_image = (ids == tokenizer.convert_tokens_to_ids(IMAGE))[..., None]
        embeds = embeds.masked_scatter(is_image.expand_as(embeds), cells.to(embeds.dtype))
    return model(inputs_embeds=embeds, **inputs)


def caption_of(objects: Sequence[SceneObject], style: str, grid: int, rng) -> str:
    """A scene's caption in ``style``: 'rows' (row by row), else its objects in an order
    ``rng`` draws (a numpy Generator)."""
    if style == "rows":
        return scene_caption(list(objects), grid)
    return object_caption(list(objects), rng.permutation(len(objects)).tolist())


def _examples(
    texts: SceneTexts, idx, caption_style: str | None, rng, captions: int = 0
) -> tuple[list, list]:
    """Chat examples for ``idx``, the first ``captions`` of them captions of their scene
    (in ``caption_style``) rather than their question, and the scenes of those with one."""
    placeholder = np.zeros((1, 1, 3), np.uint8)  # never decoded: collate(pixels=False)
    examples, scenes = [], []
    for k, i in enumerate(idx):
        objects = texts.objects[i]
        has_image = bool(objects)
        if k < captions and has_image:
            q = CAPTION_PROMPTS[caption_style]
            a = caption_of(objects, caption_style, texts.grid, rng)
        else:
            q, a = texts.questions[i], texts.answers[i]
        # collate only needs to know the example has an image
        examples.append({"image": placeholder if has_image else None, "question": q, "answer": a})
        if has_image:
            scenes.append(objects)
    return examples, scenes


def pretrain_language(
    model,
    processor,
    texts: SceneTexts,
    *,
    steps: int,
    batch: int,
    lr: float,
    caption_share: float,
    caption_style: str,
    warmup: float,
    max_length: int,
    log: Log,
    seed: int,
) -> list[float]:
    """Train the LM (embeddings, layers, head; not the tower or projector) on ``texts``:
    batches of ``batch`` scenes, ``caption_share`` of them captioned, the rest asked their
    question; the loss is the mean over every answer token of the batch, so captions,
    which read out every object, carry most of it. Returns each step's loss.

    Measured (3-layer LM, 40k scenes): question-only batches with a caption batch every
    4th step plateaued at chance on held-out colour and shape questions after 6,000 steps;
    a quarter of captions in every batch, 3,000 steps, answered them zero-shot from images.
    """
    lm = [
        p
        for n, p in model.named_parameters()
        if "vision_tower" not in n and "multi_modal_projector" not in n
    ]
    stepper = torch_stepper(model, [{"params": lm, "lr": lr}], steps, warmup=warmup)
    rng = np.random.default_rng(seed)
    losses: list[float] = []
    captions = int(round(caption_share * batch))
    model.train()
    for step in range(steps):
        idx = rng.integers(0, len(texts), batch)
        examples, scenes = _examples(texts, idx, caption_style, rng, captions)
        out = scene_forward(
            model,
            tokenizer_of(processor),
            collate(examples, processor, max_length=max_length, pixels=False),
            scenes,
            texts.grid,
        )
        stepper.backward(out.loss)
        stepper.step()
        losses.append(float(out.loss.detach()))
        if (step + 1) % 500 == 0:
            log(f"language step {step + 1}/{steps}: loss {np.mean(losses[-500:]):.4f}")
    return losses


def language_accuracy(model, processor, texts: SceneTexts, max_length: int) -> dict[str, float]:
    """Per-family accuracy of the first answer token, teacher-forced, on ``texts`` (the
    LM's reasoning on scenes given as words: what the fine-tune can at best carry over)."""
    import torch

    model.eval()
    hits: dict[str, list[bool]] = {}
    with torch.no_grad():
        for start in range(0, len(texts), 128):
            idx = range(start, min(start + 128, len(texts)))
            examples, scenes = _examples(texts, idx, None, None)
            batch = collate(examples, processor, max_length=max_length, pixels=False)
            logits = scene_forward(model, tokenizer_of(processor), batch, scenes, texts.grid).logits
            labels = batch["labels"]
            for row, i in enumerate(idx):
                first = int((labels[row] != IGNORE).nonzero()[0])
                hit = int(logits[row, first - 1].argmax()) == int(labels[row, first])
                hits.setdefault(texts.families[i], []).append(hit)
    return {f: float(np.mean(h)) for f, h in sorted(hits.items())}
