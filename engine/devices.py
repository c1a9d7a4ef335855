"""Where a model runs: the config's ``device``/``dtype`` words resolved on this worker."""

from __future__ import annotations


def resolve_device(device: str, dtype: str, cuda_auto_dtype: str, torch_threads: int = 0):
    """``("auto"|"cpu"|"cuda", "auto"|dtype name)`` -> ``(torch.device, torch.dtype)``.

    'auto' takes CUDA when this worker sees a GPU; an 'auto' dtype is
    ``cuda_auto_dtype`` there and float32 on CPU. ``torch_threads`` > 0 sets torch's
    intra-op threads (0 keeps Ray's per-worker setting).
    """
    import torch

    if torch_threads:
        torch.set_num_threads(torch_threads)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = cuda_auto_dtype if device.startswith("cuda") else "float32"
    return torch.device(device), getattr(torch, dtype)
