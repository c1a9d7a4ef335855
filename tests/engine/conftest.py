"""Fixtures the tiny LLaVA's test modules share: the default world, its tokenizer, the
tiny model config (TINY in test_llava), its processor."""

from __future__ import annotations

import pytest

from engine.llava import LlavaModelConfig, build_world_tokenizer, make_processor
from engine.world.config import WorldConfig


@pytest.fixture(scope="module")
def world():
    return WorldConfig()


@pytest.fixture(scope="module")
def tokenizer(world):
    return build_world_tokenizer(world)


@pytest.fixture(scope="module")
def model_cfg():
    from tests.engine.test_llava import TINY

    return LlavaModelConfig.model_validate(TINY)


@pytest.fixture(scope="module")
def processor(tokenizer, model_cfg):
    return make_processor(tokenizer, model_cfg)
