"""The one-process references ``vlselect bench`` measures each stage against (suite.py)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.progress_round import ROUND
from engine.artifacts import Clustering
from engine.workspace import Workspace


def auto_factory(n: int, shards: int) -> str:
    """Exact search below 50k rows per shard, above it IVF with ``suggest_nlist`` lists."""
    from engine.faiss_index import suggest_nlist

    rows = n // shards
    return "Flat" if rows < 50_000 else f"IVF{suggest_nlist(rows)},Flat"


def bare_generate(questions: list[str], max_new_tokens: int, batch: int = 8) -> float:
    """Seconds for plain ``model.generate`` (greedy, no prefix cache) over ``questions``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from actors.llm import resolve_transformers_model
    from engine.devices import resolve_device
    from engine.skills import build_messages

    path, gguf = resolve_transformers_model(None, None)
    extra = {"gguf_file": gguf} if gguf else {}
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(path, **extra)
    tokenizer.padding_side = "left"
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    device, dtype = resolve_device("auto", "auto", "bfloat16")  # as the skills actor
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **extra).to(device).eval()
    prompts = [
        tokenizer.apply_chat_template(build_messages(q), tokenize=False, add_generation_prompt=True)
        for q in questions
    ]
    with torch.inference_mode():
        for i in range(0, len(prompts), batch):
            inputs = tokenizer(prompts[i : i + batch], return_tensors="pt", padding=True)
            inputs = inputs.to(device)
            model.generate(
                **inputs, max_new_tokens=max_new_tokens, do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )  # fmt: skip
    return time.perf_counter() - start


def bare_embed(ws_path: Path, space: str, limit: int) -> tuple[int, float]:
    """The embed job's work without Ray over the first ``limit`` pool rows, in this one
    process: read, decode and preprocess, encode with the configured encoder and batch
    size, nothing written. Returns (rows, seconds), the model's load included."""
    import pyarrow.parquet as pq

    from engine.artifacts import Pool
    from engine.config import build_config
    from engine.encoders import load_encoder, preprocess_images
    from engine.text import instruction_text
    from jobs import embed

    ws = Workspace.open(str(ws_path))
    cfg = build_config(embed.STAGE, embed.CONFIG, ws.read_config())
    space_cfg = getattr(cfg, space)
    start = time.perf_counter()
    encoder = load_encoder(space_cfg.encoder)
    column = "image" if space in embed.IMAGE_SPACES else "conversations"
    n = 0
    for file in Pool.open(ws).shards:
        for batch in pq.ParquetFile(file).iter_batches(space_cfg.batch_size, columns=[column]):
            values = batch.column(0).to_pylist()[: limit - n]
            if column == "image":
                encoder(preprocess_images(values, encoder.prep)[0])
            else:
                encoder([instruction_text(c) for c in values])
            n += len(values)
            if n >= limit:
                return n, time.perf_counter() - start
    return n, time.perf_counter() - start


def space_features(ws: Workspace, spaces: list[str]) -> np.ndarray:
    """Every row's combined feature of the committed ``spaces`` (weights 1), float32
    (n, sum of dims), shard by shard as the cluster job computes it."""
    from engine.embeddings import open_space
    from engine.features import shard_features

    opened = [open_space(ws, s) for s in spaces]
    dims = {s.space: s.dim for s in opened}
    parts = []
    for i, stem in enumerate(opened[0].stems):
        files = {s.space: s.files[i] for s in opened}
        if any(s.stems[i] != stem for s in opened):
            raise ValueError(f"spaces {spaces} are sharded differently (shard {stem})")
        parts.append(shard_features(ws.fs, files, dims, dict.fromkeys(dims, 1.0)).features)
    return np.concatenate(parts)


def clustering_figures(clustering: Clustering) -> dict[str, Any]:
    """A committed clustering's figures: its run summary and its meta, in one dict."""
    meta = clustering.meta
    return {**meta.summary, **meta.model_dump(exclude={"summary"})}


def bare_kmeans(ws: Workspace, k: int, meta: dict, seed: int, spaces: list[str]) -> float:
    """Seconds to load ``spaces`` from the workspace, fit faiss.Kmeans on a sample of the
    job's size with its iterations, and assign every row."""
    import faiss

    from engine.kmeans import CentroidIndex, sample_positions

    start = time.perf_counter()
    x = space_features(ws, spaces)
    sample = np.ascontiguousarray(x[sample_positions(len(x), meta["sample_rows"], seed)])
    kmeans = faiss.Kmeans(x.shape[1], k, niter=len(meta["objective"]), seed=seed, spherical=True)
    kmeans.train(sample)
    CentroidIndex(kmeans.centroids).assign(x)
    return time.perf_counter() - start


def bare_rounds(pool: int, rounds: int, seed: int) -> float:
    """Mean ms of the least a round must do: draw its rows uniformly from those not taken."""
    rng = np.random.default_rng(seed)
    taken = np.zeros(pool, bool)
    taken[rng.choice(pool, size=int(0.09 * pool), replace=False)] = True
    budget, spent, times = pool // 5, int(0.09 * pool), []
    for _ in range(max(rounds, 1)):
        start = time.perf_counter()
        free = np.flatnonzero(~taken)
        pick = rng.choice(free, size=min(ROUND, budget - spent, len(free)), replace=False)
        taken[pick] = True
        times.append(time.perf_counter() - start)
        spent += len(pick)
    return round(1000 * float(np.mean(times)), 4)


def bare_train(ws: Path, ids: list[str], recipe: dict[str, Any]) -> tuple[int, float, float]:
    """(steps, seconds, tokens per row) of ``finetune`` in this process on the rows ``ids``."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from engine.artifacts import Pool
    from engine.llava import FinetuneConfig, load_base
    from engine.llava.data import collate
    from engine.llava.finetune import finetune
    from engine.workspace import Workspace
    from jobs.progress import paper_recipe

    base = load_base(Workspace.open(str(ws)))
    table = Pool.open(Workspace.open(str(ws))).read_table(["id", "image", "question", "answer"])
    examples = table.filter(
        pc.is_in(table.column("id"), value_set=pa.array(ids, pa.string()))
    ).to_pylist()
    cfg: FinetuneConfig = paper_recipe().model_copy(update=recipe)
    batch = collate(examples[:256], base.processor, max_length=base.max_length)
    tokens_per_row = float(batch["attention_mask"].sum()) / min(len(examples), 256)
    start = time.perf_counter()
    _, losses = finetune(base.model, base.processor, examples, cfg, base.max_length, log_every=0)
    return len(losses), time.perf_counter() - start, tokens_per_row
