"""The encoder pool's actor: loads one encoder once, then turns batches into vectors."""

from __future__ import annotations

import logging

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

    def __init__(self, spec: dict, input_column: str):
        self.encoder = load_encoder(EncoderSpec(**spec))
        self.input_column = input_column
        log.info("encoder loaded: %s", self.encoder.info)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {k: v for k, v in batch.items() if k != self.input_column}
        data = batch[self.input_column]
        if data.dtype.kind in "OUS" and len(data):  # texts: skill descriptions repeat verbatim
            unique, inverse = np.unique(data.astype(str), return_inverse=True)
            out["vector"] = self.encoder(unique.astype(object))[inverse]
        else:
            out["vector"] = self.encoder(data)
        return out
