"""The tiny LLaVA: a real ``transformers.LlavaForConditionalGeneration`` from tiny configs
with a ``LlavaProcessor`` of llava-hf's kind (CLIP image processor, the chat template),
and helpers every model path uses."""

from __future__ import annotations

import numpy as np

from engine.llava.config import LlavaModelConfig
from engine.llava.tokenizer import image_token_id

# CLIP's normalisation, as LLaVA-1.5's processor applies it.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def build_llava(cfg: LlavaModelConfig, tokenizer):
    """A randomly initialised ``LlavaForConditionalGeneration`` of ``cfg``'s sizes (seeded).

    The vocabulary is the tokenizer's; the image placeholder is its '<image>' token and
    every image fills ``cfg.vision.image_tokens`` placeholders (CLS dropped).
    """
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig
    from transformers import LlavaForConditionalGeneration as Llava

    v, t = cfg.vision, cfg.text
    vision = CLIPVisionConfig(
        image_size=v.image_size,
        patch_size=v.patch_size,
        hidden_size=v.hidden_size,
        num_hidden_layers=v.num_layers,
        num_attention_heads=v.num_heads,
        intermediate_size=v.intermediate_size,
        projection_dim=v.hidden_size,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=t.hidden_size,
        num_hidden_layers=t.num_layers,
        num_attention_heads=t.num_heads,
        num_key_value_heads=t.num_kv_heads or t.num_heads,
        intermediate_size=t.intermediate_size,
        max_position_embeddings=t.max_position_embeddings,
        rope_theta=t.rope_theta,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token_id(tokenizer),
        image_seq_length=v.image_tokens,
        projector_hidden_act=cfg.projector_act,
        vision_feature_select_strategy="default",
        vision_feature_layer=v.feature_layer,
        tie_word_embeddings=False,
    )
    torch.manual_seed(cfg.seed)
    model = Llava(config)
    gen = model.generation_config
    gen.pad_token_id, gen.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    gen.bos_token_id = tokenizer.bos_token_id
    return model


def make_processor(tokenizer, cfg: LlavaModelConfig):
    """The ``LlavaProcessor`` saved with the tiny model: llava-hf's processor settings at
    the tiny tower's sizes (CLIP resize + centre crop to ``image_size``, CLIP's mean and
    std, ``patch_size``, the CLS counted then dropped by the 'default' strategy) and
    llava-hf's chat template (on the tokenizer, which carries it)."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    side = cfg.vision.image_size
    images = CLIPImageProcessor(
        size={"shortest_edge": side},
        crop_size={"height": side, "width": side},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )
    return LlavaProcessor(
        image_processor=images,
        tokenizer=tokenizer,
        patch_size=cfg.vision.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=tokenizer.chat_template,
    )


def image_tokens_of(model) -> int:
    """Placeholders one image fills in ``model`` (patches; CLS dropped by 'default')."""
    vc = model.config.vision_config
    n = (vc.image_size // vc.patch_size) ** 2
    return n + (model.config.vision_feature_select_strategy == "full")


def pixel_values(pixels: np.ndarray):
    """uint8 (n, H, W, 3) -> float32 torch (n, 3, H, W), CLIP-normalised."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2).float().div_(255)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def model_device(model):
    """Device of ``model``'s parameters (a DeepSpeed engine or a PEFT wrapper works too)."""
    device = getattr(model, "device", None)
    if device is not None:
        return device
    return next(model.parameters()).device


def vision_dtype(model):
    """dtype the vision tower computes in (pixels are cast to it)."""
    base = model.module if hasattr(model, "module") else model
    for name, p in base.named_parameters():
        if "vision_tower" in name:
            return p.dtype
    return next(base.parameters()).dtype
