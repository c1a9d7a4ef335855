"""The tiny LLaVA: a real transformers LLaVA from tiny configs, its offline tokenizer, chat
collation, the shared training step, scores (per-sample loss, greedy answers + match),
the base trained once per world and cached in the workspace, and LoRA fine-tuning."""

from engine.llava.cache import (
    DEFAULT_NAME,
    Base,
    base_fingerprint,
    build_or_load_base,
    find_base,
    load_base,
)
from engine.llava.config import (
    BaseTrainConfig,
    FinetuneConfig,
    LlavaModelConfig,
    LoraConfig,
    TextConfig,
    VisionConfig,
)
from engine.llava.data import IGNORE, collate, collate_for, format_example, model_inputs
from engine.llava.evaluate import (
    answer_correct,
    generate_answers,
    is_match,
    normalize_answer,
    per_sample_loss,
    sample_losses,
)
from engine.llava.finetune import finetune, param_groups, prepare_for_finetune
from engine.llava.model import build_llava
from engine.llava.tokenizer import build_world_tokenizer, load_tokenizer
from engine.llava.train import DeepSpeedStepper, TorchStepper, torch_stepper, train_step

__all__ = [
    "DEFAULT_NAME",
    "IGNORE",
    "Base",
    "BaseTrainConfig",
    "DeepSpeedStepper",
    "FinetuneConfig",
    "LlavaModelConfig",
    "LoraConfig",
    "TextConfig",
    "TorchStepper",
    "VisionConfig",
    "answer_correct",
    "base_fingerprint",
    "build_llava",
    "build_or_load_base",
    "build_world_tokenizer",
    "collate",
    "collate_for",
    "finetune",
    "format_example",
    "generate_answers",
    "is_match",
    "load_base",
    "load_tokenizer",
    "model_inputs",
    "normalize_answer",
    "param_groups",
    "per_sample_loss",
    "prepare_for_finetune",
    "find_base",
    "sample_losses",
    "torch_stepper",
    "train_step",
]
