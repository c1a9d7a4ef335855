"""An encoder actor SIGKILLed mid-embed: Ray Data restarts it, retries its batches, and
the job completes with every pool id embedded exactly once, in pool order."""

from __future__ import annotations

import json
import threading

import pytest

from engine.workspace import read_parquet_dir
from jobs.cli import main
from tests.faults.chaos import ray_worker_pids, sigkill, wait_for
from tests.world_workspace import ingested

SHARDS = 20


@pytest.fixture
def pool_ws(small_world, tmp_path):
    return ingested(small_world, tmp_path / "ws", 2000 // SHARDS)


def test_a_killed_encoder_actor_costs_a_retry_not_a_row(pool_ws, fault_report):
    clip = pool_ws / "embeddings" / "clip"
    seen = {}

    def crash_the_encoder():
        # Once rows have landed (the run is demonstrably under way), kill every encoder.
        wait_for(lambda: list(clip.glob("**/part-*.parquet")), 300, "the first embedded rows")
        seen["finished_at_kill"] = len(list(clip.glob("part-*.parquet")))
        victims = wait_for(lambda: ray_worker_pids("EmbedActor"), 60, "an encoder actor")
        sigkill(victims)
        seen["killed"] = victims
        seen["restarted"] = wait_for(
            lambda: [p for p in ray_worker_pids("EmbedActor") if p not in victims],
            300,
            "Ray Data to restart the encoder",
        )

    killer = threading.Thread(target=crash_the_encoder, daemon=True)
    killer.start()
    # Small batches: the embedding lasts long enough for the kill to land mid-way.
    args = ["--set", "clip.batch_size=8", "--set", "preprocess_batch_size=8"]
    assert main(["embed", "--workspace", str(pool_ws), "--spaces", "clip", *args]) == 0
    killer.join(timeout=60)
    assert seen.get("killed"), "no encoder actor was found to kill"
    assert seen.get("restarted"), "the encoder was not restarted"
    assert seen["finished_at_kill"] < SHARDS, "the kill came after the last shard"

    meta = json.loads((clip / "meta.json").read_text())
    assert meta["status"] == "complete"
    assert meta["embedded"] == meta["vectors"] == 2000 and meta["resumed"] == 0
    ids = read_parquet_dir(str(clip), columns=["id"]).column("id").to_pylist()
    pool = read_parquet_dir(str(pool_ws / "pool"), columns=["id"]).column("id").to_pylist()
    assert ids == pool  # each pool id once, none twice, none missing, in pool order
    assert not (clip / "_parts").exists()
    fault_report(
        injected=f"SIGKILL of the encoder actor mid-embed ({seen['finished_at_kill']} of "
        f"{SHARDS} shards finished)",
        outcome=f"restarted by Ray Data, batches retried: {len(ids)}/{len(pool)} ids embedded "
        "once, in pool order",
        lost=len(set(pool) - set(ids)),
        rows=len(pool),
    )
