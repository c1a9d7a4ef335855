"""The retrieval service under load: client processes stream queries for a bounded time.

Three separate client processes join the session's Ray as drivers of their own and send
requests back to back for 12 s at a 2-shard Flat service; the run must see no failed
request, only answers bit-equal to one exact faiss index, every client served, ordered
latency percentiles, and no process growing past the bound after warm-up. The code path
is the benchmark's (``benchmarks/retrieval_load.py``).
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import ray

from benchmarks.retrieval_load import (
    GROWTH_BOUND_MIB,
    Load,
    failures,
    prepare,
    run_load,
    same_answer,
)

# Small enough that the whole run (index, service, 3 clients x 12 s) takes well under a
# minute on 2 shared cores; 0.1 CPU per shard fits beside whatever else the session holds.
LOAD = Load(
    rows=20_000,
    dim=64,
    shards=2,
    clients=3,
    seconds=12.0,
    batch=16,
    check_every=1,
    centres=200,
    shard_cpus=0.1,
)


@pytest.fixture(scope="module")
def workdir(ray_session, tmp_path_factory):
    work = tmp_path_factory.mktemp("load")
    return work, prepare(work, LOAD)


@pytest.fixture(scope="module")
def result(workdir):
    work, ws = workdir
    return run_load(work, ws, LOAD, ray.get_runtime_context().gcs_address)


def test_no_request_fails_and_every_checked_answer_is_exact(result):
    s = result["summary"]
    assert s["errors"] == 0, [c.get("error_messages") for c in result["clients"]]
    assert s["mismatched"] == 0
    # check_every=1: every answer was compared with exact faiss.
    assert s["checked"] == s["requests"] > 0
    assert s["restarted_shards"] == []
    assert s["queries"] == s["requests"] * LOAD.batch


def test_every_client_streamed_for_the_whole_time(result):
    assert len(result["clients"]) == LOAD.clients
    for c in result["clients"]:
        assert "failed" not in c, c.get("failed")
        assert c["requests"] >= 10, c
        assert LOAD.seconds <= c["seconds"] < LOAD.seconds + 5, c


def test_latency_percentiles_are_present_and_ordered(result):
    s = result["summary"]
    assert 0 < s["p50_ms"] <= s["p90_ms"] <= s["p99_ms"] <= s["max_ms"]
    assert s["queries_per_s"] > 0


def test_memory_stays_flat_after_warm_up(result, fault_report):
    names = {m["process"] for m in result["memory"]}
    clients = {f"client {c}" for c in range(LOAD.clients)}
    assert {"shard 0", "shard 1", "raylet"} | clients <= names
    for m in result["memory"]:
        assert m["samples"] >= 0.5 * LOAD.seconds / 0.5, m  # sampled through the whole run
        assert m["growth_mib"] <= GROWTH_BOUND_MIB, m
    assert failures(result) == []
    s = result["summary"]
    fault_report(
        injected=f"load: {LOAD.clients} client processes x {LOAD.seconds:g} s of back-to-back "
        f"requests at {LOAD.shards} shards",
        outcome=f"{s['requests']} requests, {s['errors']} errors, {s['mismatched']} wrong "
        f"answers; p50/p99 {s['p50_ms']:.0f}/{s['p99_ms']:.0f} ms; largest growth after "
        f"warm-up {max(m['growth_mib'] for m in result['memory']):.1f} MiB",
        lost=s["errors"],
    )


def test_failures_names_each_broken_guarantee(result):
    broken = copy.deepcopy(result)
    broken["summary"] |= {"errors": 2, "mismatched": 1, "p90_ms": broken["summary"]["max_ms"] + 1}
    broken["clients"][1]["requests"] = 0
    broken["memory"][0]["growth_mib"] = GROWTH_BOUND_MIB + 0.1
    found = "\n".join(failures(broken))
    for what in ("2 failed requests", "1 of", "client 1 answered no", "out of order", "grew"):
        assert what in found


def test_the_answer_check_tells_a_wrong_answer_from_a_reordered_tie():
    ids = np.array([["a", "b", "c"]], dtype=object)
    scores = np.array([[0.9, 0.5, 0.5]], dtype=np.float32)
    assert same_answer(ids, scores, ids.copy(), scores.copy())
    assert same_answer(ids[:, [0, 2, 1]], scores, ids, scores)  # tied ids swap places
    assert not same_answer(ids[:, [1, 0, 2]], scores, ids, scores)
    assert not same_answer(np.array([["a", "b", "d"]], dtype=object), scores, ids, scores)
    assert not same_answer(ids, np.nextafter(scores, 1), ids, scores)


def test_a_client_whose_reference_differs_from_the_index_counts_mismatches(workdir):
    # The clients' exact reference takes its label i as pool row i; rolling its vectors by
    # one row makes every answer's rows differ by one (the scores stay equal), so a check
    # that compared nothing, or only scores, would pass here and fail this.
    work, ws = workdir
    wrong = work / "wrong"
    wrong.mkdir()
    np.save(wrong / "vectors.npy", np.roll(np.load(work / "vectors.npy"), 1, axis=0))
    load = dataclasses.replace(LOAD, clients=1, seconds=2.0)
    got = run_load(wrong, ws, load, ray.get_runtime_context().gcs_address)["summary"]
    assert got["errors"] == 0 and got["checked"] > 0
    assert got["mismatched"] == got["checked"]
