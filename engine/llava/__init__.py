"""LLaVA models: the one loader of Hugging Face LLaVA checkpoints with their processors
(the tiny world base is one, trained once per world and committed in the workspace),
whole conversations through the checkpoint's chat template, the shared training step,
scores (per-sample loss, EL2N, greedy answers + match), LoRA fine-tuning, and the GPU memory
plan of a fine-tune."""

from engine.llava.cache import (
    DEFAULT_NAME,
    Base,
    base_fingerprint,
    base_uri,
    build_or_load_base,
    find_base,
    load_base,
)
from engine.llava.chat import LLAVA_CHAT_TEMPLATE, encode_conversation, first_answer, turns_of
from engine.llava.checkpoint import CheckpointInfo, Loaded, inspect_checkpoint, load_checkpoint
from engine.llava.config import (
    BaseTrainConfig,
    FinetuneConfig,
    LlavaModelConfig,
    LoraConfig,
    TextConfig,
    VisionConfig,
)
from engine.llava.data import (
    IGNORE,
    EpochBatcher,
    collate,
    image_tokens,
    model_inputs,
    tokenizer_of,
)
from engine.llava.evaluate import (
    answer_correct,
    answer_uncertainty,
    generate_answers,
    is_match,
    normalize_answer,
    per_sample_el2n,
    per_sample_loss,
    sample_el2n,
    sample_losses,
)
from engine.llava.finetune import finetune, param_groups, prepare_for_finetune
from engine.llava.model import build_llava, make_processor
from engine.llava.tokenizer import build_world_tokenizer, load_tokenizer
from engine.llava.train import DeepSpeedStepper, TorchStepper, torch_stepper, train_step

__all__ = [
    "DEFAULT_NAME",
    "IGNORE",
    "LLAVA_CHAT_TEMPLATE",
    "Base",
    "BaseTrainConfig",
    "CheckpointInfo",
    "DeepSpeedStepper",
    "EpochBatcher",
    "FinetuneConfig",
    "LlavaModelConfig",
    "Loaded",
    "LoraConfig",
    "TextConfig",
    "TorchStepper",
    "VisionConfig",
    "answer_correct",
    "answer_uncertainty",
    "base_fingerprint",
    "base_uri",
    "build_llava",
    "build_or_load_base",
    "build_world_tokenizer",
    "collate",
    "encode_conversation",
    "find_base",
    "finetune",
    "first_answer",
    "generate_answers",
    "image_tokens",
    "inspect_checkpoint",
    "is_match",
    "load_base",
    "load_checkpoint",
    "load_tokenizer",
    "make_processor",
    "model_inputs",
    "normalize_answer",
    "param_groups",
    "per_sample_el2n",
    "per_sample_loss",
    "prepare_for_finetune",
    "sample_el2n",
    "sample_losses",
    "tokenizer_of",
    "torch_stepper",
    "train_step",
    "turns_of",
]
