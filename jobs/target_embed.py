"""Benchmark samples into the pool's spaces, with the pool's own encoders and skill writer.

- Concept: the CLIP image tower the pool's ``clip`` space was embedded with (the
  encoder recorded in the committed ``clip`` space, else the workspace's
  ``embed.clip``), through Ray Data: decode-and-resize CPU tasks, then an encoder actor
  pool (``EmbedActor``, the embed stage's actor) with that space's resources.
- Skill: the skills stage's backend and model (the committed skills' config, else the
  workspace's ``skills`` section) describe each question (``jobs.skills.generate``),
  answers cached in ``<ws>/cache/skills`` as the pool's are, so a question the pool or an
  earlier run asked is never asked again; then the ``skill`` space's text encoder.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from engine.artifacts import EmbeddingSpace, Skills
from engine.config import build_config
from engine.encoders import ImagePreprocess, preprocess_for, preprocess_images
from engine.errors import InputError
from engine.skills import PROMPT_VERSION, cache_key
from engine.skills_config import SkillsConfig
from engine.skills_store import CacheWriter, read_cache
from engine.target_input import Benchmark, require_usable
from engine.workspace import Workspace
from jobs import embed, skills
from jobs.skills_passes import put_blocks

IMAGE_STATUS = {0: "no image", -1: "undecodable"}


def space_config(ws: Workspace, space: str) -> embed.SpaceConfig:
    """How the pool's ``space`` was embedded: its recorded config, else the workspace's."""
    found = EmbeddingSpace.find(ws, space)
    if found is not None and found.meta.config:  # empty: vectors not made by vlselect embed
        return embed.SpaceConfig(**found.meta.config)
    return getattr(build_config(embed.STAGE, embed.CONFIG, ws.read_config()), space)


def skills_config(ws: Workspace) -> SkillsConfig:
    """The skills stage's config the pool's descriptions were written with, else the
    workspace's (the backend, model and generation settings: the same prompt answers)."""
    found = Skills.find(ws)
    if found is not None and found.meta.config:
        return SkillsConfig(**found.meta.config)
    return build_config(skills.STAGE, skills.CONFIG, ws.read_config())


def _prepare(batch: dict, prep: dict) -> dict:
    pixels, status = preprocess_images(list(batch["image"]), ImagePreprocess(**prep))
    return {"row": batch["row"], "status": status, "pixels": pixels}


def _vectors(ds, rows: int) -> np.ndarray:
    """Collect ``(row, vector)`` batches into float32 (rows, d) in row order."""
    out = None
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        vectors = np.asarray(np.stack(batch["vector"]), np.float32)
        if out is None:
            out = np.zeros((rows, vectors.shape[1]), np.float32)
        out[batch["row"]] = vectors
    return out if out is not None else np.zeros((0, 0), np.float32)


def embed_images(
    images: list[bytes], space_cfg: embed.SpaceConfig, preprocess_cpus: float = 0.5
) -> tuple[np.ndarray, list[str | None]]:
    """Encoded images -> (L2-normalised float32 (n, d), per image None or why it is unusable)."""
    prep = preprocess_for(space_cfg.encoder).__dict__
    # One Arrow table sliced into blocks: no Python dict per image in the driver.
    table = pa.table({"row": np.arange(len(images)), "image": pa.array(images, pa.binary())})
    step = max(256, -(-len(images) // 16))
    ds = ray.data.from_arrow([table.slice(i, step) for i in range(0, max(len(images), 1), step)])
    ds = ds.map_batches(
        _prepare, fn_kwargs={"prep": prep}, batch_size=256, num_cpus=preprocess_cpus
    )
    status = np.ones(len(images), np.int8)
    vectors = np.zeros((0, 0), np.float32)
    out = embed.encoder_stage(ds, space_cfg, "pixels")
    for batch in out.iter_batches(batch_size=None, batch_format="numpy"):
        v = np.asarray(np.stack(batch["vector"]), np.float32)
        if not vectors.size:
            vectors = np.zeros((len(images), v.shape[1]), np.float32)
        vectors[batch["row"]] = v
        status[batch["row"]] = batch["status"]
    problems = [IMAGE_STATUS.get(int(s)) for s in status]
    return vectors, problems


def embed_texts(texts: list[str], space_cfg: embed.SpaceConfig) -> np.ndarray:
    """Texts -> L2-normalised float32 (n, d) with the space's text encoder (an actor pool)."""
    items = [{"row": i, "text": t} for i, t in enumerate(texts)]
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items) // 256, 16)))
    return _vectors(embed.encoder_stage(ds, space_cfg, "text"), len(texts))


def describe_skills(
    ws: Workspace, cfg: SkillsConfig, questions: list[str]
) -> tuple[list[str | None], dict]:
    """Each question's skill text (None where the writer failed, with reasons counted).

    Unique questions only, cached answers first; new successes are added to the cache.
    Returns ``(skill_text per question, stats)``.
    """
    model = skills.model_id(cfg)
    keys = [cache_key(q, PROMPT_VERSION, model) for q in questions]
    unique = dict(zip(keys, questions, strict=True))
    cached = read_cache(ws, set(unique))
    have = set(cached.column("key").to_pylist())
    todo = [k for k in unique if k not in have]
    failed: dict[str, str] = {}
    if todo:
        pending = pa.table({"key": todo, "question": [unique[k] for k in todo]})
        writer = CacheWriter(ws, model, cfg.cache_flush_rows)
        try:
            for batch in skills.generate(cfg, put_blocks(pending, cfg.asked_batch_size), model):
                writer.add(batch)
                bad = batch.filter(pc.equal(batch.column("status"), "failed"))
                failed.update(zip(bad["key"].to_pylist(), bad["reason"].to_pylist(), strict=True))
        finally:
            writer.flush()
        cached = read_cache(ws, set(unique))
    text = dict(zip(cached["key"].to_pylist(), cached["skill_text"].to_pylist(), strict=True))
    out = [text.get(k) for k in keys]
    reasons = Counter((failed.get(k) or "no answer").split(":")[0] for k, t in zip(keys, out, strict=True) if t is None)  # fmt: skip
    stats = {
        "backend": cfg.backend,
        "model": model,
        "unique_questions": len(unique),
        "cached": len(unique) - len(todo),
        "generated": len(todo),
        "failed": sum(reasons.values()),
        "failed_by_reason": dict(reasons),
    }
    return out, stats


def check_dim(vectors: np.ndarray, dim: int, space: str, ws: Workspace) -> None:
    if vectors.shape[1] != dim:
        raise InputError(
            f"benchmark samples embed to {vectors.shape[1]}-d vectors in space {space!r} but "
            f"its index is {dim}-d: the pool was embedded with another encoder; re-embed "
            f"the pool (`vlselect embed --workspace {ws.uri} --spaces {space} --overwrite`) "
            f"and rebuild the index, or restore the encoder config it was embedded with"
        )


def embed_benchmarks(
    ws: Workspace, benches: list[Benchmark], indexes: dict, preprocess_cpus: float
) -> tuple[dict, dict]:
    """Concept and skill vectors of every usable sample; samples that fail either are
    refused (``image_unreadable`` / ``skill_description_failed``). Returns
    ``({bench: {"concept": (n, d_c), "skill": (n, d_s), "skill_text": [...]}}, stats)``."""
    images = [img for b in benches for img in b.images]
    clip_cfg, skill_cfg = space_config(ws, "clip"), space_config(ws, "skill")
    concept, problems = embed_images(images, clip_cfg, preprocess_cpus)
    texts, stats = describe_skills(ws, skills_config(ws), [q for b in benches for q in b.questions])
    ok = [t is not None for t in texts]
    skill = np.zeros((len(texts), indexes["skill"].dim), np.float32)
    if any(ok):
        vectors = embed_texts([t for t in texts if t is not None], skill_cfg)
        check_dim(vectors, indexes["skill"].dim, "skill", ws)
        skill[np.flatnonzero(ok)] = vectors
    check_dim(concept, indexes["clip"].dim, "clip", ws)
    out, start = {}, 0
    for b in benches:
        stop = start + len(b)
        rows = slice(start, stop)
        keep_img = [p is None for p in problems[rows]]
        keep = [a and c for a, c in zip(keep_img, ok[rows], strict=True)]
        text = texts[rows]
        vecs = {"concept": concept[rows][keep], "skill": skill[rows][keep],
                "skill_text": [t for t, k in zip(text, keep, strict=True) if k]}  # fmt: skip
        b.drop(keep_img, "image_unreadable", problems[rows])
        b.drop([k for k, i in zip(keep, keep_img, strict=True) if i], "skill_description_failed",
               [None] * sum(keep_img))  # fmt: skip
        require_usable(b)
        out[b.name] = vecs
        start = stop
    stats["encoders"] = {"clip": clip_cfg.encoder.model, "skill": skill_cfg.encoder.model}
    return out, stats
