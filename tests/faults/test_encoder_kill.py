"""An encoder actor SIGKILLed mid-embed: Ray Data restarts it, retries its batches, and
the job completes with every pool id embedded exactly once, in pool order."""

from __future__ import annotations

import json
import threading

import pytest

from engine.artifacts import EmbeddingSpace, Pool
from engine.commit import ATTEMPTS
from engine.shards import PARTS_DIR
from engine.workspace import Workspace
from jobs.cli import main
from tests.faults.chaos import ray_worker_pids, sigkill, wait_for
from tests.world_workspace import ingested

SHARDS = 20


@pytest.fixture
def pool_ws(small_world, tmp_path):
    return ingested(small_world, tmp_path / "ws", 2000 // SHARDS)


def test_a_killed_encoder_actor_costs_a_retry_not_a_row(pool_ws, fault_report, capsys):
    clip = pool_ws / "embeddings" / "clip"  # the run's parts and shards: _attempts/<id>/
    seen = {}

    def crash_the_encoder():
        # Once rows have landed (the run is demonstrably under way), kill every encoder.
        wait_for(lambda: list(clip.glob("**/part-*.parquet")), 300, "the first embedded rows")
        seen["finished_at_kill"] = len(list(clip.glob(f"{ATTEMPTS}/*/part-*.parquet")))
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
    capsys.readouterr()
    assert main(["embed", "--workspace", str(pool_ws), "--spaces", "clip", *args]) == 0
    out = capsys.readouterr().out
    killer.join(timeout=60)
    assert seen.get("killed"), "no encoder actor was found to kill"
    assert seen.get("restarted"), "the encoder was not restarted"
    assert seen["finished_at_kill"] < SHARDS, "the kill came after the last shard"

    line = [x for x in out.splitlines() if x.startswith("vlselect-summary ")][-1]
    (result,) = json.loads(line.removeprefix("vlselect-summary "))["spaces"]
    ws = Workspace.open(str(pool_ws))
    space = EmbeddingSpace.open(ws, "clip")  # committed: every shard finished
    assert result["embedded"] == space.meta.vectors == 2000 and result["resumed"] == 0
    ids = space.read_table(["id"]).column("id").to_pylist()
    pool = Pool.open(ws).read_table(["id"]).column("id").to_pylist()
    assert ids == pool  # each pool id once, none twice, none missing, in pool order
    assert not list(clip.glob(f"{ATTEMPTS}/*/{PARTS_DIR}/*"))  # no retried batch's part left
    assert [p.name for p in (clip / ATTEMPTS).iterdir()] == [space.manifest.attempt]
    fault_report(
        injected=f"SIGKILL of the encoder actor mid-embed ({seen['finished_at_kill']} of "
        f"{SHARDS} shards finished)",
        outcome=f"restarted by Ray Data, batches retried: {len(ids)}/{len(pool)} ids embedded "
        "once, in pool order",
        lost=len(set(pool) - set(ids)),
        rows=len(pool),
    )
