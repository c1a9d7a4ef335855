"""A tiny random Llama with SmolLM2's tokenizer and chat template, saved once per process.

Fast tests of the transformers backend run it instead of SmolLM2 itself (whose
dequantising load and ~270-token few-shot prefill take tens of seconds on 2 cores).
Its answers are random text: they exercise parsing and failure records, not quality.
"""

from __future__ import annotations

import functools
import tempfile


@functools.lru_cache(maxsize=1)
def tiny_llm_dir() -> str:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from actors.llm import resolve_transformers_model

    folder, gguf = resolve_transformers_model(None, None)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    path = tempfile.mkdtemp(prefix="vlselect-tiny-llm-")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
