"""Does the tiny LLaVA learn the shapes world? Fine-tune the cached base on the pool's QA
(LoRA on the LM, projector fully trained) and score each family on the ``test`` split,
beside the text-only prior: the same model trained and evaluated with the image blanked.

    python benchmarks/tiny_llava.py [--workspace ws/bench-llava] [--pool 2000] [--epochs 10]

The pool and test samples are generated in-process with the default world's config
(the bytes ``vlselect world`` writes); the base is built once into the workspace (or
reused). Prints a table and writes benchmarks/results/tiny_llava.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import report  # noqa: E402
from engine.llava import (  # noqa: E402
    BaseTrainConfig,
    FinetuneConfig,
    LlavaModelConfig,
    build_or_load_base,
    load_base,
)
from engine.llava.finetune import accuracy_by_group, finetune  # noqa: E402
from engine.pool import first_exchange  # noqa: E402
from engine.workspace import Workspace  # noqa: E402
from engine.world.config import WorldConfig  # noqa: E402
from engine.world.generate import generate_rows  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def world_examples(world: WorldConfig, split: str, count: int) -> tuple[list[dict], list[str]]:
    """Examples (image bytes, question, answer) of ``split`` and each one's family.

    The family comes from the generator's labels: evaluation may read them.
    """
    records, labels = generate_rows(world, split, 0, count)
    out = []
    for rec in records.to_pylist():
        question, answer = first_exchange(rec["conversations"])
        out.append({"id": rec["id"], "image": rec["image"], "question": question, "answer": answer})
    return out, labels.column("family").to_pylist()


def run(mode: str, ws: Workspace, train, test, families, cfg: FinetuneConfig) -> dict:
    blank = mode == "text-only prior"
    base = load_base(ws)
    t0 = time.perf_counter()
    model, losses = finetune(
        base.model,
        base.processor,
        train,
        cfg,
        base.max_length,
        blank_images=blank,
        log=lambda m: print(f"[{mode}] {m}", flush=True),
    )
    t1 = time.perf_counter()
    acc = accuracy_by_group(
        model, base.processor, test, families, base.max_length, blank_images=blank
    )
    t2 = time.perf_counter()
    return {
        "accuracy": acc,
        "train_seconds": round(t1 - t0, 1),
        "eval_seconds": round(t2 - t1, 1),
        "steps": len(losses),
        "final_loss": round(sum(losses[-10:]) / min(10, len(losses)), 4),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workspace", default=str(ROOT / "ws" / "bench-llava"))
    p.add_argument("--pool", type=int, default=2000, help="pool samples fine-tuned on")
    p.add_argument("--test", type=int, default=1000, help="test samples scored")
    p.add_argument("--epochs", type=float, default=10)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    p.add_argument("--overwrite", action="store_true", help="rebuild a base of another config")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "tiny_llava.json"))
    args = p.parse_args()

    world = WorldConfig(size=args.pool, test_size=args.test)
    ws = Workspace.open(args.workspace)
    t0 = time.perf_counter()
    base, built = build_or_load_base(
        ws, world, LlavaModelConfig(), BaseTrainConfig(), overwrite=args.overwrite
    )
    base_seconds = round(time.perf_counter() - t0, 1)
    train, _ = world_examples(world, "pool", args.pool)
    test, families = world_examples(world, "test", args.test)
    overrides = {"epochs": args.epochs, **({"lr": args.lr} if args.lr else {})}
    if args.full:
        overrides.update(lora=None)
    cfg = FinetuneConfig.model_validate(overrides)
    runs = {m: run(m, ws, train, test, families, cfg) for m in ("image", "text-only prior")}

    groups = [*sorted(set(families)), "overall"]
    n = {g: families.count(g) for g in groups[:-1]} | {"overall": len(families)}
    rows = [
        {
            "family": g,
            "n": n[g],
            "accuracy": f"{runs['image']['accuracy'][g]:.3f}",
            "text-only prior": f"{runs['text-only prior']['accuracy'][g]:.3f}",
        }
        for g in groups
    ]
    metrics = base.meta.metrics
    report(
        "tiny_llava",
        rows,
        ["family", "n", "accuracy", "text-only prior"],
        args.out,
        base={
            "built_now": built,
            "seconds": base_seconds,
            "metrics": metrics,
            "fingerprint": base.fingerprint,
            "parameters": base.meta.parameters,
        },
        finetune=cfg.model_dump(mode="json"),
        runs=runs,
        pool=args.pool,
    )
    print(
        f"\nbase: tower {metrics['vision_patch_accuracy']}, caption loss "
        f"{metrics['caption_loss']:.3f}, {metrics['seconds']['total']} s"
    )
    for m, r in runs.items():
        print(f"{m}: train {r['train_seconds']} s ({r['steps']} steps), eval {r['eval_seconds']} s")


if __name__ == "__main__":
    main()
