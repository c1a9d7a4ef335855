"""The encoder pool's actor: loads one encoder once, then turns batches into vectors."""

from __future__ import annotations

import logging
import os

import numpy as np

from engine.encoders import EncoderSpec, load_encoder

log = logging.getLogger("vlselect.embed")


class EmbedActor:
    """A Ray Data callable class for ``map_batches(..., compute=ActorPoolStrategy(...))``.

    Input batch: the column ``input_column`` (uint8 pixels (n, crop, crop, 3) for an
    image encoder, n strings for a text encoder) plus pass-through columns. Output: the
    pass-through columns and ``vector``, float32 (n, dim), L2-normalised. A text encoder
    encodes each distinct string of a batch once (equal texts get equal vectors).
    """

    def __init__(self, spec: dict, input_column: str, actors: int = 1):
        """``actors``: the most actors of this pool, which share a node's cores for the
        encoder's torch threads when the spec leaves them at 0 (``encoder_threads``)."""
        spec = EncoderSpec(**spec)
        threads = encoder_threads(spec.torch_threads, actors)
        self.encoder = load_encoder(spec.model_copy(update={"torch_threads": threads}))
        self.input_column = input_column
        log.info("encoder loaded: %s, %d torch threads", self.encoder.info, threads)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {k: v for k, v in batch.items() if k != self.input_column}
        data = batch[self.input_column]
        if data.dtype.kind in "OUS" and len(data):  # texts: skill descriptions repeat verbatim
            unique, inverse = np.unique(data.astype(str), return_inverse=True)
            out["vector"] = self.encoder(unique.astype(object))[inverse]
        else:
            out["vector"] = self.encoder(data)
        return out


def encoder_threads(requested: int, actors: int) -> int:
    """torch intra-op threads of one encoder actor: ``requested``, or (0) the cores this
    process may run on divided among the pool's ``actors``, at least 1.

    Ray gives a worker with fractional ``num_cpus`` one thread (OMP_NUM_THREADS=1); the
    encoder asks for half a CPU so that decode tasks still schedule beside it, but it is
    the stage's bottleneck, and one thread left a 2-core node half idle (the text space
    of 10k rows: 79 s with one thread, 58 s with both cores). Decode tasks are short and
    the OS shares the cores between them and the encoder's threads.
    """
    if requested:
        return requested
    return max(1, len(os.sched_getaffinity(0)) // max(1, actors))
