"""The retrieval service's actors: clients share shards (a killed shard: tests/faults)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import ray

from actors.retrieval import RetrievalService, ServiceConfig
from engine.errors import InputError
from engine.workspace import Workspace
from jobs.cli import main
from tests.synthetic_space import clustered, write_space

N, DIM = 2000, 32
SERVICE = ServiceConfig(batch_size=16, shard={"num_cpus": 0.1, "max_retries": -1})


@pytest.fixture(scope="module")
def indexed(ray_session, tmp_path_factory):
    return build_indexed(tmp_path_factory)


def build_indexed(tmp_path_factory):
    """A 2,000 x 32 text space indexed as 2 Flat shards; the vectors and the queries."""
    ws = tmp_path_factory.mktemp("retrieval") / "ws"
    x = clustered(N, DIM, 30, seed=11)
    write_space(ws, "text", x)
    assert main(["index", "--workspace", str(ws), "--space", "text", "--shards", "2"]) == 0
    return Workspace.open(str(ws)), x, clustered(400, DIM, 30, seed=12)


def test_concurrent_clients_and_a_client_in_a_ray_task(indexed):
    ws, _, queries = indexed
    cfg = SERVICE.model_copy(update={"max_in_flight": 2})
    with RetrievalService.start(ws, "text", cfg) as service:
        want, _ = service.search(queries, 5)
        results: list = [None] * 4

        def client(c: int):
            results[c] = service.search(queries[c::4], 5)[0]

        threads = [threading.Thread(target=client, args=(c,)) for c in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        for c in range(4):
            assert results[c].tolist() == want[c::4].tolist()

        @ray.remote(num_cpus=0.1)
        def remote_client(svc: RetrievalService, q: np.ndarray):
            return svc.search(q, 5)[0]

        assert ray.get(remote_client.remote(service, queries[:50])).tolist() == want[:50].tolist()


def test_a_named_service_is_found_by_another_client(indexed):
    ws, _, queries = indexed
    cfg = SERVICE.model_copy(update={"name": "test-named"})
    with pytest.raises(InputError, match="no running shard"):
        RetrievalService.connect(ws, "text", "test-named")
    with RetrievalService.start(ws, "text", cfg) as owner:
        other = RetrievalService.connect(ws, "text", "test-named")
        again = RetrievalService.start(ws, "text", cfg)  # reuses the running actors
        assert [h._actor_id for h in again.shards] == [h._actor_id for h in owner.shards]
        assert (
            other.search(queries[:20], 3)[0].tolist() == owner.search(queries[:20], 3)[0].tolist()
        )


def test_wrong_query_shape_and_gpu_without_one_are_refused(indexed):
    ws, _, queries = indexed
    with pytest.raises(InputError, match="shard.num_gpus"):
        RetrievalService.start(ws, "text", SERVICE.model_copy(update={"gpu": True}))
    with pytest.raises(InputError, match="no index for space 'dino'"):
        RetrievalService.start(ws, "dino", SERVICE)
    with RetrievalService.start(ws, "text", SERVICE) as service:
        with pytest.raises(ValueError, match=r"\(q, 32\)"):
            service.search(queries[:, :8], 3)
        with pytest.raises(ValueError, match="k must be"):
            service.search(queries, 0)
