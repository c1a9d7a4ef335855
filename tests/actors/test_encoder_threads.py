"""An encoder actor's torch threads: asked for, or the node's cores shared by the pool."""

from __future__ import annotations

import os

from actors.encoder import encoder_threads


def test_asked_threads_are_kept():
    assert encoder_threads(3, actors=1) == 3 and encoder_threads(1, actors=8) == 1


def test_zero_shares_the_cores_among_the_pool_and_never_drops_below_one():
    cores = len(os.sched_getaffinity(0))
    assert encoder_threads(0, actors=1) == cores
    assert encoder_threads(0, actors=2) == max(1, cores // 2)
    assert encoder_threads(0, actors=cores * 4) == 1
