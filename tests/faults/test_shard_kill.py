"""A FAISS shard actor SIGKILLed during a stream of queries: Ray restarts it (the shard
reloads its index from the workspace) and retries the calls in flight, so every request
is answered, with the same ids and scores as before the kill."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from actors.retrieval import RetrievalService
from tests.actors.test_retrieval import SERVICE, build_indexed
from tests.faults.chaos import sigkill


@pytest.fixture(scope="module")
def indexed(ray_session, tmp_path_factory):
    return build_indexed(tmp_path_factory)


def test_killing_a_shard_mid_stream_loses_no_query_and_changes_no_answer(indexed, fault_report):
    ws, _, queries = indexed
    with RetrievalService.start(ws, "text", SERVICE) as service:
        want_ids, want_scores = service.search(queries, 10)
        before = service.shard_info()[0]
        answers: dict[int, tuple] = {}
        errors: list[BaseException] = []

        def stream():
            try:
                for i in range(0, len(queries), 8):  # many small requests, one at a time
                    answers[i] = service.search(queries[i : i + 8], 10)
            except BaseException as err:  # noqa: BLE001 - reported by the main thread
                errors.append(err)

        client = threading.Thread(target=stream)
        client.start()
        while len(answers) < 5 and client.is_alive():
            time.sleep(0.01)
        sigkill([before["pid"]])  # a crash: the process dies, Ray restarts the actor
        killed_at = len(answers)
        client.join(timeout=120)
        assert not client.is_alive() and not errors, errors
        after = service.shard_info()[0]

    assert killed_at < len(queries) // 8, "the kill must land during the stream"
    assert after["restarted"] and after["pid"] != before["pid"]
    assert sorted(answers) == list(range(0, len(queries), 8))
    for i, (ids, scores) in answers.items():
        assert ids.tolist() == want_ids[i : i + 8].tolist()
        np.testing.assert_array_equal(scores, want_scores[i : i + 8])
    fault_report(
        injected=f"SIGKILL of a FAISS shard actor after {killed_at} of {len(answers)} requests",
        outcome=f"restarted and reloaded, calls retried: {len(answers)}/{len(answers)} requests "
        "answered, ids and scores bit-equal to before",
        lost=0,
        queries=len(queries),
    )
