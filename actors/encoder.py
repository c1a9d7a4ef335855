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
    pass-through columns and ``vector``, float32 (n, dim), L2-normalised.
    """

    def __init__(self, spec: dict, input_column: str):
        self.encoder = load_encoder(EncoderSpec(**spec))
        self.input_column = input_column
        log.info("encoder loaded: %s", self.encoder.info)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {k: v for k, v in batch.items() if k != self.input_column}
        out["vector"] = self.encoder(batch[self.input_column])
        return out
