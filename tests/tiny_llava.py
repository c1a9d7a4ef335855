"""A tiny LLaVA that no vlselect stage made: random weights, saved as llava-hf ships its
checkpoints (``save_pretrained`` of the model beside its processor: the tokenizer with the
chat template, the CLIP image processor). The shape is TINY of tests/engine/test_llava."""

from __future__ import annotations

from pathlib import Path


def save_random_llava(folder: Path, seed: int = 0):
    """Write the checkpoint to ``folder``; returns the model as saved (float32, CPU)."""
    import torch

    from engine.llava import LlavaModelConfig, build_llava, build_world_tokenizer, make_processor
    from engine.world.config import WorldConfig
    from tests.engine.test_llava import TINY

    cfg = LlavaModelConfig.model_validate(TINY)
    tokenizer = build_world_tokenizer(WorldConfig())  # model_max_length 4096: above positions
    torch.manual_seed(seed)
    model = build_llava(cfg, tokenizer)
    model.save_pretrained(folder)
    make_processor(tokenizer, cfg).save_pretrained(folder)
    return model
