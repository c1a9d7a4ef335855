"""The engine's GPU code paths, timed on one accelerator against the same machine's CPU.

Parts (each runs when its packages import; otherwise it is recorded as skipped, with why):
  * ``encoders``: ``engine.encoders`` image towers (open_clip ViT-B-32 at 224 px and the
    embedded default's tiny-clip / tiny-dinov2, random weights) and the MiniLM text encoder:
    images (texts)/s for the same batch on ``--device`` and on the CPU, and the smallest
    cosine between the two devices' vectors. ``--minilm`` names a local MiniLM folder
    (default: the packaged copy).
  * ``faiss``: ``engine.faiss_index.build_index`` / ``to_gpu`` (Flat and IVF) build time and
    queries/s with recall@k against exact CPU search, and ``engine.kmeans.train_spherical``
    with ``gpu=True`` against the CPU fit.
  * ``training``: the LoRA tiny LLaVA (``prepare_for_finetune``, ``param_groups``) through
    ``train_step``: a DeepSpeed ZeRO-2 engine (``engine.llava.train.deepspeed_config``) on
    ``--device`` against ``TorchStepper`` there and on the CPU: ms/step and tokens/s.

    python benchmarks/gpu_paths.py [--device cuda] [--parts encoders,faiss,training] \\
        [--small] [--out $OUT/gpu_paths.json]

``--device cpu --small`` is a smoke run for a machine with no GPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import report  # noqa: E402

HEADER = [
    "part",
    "case",
    "device",
    "dtype",
    "batch",
    "ms",
    "rate",
    "unit",
    "tokens/s",
    "speedup",
    "check",
]
PARTS = ("encoders", "faiss", "training")


def measure(fn, min_seconds: float, warmup: int = 1, max_iters: int = 1000) -> float:
    """Seconds per call of ``fn`` (which must finish its device work), after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    n, start = 0, time.perf_counter()
    while n < max_iters and (n < 2 or time.perf_counter() - start < min_seconds):
        fn()
        n += 1
    return (time.perf_counter() - start) / n


def devices(args) -> list[str]:
    return [args.device] + (["cpu"] if args.device != "cpu" else [])


def world_rows(n: int) -> tuple[list[bytes | None], list[str], list[str]]:
    """``n`` samples of the default world's test split: image bytes, questions, answers."""
    from engine.pool import first_exchange
    from engine.world.config import WorldConfig
    from engine.world.generate import generate_rows

    world = WorldConfig()
    records, _ = generate_rows(world, "test", 0, min(n, world.test_size))
    pairs = [first_exchange(c) for c in records.column("conversations").to_pylist()]
    images = records.column("image").to_pylist()
    return images, [q for q, _ in pairs], [a for _, a in pairs]


def cycle(items: list, n: int) -> list:
    return [items[i % len(items)] for i in range(n)]


# -- encoders ----------------------------------------------------------------------------


def encoder_cases(args) -> list[tuple[str, dict, int]]:
    big, tiny = (16, 64) if args.small else (args.batch, args.tiny_batch)
    cases = [
        ("open_clip ViT-B-32 224px", {"kind": "open_clip", "model": "ViT-B-32"}, big),
        ("tiny-clip 64px", {"kind": "open_clip", "model": "tiny-clip"}, tiny),
        ("tiny-dinov2 64px", {"kind": "dinov2", "model": "tiny-dinov2"}, tiny),
    ]
    return [(name, {**enc, "weights": "random"}, batch) for name, enc, batch in cases]


def bench_encoders(args) -> list[dict]:
    from engine.encoders import EncoderSpec, preprocess_for, preprocess_images

    images, questions, _ = world_rows(256)
    images = [b for b in images if b is not None]
    rows = []
    for name, enc, batch in encoder_cases(args):
        prep = preprocess_for(EncoderSpec(**enc))
        batch_bytes = cycle(images, batch)
        t = measure(lambda b=batch_bytes, p=prep: preprocess_images(b, p), args.seconds)
        pixels, _ = preprocess_images(batch_bytes, prep)
        rows.append(
            row("encoders", f"{name}: decode+resize", "cpu (1 process)", "uint8", batch, t, "img/s")
        )
        rows += compare(args, name, enc, batch, lambda e, x=pixels: e(x), "img/s")
    texts = cycle(questions, args.text_batch if not args.small else 32)
    minilm = args.minilm or "all-MiniLM-L6-v2"
    enc = {"kind": "sentence_transformers", "model": minilm}
    rows += compare(args, "MiniLM-L6-v2 text", enc, len(texts), lambda e: e(texts), "texts/s")
    return rows


def compare(args, name: str, enc: dict, batch: int, call, unit: str) -> list[dict]:
    """One row per device: the encoder on ``call``'s batch; check = min cosine vs the CPU."""
    from engine.encoders import EncoderSpec, load_encoder

    out, vectors = [], {}
    for device in devices(args):
        encoder = load_encoder(EncoderSpec(**enc, device=device))
        seconds = measure(lambda e=encoder: call(e), args.seconds)
        vectors[device] = call(encoder)
        out.append(row("encoders", name, device, encoder.info.dtype, batch, seconds, unit))
        del encoder
    cpu = out[-1]
    for r in out[:-1]:
        r["speedup"] = round(r["rate"] / cpu["rate"], 1)
        cos = float((vectors[r["device"]] * vectors["cpu"]).sum(1).min())
        r["check"] = f"min cos vs cpu {cos:.4f}"
    return out


def row(part, case, device, dtype, batch, seconds, unit, **extra) -> dict:
    return {
        "part": part,
        "case": case,
        "device": device,
        "dtype": dtype,
        "batch": batch,
        "ms": round(1000 * seconds, 2),
        "rate": round(batch / seconds, 1),
        "unit": unit,
        "speedup": "",
        "check": "",
        **extra,
    }


# -- faiss -------------------------------------------------------------------------------


def bench_faiss(args) -> list[dict]:
    import faiss

    from engine.faiss_index import build_index, set_search_params, to_gpu
    from engine.kmeans import train_spherical

    gpu = args.device != "cpu"
    if gpu and faiss.get_num_gpus() == 0:
        raise RuntimeError(f"faiss {faiss.__version__} sees no GPU (a CPU-only build?)")
    n, dim, nq, k = (20_000, 64, 200, 10) if args.small else (args.rows, args.dim, 2000, 10)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = x[rng.choice(n, nq, replace=False)] + 0.1 * rng.standard_normal((nq, dim), np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    exact = build_index(x, "Flat").search(q, k)[1]
    rows = []
    nlist = 64 if args.small else 1024
    for factory in ("Flat", f"IVF{nlist},Flat"):
        case = []
        for device in devices(args):
            on_gpu = device != "cpu"
            start = time.perf_counter()
            index = build_index(x, factory, gpu=on_gpu)
            build_s = time.perf_counter() - start
            params = set_search_params(index, nprobe=16)
            work, _res = to_gpu(index, on_gpu)
            seconds = measure(lambda w=work: w.search(q, k), args.seconds)
            labels = work.search(q, k)[1]
            hits = [len(set(a) & set(b)) for a, b in zip(labels, exact, strict=True)]
            recall = np.mean(hits) / k
            check = f"recall@{k} vs exact {recall:.3f}"
            if params:
                check += f"; nprobe {getattr(work, 'nprobe', params['nprobe'])}"
            name = f"{factory} search {n}x{dim}"
            case.append(row("faiss", name, device, "float32", nq, seconds, "queries/s"))
            case[-1]["check"] = check
            rows.append(
                row("faiss", f"{factory} build {n}x{dim}", device, "float32", n, build_s, "rows/s")
            )
        speedups(case)
        rows += case
    kc, niter = (32, 5) if args.small else (args.clusters, args.niter)
    sample = x[: min(n, kc * 256)]
    case = []
    for device in devices(args):
        fit = train_spherical(sample, kc, niter=niter, gpu=device != "cpu")
        name = f"spherical k-means k={kc} niter={niter}"
        case.append(
            row(
                "faiss",
                name,
                device,
                "float32",
                len(sample) * niter,
                fit.seconds,
                "row-iters/s",
                check=f"objective {fit.objective[-1]:.1f}",
            )
        )
    speedups(case)
    return rows + case


def speedups(case: list[dict]) -> None:
    for r in case[:-1]:
        r["speedup"] = round(r["rate"] / case[-1]["rate"], 1)


# -- LLaVA training steps ------------------------------------------------------------------


def ds_config(micro_batch: int) -> tuple[dict, str]:
    """The trainer actor's DeepSpeed config, ZeRO-2, and where it came from."""
    from engine.llava.train import deepspeed_config

    return deepspeed_config(micro_batch, 1, 2, 1.0), "engine.llava.train.deepspeed_config"


def llava_batch(args):
    """A fresh LoRA-prepared tiny LLaVA, its param groups, and one collated batch."""
    import torch

    from engine.llava import (
        FinetuneConfig,
        LlavaModelConfig,
        build_llava,
        build_world_tokenizer,
        collate,
        make_processor,
        param_groups,
        prepare_for_finetune,
    )
    from engine.world.config import WorldConfig

    small = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64}
    model_cfg = LlavaModelConfig.model_validate(
        {"vision": small, "text": small, "max_length": 160} if args.small else {}
    )
    tok = build_world_tokenizer(WorldConfig())
    torch.manual_seed(0)
    model = build_llava(model_cfg, tok)
    cfg = FinetuneConfig(lr=1e-2, projector_lr=1e-2)
    model = prepare_for_finetune(model, cfg)
    images, questions, answers = world_rows(args.micro_batch)
    keys = ("image", "question", "answer")
    columns = [cycle(c, args.micro_batch) for c in (images, questions, answers)]
    examples = [dict(zip(keys, v, strict=True)) for v in zip(*columns, strict=True)]
    batch = collate(examples, make_processor(tok, model_cfg), max_length=model_cfg.max_length)
    groups = [{k: v for k, v in g.items() if k != "name"} for g in param_groups(model, cfg)]
    return model, groups, batch


def bench_training(args, skipped: dict) -> list[dict]:
    import torch

    from engine.llava import TorchStepper, train_step

    rows = []
    for device in devices(args):
        model, groups, batch = llava_batch(args)
        model.to(device)
        stepper = TorchStepper(model, torch.optim.AdamW(groups), max_grad_norm=1.0)
        rows.append(time_steps(args, "torch AdamW", device, stepper, batch, train_step))
    try:
        rows.insert(0, deepspeed_steps(args))
    except Exception as err:  # no deepspeed here: keep the torch rows
        skip(skipped, "training: deepspeed", err)
    speedups(rows)
    return rows


def time_steps(args, name: str, device: str, stepper, batch, train_step, **extra) -> dict:
    import torch

    sync = torch.cuda.synchronize if device.startswith("cuda") else lambda: None
    losses = [train_step(stepper, batch) for _ in range(2)]  # warm-up
    sync()
    steps = 3 if args.small else args.steps
    start = time.perf_counter()
    losses += [train_step(stepper, batch) for _ in range(steps)]
    sync()
    seconds = (time.perf_counter() - start) / steps
    tokens = int(batch["attention_mask"].sum())
    out = row(
        "training",
        f"tiny LLaVA LoRA step: {name}",
        device,
        "float32",
        len(batch["input_ids"]),
        seconds,
        "samples/s",
        **extra,
    )
    out["tokens/s"] = round(tokens / seconds, 1)
    out["check"] = f"loss {losses[0]:.3f} -> {losses[-1]:.3f} ({tokens} tokens/step)"
    out["losses"] = [round(v, 4) for v in losses]
    return out


def deepspeed_steps(args) -> dict:
    """A ZeRO-2 engine over the LoRA model, one process (world size 1), on ``--device``."""
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
    for key, value in {**env, "MASTER_PORT": str(args.master_port)}.items():
        os.environ.setdefault(key, value)
    if args.device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import torch

    from engine.llava import train_step
    from engine.llava.train import DeepSpeedStepper

    model, groups, batch = llava_batch(args)
    config, source = ds_config(args.micro_batch)
    deepspeed.init_distributed(dist_backend="gloo" if args.device == "cpu" else "nccl")
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=torch.optim.AdamW(groups), config=config
    )
    device = str(engine.device)
    try:
        return time_steps(
            args,
            "DeepSpeed ZeRO-2",
            device,
            DeepSpeedStepper(engine),
            batch,
            train_step,
            deepspeed=deepspeed.__version__,
            config_source=source,
        )
    finally:
        torch.distributed.destroy_process_group()


# -- main ----------------------------------------------------------------------------------


RUNNERS = {
    "encoders": lambda args, skipped: bench_encoders(args),
    "faiss": lambda args, skipped: bench_faiss(args),
    "training": bench_training,
}


def skip(skipped: dict, what: str, err: Exception) -> None:
    """Record why ``what`` could not run (the traceback goes to stderr) and go on."""
    skipped[what] = f"{type(err).__name__}: {err}".strip()
    traceback.print_exc()
    print(f"skipped {what}: {skipped[what]}", file=sys.stderr)


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({os.cpu_count()} cores)"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
    p.add_argument("--parts", default=",".join(PARTS), help="comma-separated: " + ", ".join(PARTS))
    p.add_argument("--small", action="store_true", help="tiny sizes: a smoke run")
    p.add_argument("--seconds", type=float, default=3.0, help="timed seconds per measurement")
    p.add_argument("--batch", type=int, default=256, help="ViT-B-32 images per batch")
    p.add_argument("--tiny-batch", type=int, default=1024, help="tiny towers' images per batch")
    p.add_argument("--text-batch", type=int, default=1024, help="texts per MiniLM call")
    p.add_argument("--minilm", default=None, help="local MiniLM folder (default: packaged)")
    p.add_argument("--rows", type=int, default=500_000, help="faiss vectors")
    p.add_argument("--dim", type=int, default=512, help="faiss vector width")
    p.add_argument("--clusters", type=int, default=1000, help="k-means clusters")
    p.add_argument("--niter", type=int, default=20, help="k-means iterations")
    p.add_argument("--micro-batch", type=int, default=64, help="LLaVA samples per step")
    p.add_argument("--steps", type=int, default=30, help="timed LLaVA steps")
    p.add_argument("--master-port", type=int, default=29500)
    p.add_argument("--out", default=None, help="JSON path (default: $OUT/gpu_paths.json)")
    args = p.parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.small:
        args.seconds, args.micro_batch = min(args.seconds, 0.5), min(args.micro_batch, 8)
    out = args.out or str(Path(os.environ.get("OUT", "benchmarks/results")) / "gpu_paths.json")
    rows, skipped = [], {}
    for part in args.parts.split(","):
        try:
            rows += RUNNERS[part](args, skipped)
        except Exception as err:  # record why a part could not run, go on
            skip(skipped, part, err)
    report(
        "gpu_paths",
        rows,
        HEADER,
        out,
        device=device_name(args.device),
        args=vars(args),
        skipped=skipped,
    )
    for part, why in skipped.items():
        print(f"skipped {part}: {why}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
