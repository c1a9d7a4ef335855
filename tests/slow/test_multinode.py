"""Cluster shape on one machine (``ray.cluster_utils.Cluster``, as Ray tests itself): index
shard actors spread over the nodes that offer an "index node" resource, and a node removed
mid-stream (a preempted spot instance) costs a restart on another node, not an answer."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from actors.retrieval import RetrievalService, ServiceConfig
from engine.resources import Resources
from engine.workspace import Workspace
from tests.synthetic_space import brute_force, clustered, write_space

pytestmark = pytest.mark.slow
N, DIM = 3000, 32


@pytest.fixture
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    workers = [c.add_node(num_cpus=1, resources={"index_node": 1}) for _ in range(3)]
    ray.init(address=c.address)
    c.wait_for_nodes()
    yield c, workers
    ray.shutdown()
    c.shutdown()


def test_shards_spread_over_nodes_and_survive_a_lost_node(cluster, tmp_path):
    import ray

    from jobs.cli import main

    c, workers = cluster
    x = clustered(N, DIM, 30, seed=1)
    write_space(tmp_path / "ws", "text", x)
    assert (
        main(["index", "--workspace", str(tmp_path / "ws"), "--space", "text", "--shards", "2"])
        == 0
    )
    ws = Workspace.open(str(tmp_path / "ws"))
    cfg = ServiceConfig(
        batch_size=64,
        shard=Resources(num_cpus=0.5, custom={"index_node": 1}, max_retries=-1),
    )
    queries = clustered(600, DIM, 30, seed=2)
    expected_rows, _ = brute_force(x, queries, 5)
    with RetrievalService.start(ws, "text", cfg) as service:
        nodes = [info["node"] for info in service.shard_info()]
        assert len(set(nodes)) == 2  # one index node each: the custom resource spreads them
        doomed = next(w for w in workers if w.node_id == nodes[0])

        def remove_node():
            time.sleep(1.0)
            c.remove_node(doomed)

        thread = threading.Thread(target=remove_node)
        thread.start()
        answers = []
        for start in range(0, 600, 20):  # a stream of requests across the node's removal
            ids, _ = service.search(queries[start : start + 20], 5)
            answers.append(ids)
            time.sleep(0.1)
        thread.join()
        ids = np.concatenate(answers)
        after = [info["node"] for info in service.shard_info()]
        assert doomed.node_id not in after and len(set(after)) == 2
        assert any(info["restarted"] for info in service.shard_info())
    ids_expected = np.array([f"text-{i:06d}" for i in range(N)], dtype=object)[expected_rows]
    assert (ids == ids_expected).mean() > 0.999  # near-ties aside, every answer unchanged
    assert ray.is_initialized()


def test_a_local_workspace_is_checked_from_every_node(cluster, tmp_path):
    """Four nodes on one machine share its disk: the check passes and leaves nothing behind
    (a node of another machine that does not mount the path is refused, naming the fix)."""
    from jobs.runtime import check_workspace_shared

    ws = Workspace.open(str(tmp_path / "ws"))
    check_workspace_shared(ws)
    assert list((tmp_path / "ws").iterdir()) == []
