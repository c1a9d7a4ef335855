"""The COINCIDE-style warm-up selector against brute force (no Ray)."""

from __future__ import annotations

import numpy as np
import pytest

from engine.vectors import l2_normalize
from engine.warmup import (
    cluster_order,
    cluster_quotas,
    cluster_rng,
    gaussian_kernel,
    mmd_prototypes,
    select_warmup,
    transferability,
)
from tests.synthetic_space import clustered_labelled


def test_transferability_ignores_near_duplicates_and_itself():
    rng = np.random.default_rng(0)
    c = l2_normalize(rng.standard_normal((6, 5)))
    c[1] = l2_normalize(c[0] + 0.01 * rng.standard_normal(5)[None])[0]  # a near-copy of 0
    got = transferability(c)
    sim = c.astype(np.float64) @ c.T.astype(np.float64)
    for k in range(6):
        others = [sim[k, j] for j in range(6) if sim[k, j] <= 0.9]
        assert got[k] == pytest.approx(np.mean(others))
    assert sim[0, 1] > 0.9  # so 0 and 1 ignore each other


def brute_force_mmd_order(kernel: np.ndarray, m: int) -> list[int]:
    """The reference's greedy step: the MMD of every candidate set, recomputed."""
    n, chosen = kernel.shape[0], []
    for _ in range(m):
        best, best_mmd = None, np.inf
        for c in range(n):
            if c in chosen:
                continue
            s = [*chosen, c]
            mmd = kernel.mean() - 2 * kernel[:, s].mean() + kernel[np.ix_(s, s)].mean()
            if mmd < best_mmd - 1e-12:
                best, best_mmd = c, mmd
        chosen.append(best)
    return chosen


def test_greedy_mmd_matches_the_reference_recomputation():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((40, 3))
    kernel = gaussian_kernel(x, x, sigma=1.0)
    assert mmd_prototypes(kernel, 12).tolist() == brute_force_mmd_order(kernel, 12)
    assert sorted(mmd_prototypes(kernel, 99).tolist()) == list(range(40))


def test_gaussian_kernel_matches_its_definition():
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((4, 3)), rng.standard_normal((5, 3))
    expected = np.exp(-((x[:, None] - y[None]) ** 2).sum(-1) / (2 * 0.7**2))
    np.testing.assert_allclose(gaussian_kernel(x, y, 0.7), expected, rtol=1e-10)


def test_quotas_fill_the_largest_share_first_and_pass_shortfalls_on():
    # Temperature 0.1: cluster 2 (score 3.0) dominates but holds only 4 rows.
    quotas = cluster_quotas(np.array([1.0, 2.0, 3.0]), np.array([50, 50, 4]), 30, 0.1)
    assert quotas.tolist()[2] == 4 and quotas.sum() == 30
    assert quotas[1] > quotas[0]
    # Hand-worked, equal scores: 10 over three clusters -> round(10/3)=3, round(7/2)=4, 3.
    assert cluster_quotas(np.zeros(3), np.array([9, 9, 9]), 10, 1.0).tolist() == [3, 4, 3]
    # More asked than the pool holds: everything.
    assert cluster_quotas(np.ones(2), np.array([2, 3]), 99, 0.1).tolist() == [2, 3]
    assert cluster_quotas(np.ones(2), np.array([0, 3]), 2, 0.1).tolist() == [0, 2]


def test_large_clusters_use_a_kernel_subsample_then_a_uniform_order():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((300, 4)).astype(np.float32)
    density, order = cluster_order(x, 120, 1.0, max_kernel_rows=100, rng=rng)
    assert order.size == 120 and np.unique(order).size == 120 and order.max() < 300
    assert 0 < density < 1
    # The first 100 are the kernel subsample's prototypes, the rest come from outside it.
    assert np.intersect1d(order[:100], order[100:]).size == 0
    density_small, small = cluster_order(x[:50], 10, 1.0, max_kernel_rows=100, rng=rng)
    kernel = gaussian_kernel(x[:50], x[:50], 1.0)
    assert small.tolist() == brute_force_mmd_order(kernel, 10)
    assert density_small == pytest.approx(kernel.mean())


def test_warmup_selects_exactly_the_budget_without_duplicates():
    x, labels = clustered_labelled(600, 16, 12, seed=5)
    centroids = np.stack(
        [l2_normalize(x[labels == c].mean(0, keepdims=True))[0] for c in range(12)]
    )
    picks = select_warmup(x, labels, centroids, total=54, seed=0)
    assert picks.size == 54 and np.unique(picks).size == 54
    assert (picks >= 0).all() and (picks < 600).all()
    assert (select_warmup(x, labels, centroids, total=54, seed=0) == picks).all()  # seeded
    assert select_warmup(x, labels, centroids, total=10_000).size == 600


def test_the_in_memory_warmup_takes_what_the_job_s_per_cluster_tasks_take():
    """select_warmup (tested here) and actors.warmup.order_cluster (what the job runs, one
    task per cluster) draw each cluster from the same seeded stream: the same order."""
    from actors.warmup import order_cluster

    x, labels = clustered_labelled(600, 16, 6, seed=7)
    ids = np.array([f"r{i:04d}" for i in range(600)], dtype=object)  # id order = row order
    for c in range(6):
        members = np.flatnonzero(labels == c)
        # a cluster above max_kernel_rows is subsampled: the seeded draw decides the order
        job = order_cluster({"cluster": np.full(members.size, c), "id": ids[members],
                             "feature": x[members]}, limit=80, sigma=1.0, max_kernel_rows=40,
                            seed=3)  # fmt: skip
        _, order = cluster_order(x[members], 80, 1.0, 40, cluster_rng(3, c))
        assert job["order"][0].as_py() == [str(i) for i in ids[members][order]]
