"""Clustering maths without Ray: feature combination, joins by id, sampling, spherical k-means."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.features import combine_spaces, shard_features
from engine.kmeans import (
    CentroidIndex,
    sample_positions,
    sample_size,
    small_clusters,
    split_positions,
    train_spherical,
)
from engine.vectors import l2_normalize, to_arrow
from tests.synthetic_space import clustered_labelled


def test_combined_cosine_is_the_weighted_mean_of_the_spaces_cosines():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((50, 32)) * 7, rng.standard_normal((50, 8)) * 0.1
    combined = combine_spaces([a, b], [3.0, 1.0])
    assert combined.dtype == np.float32 and combined.shape == (50, 40)
    np.testing.assert_allclose(np.linalg.norm(combined, axis=1), 1.0, atol=1e-6)
    cos_a, cos_b = l2_normalize(a) @ l2_normalize(a).T, l2_normalize(b) @ l2_normalize(b).T
    np.testing.assert_allclose(combined @ combined.T, (3 * cos_a + cos_b) / 4, atol=1e-5)
    # The raw norms (7 vs 0.1) do not matter, only the weights and their ratio.
    np.testing.assert_allclose(combine_spaces([a / 7, b * 10], [6, 2]), combined, atol=1e-6)


def test_combine_refuses_mismatched_inputs():
    with pytest.raises(ValueError, match="weights"):
        combine_spaces([np.ones((2, 3))], [1, 1])
    with pytest.raises(ValueError, match="positive"):
        combine_spaces([np.ones((2, 3))], [0])
    with pytest.raises(ValueError, match="row counts"):
        combine_spaces([np.ones((2, 3)), np.ones((3, 3))], [1, 1])


def _shard(tmp_path, name: str, ids: list[str], vectors: np.ndarray) -> str:
    path = str(tmp_path / f"{name}.parquet")
    pq.write_table(pa.table({"id": ids, "vector": to_arrow(vectors)}), path)
    return path


def test_shard_features_joins_by_id_and_gives_every_left_out_row_a_reason(tmp_path):
    rng = np.random.default_rng(1)
    dino = rng.standard_normal((5, 4)).astype(np.float32)
    dino[3] = np.nan
    text = rng.standard_normal((5, 2)).astype(np.float32)
    text[0] = 0.0
    files = {
        "dino": _shard(tmp_path, "dino", ["a", "b", "c", "d", "e"], dino),
        # text lacks "c", has an id dino lacks ("z"), and is in another order.
        "text": _shard(tmp_path, "text", ["e", "a", "z", "d", "b"], text),
    }
    found = shard_features(
        pafs.LocalFileSystem(), files, {"dino": 4, "text": 2}, {"dino": 1, "text": 1}
    )
    assert found.ids.to_pylist() == ["a", "b"]
    expected = combine_spaces([dino[[0, 1]], text[[1, 4]]], [1, 1])
    np.testing.assert_allclose(found.features, expected, atol=1e-6)
    reasons = dict(zip(*found.rejected.to_pydict().values(), strict=True))
    assert reasons == {
        "e": "NaN, inf or zero vector in text",
        "c": "missing in text",
        "d": "NaN, inf or zero vector in dino",
        "z": "missing in dino",
    }
    assert found.rows_in == 6 == len(found.ids) + found.rejected.num_rows


def test_shard_features_refuses_a_wrong_dimension(tmp_path):
    files = {"dino": _shard(tmp_path, "d", ["a"], np.ones((1, 3), np.float32))}
    with pytest.raises(ValueError, match="length 3, expected 4"):
        shard_features(pafs.LocalFileSystem(), files, {"dino": 4}, {"dino": 1})


@settings(max_examples=50, deadline=None)
@given(
    rows=st.lists(st.integers(0, 50), min_size=1, max_size=8),
    fraction=st.floats(0, 1),
    seed=st.integers(0, 2**31),
)
def test_sample_positions_split_into_shards_cover_the_sample_exactly(rows, fraction, seed):
    total = sum(rows)
    n = int(total * fraction)
    positions = sample_positions(total, n, seed)
    assert len(positions) == n == len(set(positions.tolist()))
    assert (np.diff(positions) > 0).all() and (positions < max(total, 1)).all()
    np.testing.assert_array_equal(positions, sample_positions(total, n, seed))
    local = split_positions(positions, rows)
    offsets = np.concatenate([[0], np.cumsum(rows)])
    rebuilt = np.concatenate([p + offsets[i] for i, p in enumerate(local)] + [np.zeros(0, int)])
    np.testing.assert_array_equal(rebuilt, positions)
    assert all(((p >= 0) & (p < r)).all() for p, r in zip(local, rows, strict=True))


def test_sample_size_follows_faiss_rule_and_cap():
    assert sample_size(1_000_000, 1000, 256) == 256_000
    assert sample_size(1000, 10, 256) == 1000
    assert sample_size(1_000_000, 1000, 256, cap=50_000) == 50_000


def test_spherical_kmeans_finds_planted_clusters_and_assignment_matches_brute_force():
    x, planted = clustered_labelled(3000, 24, 6, seed=4)
    fit = train_spherical(
        x, 6, niter=30, seed=0, nredo=2, init="kmeans++", max_points_per_centroid=1000
    )
    assert fit.centroids.shape == (6, 24) and fit.centroids.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(fit.centroids, axis=1), 1.0, atol=1e-5)
    assert fit.objective[-1] >= fit.objective[0] and len(fit.runs) == 2
    assert fit.objective == max(fit.runs, key=lambda run: run[-1])
    cluster, similarity = CentroidIndex(fit.centroids).assign(x)
    scores = x @ fit.centroids.T
    np.testing.assert_array_equal(cluster, scores.argmax(axis=1))
    np.testing.assert_allclose(similarity, scores.max(axis=1), atol=1e-5)
    # Every planted cluster maps onto one found cluster.
    for c in range(6):
        assert np.bincount(cluster[planted == c]).max() / (planted == c).sum() > 0.99
    assert abs(fit.objective[-1] - similarity.sum()) / similarity.sum() < 1e-3


def test_kmeans_refuses_more_clusters_than_rows_and_sizes_flag_small_ones():
    with pytest.raises(ValueError, match="at least k=10 rows"):
        train_spherical(np.ones((5, 3), np.float32), 10)
    np.testing.assert_array_equal(small_clusters(np.array([0, 5, 2, 9]), 3), [0, 2])
    cluster, similarity = CentroidIndex(np.eye(3, dtype=np.float32)).assign(np.zeros((0, 3)))
    assert cluster.shape == similarity.shape == (0,)
