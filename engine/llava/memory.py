"""GPU memory plan of a LoRA fine-tune of a LLaVA under DeepSpeed ZeRO, before launch.

The model is built on the meta device (no weights) and wrapped by the project's own
``prepare_for_finetune``; model states come from DeepSpeed's estimators, activations from
the Llama/CLIP blocks as transformers and PEFT run them (checked against torch's
MemTracker in tests/engine/test_memory_plan.py). All figures are per GPU, in GiB.
configs/models/llava-1.5-7b-hf/config.json is the config.json of the Hugging Face
checkpoint llava-hf/llava-1.5-7b-hf (no weights): the 7B the plan is tested on.
"""

from __future__ import annotations

import copy
import json

from pydantic import BaseModel, ConfigDict, Field

from engine.llava.config import FinetuneConfig

GIB = 2**30
SECTION = "progress"  # the config section whose keys the advice names
# The CUDA context with torch's kernels loaded (0.5-0.9 GiB on an H100 under CUDA 12),
# NCCL's communicator buffers (~0.3 GiB for 8 ranks) and the caching allocator's
# fragmentation slack: what nvidia-smi shows beyond the tensors themselves.
CUDA_OVERHEAD_GIB = 1.5
OVERHEAD = int(CUDA_OVERHEAD_GIB * GIB)
# Ray's accelerator_type names (ray/util/accelerators/accelerators.py) -> nominal memory.
# A bare "A100" is either size, so it is left out (pass gpu_memory_gib for it).
GPU_MEMORY_GIB: dict[str, float] = {
    "A100-40G": 40, "A100-80G": 80, "H100": 80, "H200": 141, "L4": 24,
    "A10G": 24, "L40S": 48, "T4": 16, "V100": 16,
}  # fmt: skip
BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
PARTS = ("model_states_gib", "activations_gib", "logits_gib", "backward_gib", "buffers_gib",
         "overhead_gib")  # fmt: skip


def gpu_memory_of(accelerator_type: str | None) -> float | None:
    """GiB of a Ray accelerator type ('H100' or 'accelerator_type:H100'); None if unknown."""
    if not accelerator_type:
        return None
    return GPU_MEMORY_GIB.get(accelerator_type.removeprefix("accelerator_type:"))


class ParameterCounts(BaseModel):
    """Exact parameter counts of the wrapped model and the dims activations need."""

    model_config = ConfigDict(extra="forbid")

    trainable: int = Field(description="Parameters the optimizer trains (adapters, projector...).")
    frozen: int = Field(description="Parameters kept frozen (base weights, PEFT's originals).")
    largest_trainable_layer: int = Field(description="ZeRO-3's largest_layer_params.")
    largest_frozen_layer: int = Field(description="Most frozen parameters in one module.")
    hidden: int = Field(description="Text model width h.")
    layers: int = Field(description="Decoder layers L.")
    heads: int = Field(description="Attention heads.")
    kv_heads: int = Field(description="Key/value heads (GQA).")
    head_dim: int = Field(description="Width of one head.")
    intermediate: int = Field(description="MLP width i.")
    vocab: int = Field(description="Vocabulary V (the head's outputs).")
    image_tokens: int = Field(description="Image tokens per image in the text sequence.")
    vision_hidden: int = Field(description="Vision tower width.")
    lora_ranks: int = Field(description="Sum of LoRA ranks over one decoder layer's adapters.")
    lora_in_features: int = Field(description="Sum of in_features over one layer's adapters.")
    lora_dropout: float = Field(description="LoRA dropout (a mask per adapted input when > 0).")
    head_trainable: bool = Field(description="Whether lm_head trains (it then keeps its input).")


class GpuVerdict(BaseModel):
    """The plan against one GPU size."""

    model_config = ConfigDict(extra="forbid")

    gpu_memory_gib: float = Field(description="Memory of the GPU.")
    fits: bool = Field(description="total <= GPU memory.")
    largest_micro_batch: int = Field(description="Largest micro-batch that fits; 0: none.")
    advice: list[str] = Field(description="Single knob changes that make it fit (totals).")


# The sizes every plan is also judged against: the two A100s, what most clusters have.
COMMON_GPU_GIB = (40.0, 80.0)


class MemoryPlan(BaseModel):
    """Peak memory of one GPU worker (GiB, rounded to 0.01) and the verdict."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="Architecture (or checkpoint), text and vision L x width.")
    zero_stage: int = Field(description="DeepSpeed ZeRO stage (2 or 3).")
    micro_batch: int = Field(description="Samples per GPU per forward pass.")
    seq_len: int = Field(description="Tokens per sample (image tokens included).")
    workers: int = Field(description="GPUs (data-parallel ranks) sharing the ZeRO shards.")
    gpus_per_node: int | None = Field(description="GPUs per node; None: one node.")
    precision: str = Field(description="bf16, fp16 or fp32 weights and compute.")
    gradient_checkpointing: bool = Field(description="Decoder layers recomputed in backward.")
    lora_r: int | None = Field(description="LoRA rank; None: full fine-tuning of the LM.")
    trainable_params: int = Field(description="Trained parameters.")
    frozen_params: int = Field(description="Frozen parameters.")
    model_states_gib: float = Field(description="DeepSpeed's estimate + the frozen weights.")
    activations_gib: float = Field(description="Kept for backward: layers, norm, projector.")
    logits_gib: float = Field(description="The loss's peak: logits, fp32 log-softmax, grads.")
    backward_gib: float = Field(description="A layer's backward beyond the loss's peak.")
    buffers_gib: float = Field(description="ZeRO's gradient reduce bucket (and ZeRO-3 prefetch).")
    overhead_gib: float = Field(description="CUDA context, NCCL and allocator slack (fixed).")
    total_gib: float = Field(description="Sum of the above: the peak per GPU.")
    gpu_memory_gib: float | None = Field(description="Memory of one GPU; None: not known.")
    fits: bool | None = Field(description="total <= GPU memory; None without a GPU figure.")
    largest_micro_batch: int | None = Field(description="Largest that fits; 0: none.")
    advice: list[str] = Field(description="Single knob changes that make it fit (totals).")
    other_gpus: list[GpuVerdict] = Field(
        description="The verdict on the common sizes (40 and 80 GiB) other than this GPU's."
    )


def build_on_meta(config):
    """A ``LlavaForConditionalGeneration`` of ``config`` on the meta device: shapes only."""
    import torch
    from transformers import LlavaForConditionalGeneration

    with torch.device("meta"):
        return LlavaForConditionalGeneration(copy.deepcopy(config))


def count_parameters(model, finetune: FinetuneConfig) -> ParameterCounts:
    """Wrap ``model`` (meta; wrapped in place) with ``prepare_for_finetune`` and count
    exactly what it trains and freezes (``finetune.lora`` None: the LM trains in full)."""
    import torch
    from peft.tuners.lora import LoraLayer

    from engine.llava.finetune import prepare_for_finetune

    # it seeds torch: leave the caller's RNG alone; on meta, PEFT's adapters are never
    # allocated (it would build them on the CPU, initialise them, then move them)
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        wrapped = prepare_for_finetune(model, finetune)
    largest = {True: 0, False: 0}
    for m in wrapped.modules():
        for trains in (True, False):
            n = sum(p.numel() for p in m.parameters(recurse=False) if p.requires_grad is trains)
            largest[trains] = max(largest[trains], n)
    tc, vc, cfg = model.config.text_config, model.config.vision_config, model.config
    ranks = ins = 0
    for m in wrapped.modules():
        if isinstance(m, LoraLayer) and m.r:
            ranks += sum(m.r.values())
            ins += m.in_features * len(m.r)
    lm_head = wrapped.get_output_embeddings()
    patches = (vc.image_size // vc.patch_size) ** 2
    return ParameterCounts(
        trainable=sum(p.numel() for p in wrapped.parameters() if p.requires_grad),
        frozen=sum(p.numel() for p in wrapped.parameters() if not p.requires_grad),
        largest_trainable_layer=largest[True],
        largest_frozen_layer=largest[False],
        hidden=tc.hidden_size,
        layers=tc.num_hidden_layers,
        heads=tc.num_attention_heads,
        kv_heads=tc.num_key_value_heads or tc.num_attention_heads,
        head_dim=getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads,
        intermediate=tc.intermediate_size,
        vocab=tc.vocab_size,
        image_tokens=patches + (cfg.vision_feature_select_strategy == "full"),
        vision_hidden=vc.hidden_size,
        lora_ranks=ranks // tc.num_hidden_layers,
        lora_in_features=ins // tc.num_hidden_layers,
        lora_dropout=finetune.lora.dropout if finetune.lora else 0.0,
        head_trainable=any(p.requires_grad for p in lm_head.parameters()),
    )


_COUNTS: dict[tuple[str, str], ParameterCounts] = {}


def _counts(config, finetune: FinetuneConfig) -> ParameterCounts:
    key = (config.to_json_string(use_diff=False), json.dumps(finetune.model_dump(mode="json")))
    if key not in _COUNTS:
        _COUNTS[key] = count_parameters(build_on_meta(config), finetune)
    return _COUNTS[key]


def _model_states(c: ParameterCounts, stage: int, gpus: int, nodes: int, wb: int) -> int:
    """Bytes: DeepSpeed's estimator on the trainable count, plus the frozen weights."""
    total = gpus * nodes
    if stage == 2:
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        _, states = estimate_zero2_model_states_mem_needs(c.trainable, gpus, nodes, False)
        frozen = c.frozen * wb  # ZeRO-2 partitions only what the optimizer holds
        wide = 2 * c.trainable  # fp32: the replicated weights are 4 bytes, not 2
    else:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        _, states, _ = estimate_zero3_model_states_mem_needs(
            c.trainable, c.largest_trainable_layer, gpus, nodes, False, False
        )
        # every weight is sharded; the largest frozen module is gathered whole to run
        frozen = c.frozen * wb // total + c.largest_frozen_layer * wb
        wide = 2 * c.trainable // total
    if wb == 4:  # the estimators assume 16-bit weights and gradients
        states += wide + 2 * c.trainable // total
    return int(states + frozen)


def _activations(c: ParameterCounts, b: int, s: int, e: int, checkpointing: bool):
    """Bytes (stored, loss peak, backward beyond it) of one micro-batch of b x s tokens."""
    h, i, t = c.hidden, c.intermediate, b * s
    # one decoder layer, per token: RMSNorm keeps its fp32 input (x2); frozen base linears
    # keep nothing, LoRA's A keeps its input (the normed x, attention output, MLP product)
    # and B the b*s*r intermediate; SDPA/flash keeps q, k, v, out and a log-sum-exp (no
    # s^2); the MLP keeps gate, silu(gate), up (and their product, down's input)
    q, kv = c.heads * c.head_dim, 2 * c.kv_heads * c.head_dim
    layer = 8 * h + e * (2 * h + 2 * q + kv + 4 * i + c.lora_ranks) + 4 * c.heads + 8
    if c.lora_dropout > 0:  # each adapter keeps its dropped input and a bool mask
        layer += (e + 1) * c.lora_in_features - e * (2 * h + i)
    stored_layer = e * h if checkpointing else layer  # checkpointing keeps the input only
    stored = c.layers * stored_layer * t
    stored += (4 * h + (e * h if c.head_trainable else 0)) * t  # final norm (and head input)
    # projector: the selected tower state (577 tokens: a view keeps it whole), its copy,
    # GELU's input and output, and the image features in the output; one image a sample
    v, n = c.vision_hidden, c.image_tokens
    stored += b * e * ((n + 1) * v + n * v + 3 * n * h)
    stored += b * s * s + t  # sdpa's boolean padding mask (once) and the image-token mask
    # the loss: logits in the output (e), log-softmax's fp32 output (4), and in backward
    # its incoming and outgoing fp32 gradients (4 + 4); .float() is freed before them
    kept, loss = e * c.vocab * t, 12 * c.vocab * t
    # a layer's backward holds gradients of the MLP product and both factors plus the
    # hidden gradient in and out; with checkpointing the recomputed layer too. It runs
    # after the loss's fp32 tensors are freed, so only what exceeds them adds
    work = (e * (3 * i + 2 * h) + (layer if checkpointing else 0)) * t
    return stored, kept + loss, max(0, work - loss)


def _totals(c: ParameterCounts, knobs: dict) -> list[int]:
    """Bytes per GPU: model states, stored, loss, backward, buffers, overhead."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    stage, workers, e = knobs["zero_stage"], knobs["workers"], BYTES[knobs["precision"]]
    gpn = knobs["gpus_per_node"] or workers
    zero = DeepSpeedZeroConfig()  # the bucket sizes train.deepspeed_config leaves default
    buffers = zero.reduce_bucket_size * e + (stage == 3) * zero.prefetch_bucket_size * e
    b, s, gc = knobs["micro_batch"], knobs["seq_len"], knobs["gradient_checkpointing"]
    acts = _activations(c, b, s, e, gc)
    return [_model_states(c, stage, gpn, workers // gpn, e), *acts, buffers, OVERHEAD]


def _total(c: ParameterCounts, knobs: dict, **change) -> float:
    return round(sum(_totals(c, {**knobs, **change})) / GIB, 2)


def _advice(c: ParameterCounts, knobs: dict, gpu: float, batch: int, largest: int) -> list[str]:
    """Single knob changes under which the plan fits ``gpu`` GiB, with their totals."""
    s, m, workers = knobs["seq_len"], knobs["micro_batch"], knobs["workers"]
    options: list[tuple[str, str, object]] = [
        ("gradient_checkpointing", "gradient_checkpointing", True),
        ("zero_stage", "zero_stage", 3),
        ("precision", "precision", "bf16" if knobs["precision"] == "fp32" else None),
    ]
    # the largest micro-batch that fits and still splits the global batch over the workers
    micro = [n for n in range(min(largest, m - 1), 0, -1) if batch % (n * workers) == 0]
    options.append(("micro_batch", "micro_batch", micro[0] if micro else None))
    # the longest max_length (a multiple of 128 above the image's tokens) that fits
    lengths = range(s - 1 - (s - 1) % 128, c.image_tokens, -128)
    fit = [n for n in lengths if _total(c, knobs, seq_len=n) <= gpu]
    options.append(("max_length", "seq_len", fit[0] if fit else None))
    advice = []
    for key, arg, value in options:
        if value is not None and knobs[arg] != value:
            total = _total(c, knobs, **{arg: value})
            if total <= gpu:
                advice.append(f"{SECTION}.{key}: {json.dumps(value)} (total {total:.1f} GiB)")
    return advice


def plan_memory(config, finetune: FinetuneConfig, *, zero_stage: int, micro_batch: int,
                seq_len: int, workers: int, gpus_per_node: int | None = None,
                precision: str = "bf16", gradient_checkpointing: bool = False,
                gpu_memory_gib: float | None = None) -> MemoryPlan:  # fmt: skip
    """The peak memory per GPU of fine-tuning ``config`` (a ``transformers.LlavaConfig``)
    with ``finetune``'s recipe under ZeRO ``zero_stage`` on ``workers`` GPUs
    (``gpus_per_node`` each; None: one node), at ``micro_batch`` samples of ``seq_len``
    tokens (one image each, its tokens included), in ``precision``.

    The loss's peak and a layer's backward never coexist (the larger counts); the tower's
    own forward (frozen: no graph) peaks before the decoder's activations exist, smaller."""
    if zero_stage not in (2, 3):
        raise ValueError(f"zero_stage {zero_stage}: 2 or 3")
    if precision not in BYTES:
        raise ValueError(f"precision {precision!r}: one of {sorted(BYTES)}")
    if workers % (gpus_per_node or workers):
        raise ValueError(f"{workers} workers are not whole nodes of {gpus_per_node} GPUs")
    c = _counts(config, finetune)
    knobs = dict(zero_stage=zero_stage, micro_batch=micro_batch, seq_len=seq_len,
                 workers=workers, gpus_per_node=gpus_per_node, precision=precision,
                 gradient_checkpointing=gradient_checkpointing)  # fmt: skip
    parts = [round(x / GIB, 2) for x in _totals(c, knobs)]
    total = _total(c, knobs)
    here = _verdict(c, knobs, gpu_memory_gib, finetune.batch_size) if gpu_memory_gib else None
    others = [_verdict(c, knobs, gib, finetune.batch_size)
              for gib in COMMON_GPU_GIB if gib != gpu_memory_gib]  # fmt: skip
    tc, vc = config.text_config, config.vision_config
    name = config.name_or_path or (config.architectures or [type(config).__name__])[0]
    return MemoryPlan(
        model=f"{name} ({tc.model_type} {tc.num_hidden_layers}x{tc.hidden_size}, "
        f"{vc.model_type} {vc.num_hidden_layers}x{vc.hidden_size})",
        **knobs, **dict(zip(PARTS, parts, strict=True)), total_gib=total,
        gpu_memory_gib=gpu_memory_gib, lora_r=finetune.lora.r if finetune.lora else None,
        trainable_params=c.trainable, frozen_params=c.frozen,
        fits=here.fits if here else None,
        largest_micro_batch=here.largest_micro_batch if here else None,
        advice=here.advice if here else [], other_gpus=others,
    )  # fmt: skip


def _verdict(c: ParameterCounts, knobs: dict, gpu: float, batch: int) -> GpuVerdict:
    fits = _total(c, knobs) <= gpu
    largest = 0
    while largest < 4096 and _total(c, knobs, micro_batch=largest + 1) <= gpu:
        largest += 1
    advice = [] if fits else _advice(c, knobs, gpu, batch, largest)
    return GpuVerdict(gpu_memory_gib=gpu, fits=fits, largest_micro_batch=largest, advice=advice)


def format_plan(plan: MemoryPlan) -> str:
    """The plan as an aligned table for a terminal."""
    p = plan
    lora = f"{p.lora_r}" if p.lora_r is not None else "none (full fine-tune)"
    if p.fits is None:
        verdict = "unknown GPU: pass gpu_memory_gib"
    else:
        verdict = f"{p.gpu_memory_gib:g} GiB: " + ("fits" if p.fits else "DOES NOT FIT")
    rows = [
        ("model", p.model),
        ("ZeRO stage", f"{p.zero_stage} over {p.workers} workers"),
        ("micro-batch", f"{p.micro_batch}"),
        ("sequence length", f"{p.seq_len} tokens"),
        ("precision", p.precision + (", gradient checkpointing" * p.gradient_checkpointing)),
        ("LoRA rank", lora),
        ("parameters", f"{p.trainable_params / 1e6:,.1f}M trainable, "
                       f"{p.frozen_params / 1e6:,.1f}M frozen"),
        ("model states", f"{p.model_states_gib:8.2f} GiB"),
        ("activations", f"{p.activations_gib:8.2f} GiB"),
        ("logits", f"{p.logits_gib:8.2f} GiB"),
        ("layer backward", f"{p.backward_gib:8.2f} GiB"),
        ("ZeRO buffers", f"{p.buffers_gib:8.2f} GiB"),
        ("overhead", f"{p.overhead_gib:8.2f} GiB"),
        ("total per GPU", f"{p.total_gib:8.2f} GiB"),
        ("GPU", verdict),
    ]  # fmt: skip
    if p.largest_micro_batch is not None:
        rows.append(("largest micro-batch", str(p.largest_micro_batch)))
    rows += [("to fit", a) for a in p.advice]
    for v in p.other_gpus:
        verdict = "fits" if v.fits else "does not fit"
        line = f"{verdict}; largest micro-batch {v.largest_micro_batch}"
        if v.advice:
            line += "; to fit: " + ", or ".join(v.advice)
        rows.append((f"on {v.gpu_memory_gib:g} GiB", line))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
