"""The engine's GPU paths give what its CPU paths give: encoders, faiss, a DeepSpeed step.

Marked ``gpu`` (deselected by default; run with ``pytest -m gpu tests/gpu``) and skipped
where torch sees no CUDA device or a package is missing (faiss without GPU support).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "encoder",
    [
        {"kind": "open_clip", "model": "tiny-clip", "weights": "random"},
        {"kind": "dinov2", "model": "tiny-dinov2", "weights": "random"},
    ],
)
def test_image_encoder_on_cuda_matches_cpu(encoder):
    if encoder["kind"] == "open_clip":
        pytest.importorskip("open_clip")
    from engine.encoders import EncoderSpec, load_encoder

    pixels = np.random.default_rng(0).integers(0, 256, (32, 64, 64, 3), dtype=np.uint8)
    cpu = load_encoder(EncoderSpec(**encoder, device="cpu"))(pixels)
    for dtype, tol in (("float32", 1e-4), ("auto", 1e-2)):  # auto: float16 on CUDA
        gpu = load_encoder(EncoderSpec(**encoder, device="cuda", dtype=dtype))
        assert gpu.info.device.startswith("cuda")
        vectors = gpu(pixels)
        assert vectors.dtype == np.float32
        assert (vectors * cpu).sum(1).min() > 1 - tol


@pytest.fixture(scope="module")
def gpu_faiss():
    faiss = pytest.importorskip("faiss")
    if not hasattr(faiss, "get_num_gpus") or faiss.get_num_gpus() == 0:
        pytest.skip(f"faiss {faiss.__version__} has no GPU support here")
    return faiss


def unit_rows(n, d, seed):
    x = np.random.default_rng(seed).standard_normal((n, d), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("factory", ["Flat", "IVF64,Flat"])
def test_faiss_gpu_search_returns_the_cpu_neighbours(gpu_faiss, factory):
    from engine.faiss_index import build_index, set_search_params, to_gpu

    x, q = unit_rows(20_000, 64, 0), unit_rows(100, 64, 1)
    index = build_index(x, factory)
    set_search_params(index, nprobe=8)  # as the retrieval actor: set, then move
    cpu_scores, cpu_labels = index.search(q, 10)
    gpu_index, resources = to_gpu(index, True)
    assert resources is not None
    gpu_scores, gpu_labels = gpu_index.search(q, 10)
    same = np.mean([len(set(a) & set(b)) for a, b in zip(cpu_labels, gpu_labels, strict=True)])
    assert same >= 9.9
    np.testing.assert_allclose(gpu_scores, cpu_scores, atol=1e-4)


def test_faiss_gpu_build_and_kmeans_match_the_cpu(gpu_faiss):
    from engine.faiss_index import build_index
    from engine.kmeans import train_spherical

    x = unit_rows(20_000, 64, 2)
    built = build_index(x, "IVF64,Flat", gpu=True)
    assert built.ntotal == len(x) and not hasattr(built, "getDevice")  # back on the CPU
    gpu = train_spherical(x, 32, niter=10, gpu=True)
    cpu = train_spherical(x, 32, niter=10, gpu=False)
    assert gpu.device == "gpu"
    np.testing.assert_allclose(np.linalg.norm(gpu.centroids, axis=1), 1.0, atol=1e-4)
    assert gpu.objective[-1] == pytest.approx(cpu.objective[-1], rel=0.02)


def test_deepspeed_zero2_step_on_cuda_lowers_the_loss(tmp_path):
    pytest.importorskip("deepspeed")
    out = tmp_path / "training.json"
    cmd = [sys.executable, "benchmarks/gpu_paths.py", "--parts", "training", "--small"]
    cmd += ["--device", "cuda", "--master-port", "29531", "--out", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["skipped"] == {}, doc["skipped"]
    ds = next(r for r in doc["rows"] if "DeepSpeed" in r["case"])
    assert ds["device"].startswith("cuda")
    assert ds["losses"][-1] < ds["losses"][0]
