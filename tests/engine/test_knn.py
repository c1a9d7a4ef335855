"""engine/knn.py and engine/faiss_index.py without Ray: the exact merge against numpy brute
force, shard ranges, factories."""

from __future__ import annotations

import faiss
import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.artifacts import Index
from engine.errors import InputError
from engine.faiss_index import (
    build_index,
    check_trainable,
    load_index,
    make_index,
    min_train_rows,
    open_index,
    set_search_params,
    to_gpu,
    train_index,
    train_rows,
)
from engine.knn import (
    file_slices,
    id_table,
    labels_to_ids,
    labels_to_rows,
    merge_topk,
    pool_positions,
    row_table,
    shard_ranges,
)
from engine.workspace import Workspace
from tests.synthetic_space import brute_force, clustered

FLT_MAX = np.finfo(np.float32).max


def shard_topk(scores: np.ndarray, lo: int, hi: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """What a faiss shard over rows [lo, hi) returns: top-k, -1 / -FLT_MAX padding."""
    part = scores[:, lo:hi]
    order = np.argsort(-part, axis=1, kind="stable")[:, :k]
    s = np.take_along_axis(part, order, 1)
    labels = order + lo
    pad = k - s.shape[1]
    if pad > 0:
        s = np.concatenate([s, np.full((len(s), pad), -FLT_MAX, np.float32)], 1)
        labels = np.concatenate([labels, np.full((len(s), pad), -1)], 1)
    return s, labels


@settings(max_examples=150, deadline=None)
@given(
    rows=st.integers(1, 60),
    queries=st.integers(1, 5),
    shards=st.integers(1, 9),
    k=st.integers(1, 20),
    levels=st.sampled_from([3, 1000]),
    seed=st.integers(0, 2**16),
)
def test_merge_equals_brute_force_with_ties_and_small_shards(
    rows, queries, shards, k, levels, seed
):
    rng = np.random.default_rng(seed)
    # Few score levels make many ties; they must go to the lower shard, then lower rank.
    scores = (rng.integers(0, levels, (queries, rows)) / levels).astype(np.float32)
    shards = min(shards, rows)
    parts = [shard_topk(scores, lo, hi, k) for lo, hi in shard_ranges(rows, shards)]
    merged_scores, merged_labels = merge_topk([p[0] for p in parts], [p[1] for p in parts], k)

    expected = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    found = min(k, rows)
    np.testing.assert_array_equal(merged_labels[:, :found], expected)
    np.testing.assert_array_equal(merged_scores[:, :found], np.take_along_axis(scores, expected, 1))
    assert merged_scores.dtype == np.float32 and merged_scores.shape == (queries, k)
    assert (merged_labels[:, found:] == -1).all()
    assert np.isneginf(merged_scores[:, found:]).all()


def test_merge_of_string_ids_puts_missing_last_as_none():
    scores = [np.array([[0.9, -FLT_MAX]], np.float32), np.array([[0.95, 0.5]], np.float32)]
    ids = [np.array([["a", None]], object), np.array([["b", "c"]], object)]
    s, i = merge_topk(scores, ids, 5)
    assert i.tolist() == [["b", "a", "c", None, None]]
    assert s[0, :3].tolist() == pytest.approx([0.95, 0.9, 0.5])
    assert np.isneginf(s[0, 3:]).all()


def test_merge_ties_go_to_the_lower_shard_then_rank():
    scores = [np.array([[0.5, 0.5]], np.float32), np.array([[0.7, 0.5]], np.float32)]
    ids = [np.array([["s0r0", "s0r1"]], object), np.array([["s1r0", "s1r1"]], object)]
    assert merge_topk(scores, ids, 4)[1].tolist() == [["s1r0", "s0r0", "s0r1", "s1r1"]]


def test_faiss_flat_shards_merge_to_the_exact_answer():
    x = clustered(1000, 24, 20, seed=1)
    q = clustered(40, 24, 20, seed=2)
    ids = np.array([f"id{i}" for i in range(len(x))], dtype=object)
    whole = faiss.IndexFlatIP(24)
    whole.add(x)
    want_scores, want_labels = whole.search(q, 10)
    for shards in (1, 2, 3, 8):
        parts, row_parts = [], []
        for lo, hi in shard_ranges(len(x), shards):
            index = build_index(x[lo:hi], "Flat")
            s, labels = index.search(q, 10)
            parts.append((s, labels_to_ids(labels, id_table(ids[lo:hi]))))
            pool_rows = row_table(np.arange(lo, hi))  # a shard's rows are pool rows lo..hi
            row_parts.append((s, labels_to_rows(labels, pool_rows)))
        scores, got = merge_topk([p[0] for p in parts], [p[1] for p in parts], 10)
        row_scores, got_rows = merge_topk([p[0] for p in row_parts], [p[1] for p in row_parts], 10)
        rows, exact = brute_force(x, q, 10)
        assert got.tolist() == ids[rows].tolist()
        np.testing.assert_allclose(scores, exact, rtol=0, atol=2e-7)
        np.testing.assert_array_equal(scores, want_scores)  # bit-equal to one index
        assert got.tolist() == ids[want_labels].tolist()
        # Rows on the wire merge to the same answer as string ids, and name the same rows.
        np.testing.assert_array_equal(row_scores, scores)
        assert got_rows.dtype == np.int64 and ids[got_rows].tolist() == got.tolist()


def test_labels_map_to_ids_and_pool_rows_and_minus_one():
    table = id_table(["a", "b", "c"])
    out = labels_to_ids(np.array([[2, 0, -1]]), table)
    assert out.tolist() == [["c", "a", None]] and out.dtype == object
    with pytest.raises(ValueError, match="out of range"):
        labels_to_ids(np.array([[3]]), table)
    rows = row_table(np.array([70, 10, 40]))
    got = labels_to_rows(np.array([[2, 0, -1]]), rows)
    assert got.tolist() == [[40, 70, -1]] and got.dtype == np.int64
    with pytest.raises(ValueError, match="out of range"):
        labels_to_rows(np.array([[3]]), rows)


def test_pool_positions_find_ids_and_name_the_strangers():
    pool = pa.array(["p0", "p1", "p2", "p3"])
    assert pool_positions(pa.array(["p2", "p0"]), pool, 100).tolist() == [102, 100]
    with pytest.raises(ValueError, match=r"1 ids are not in the pool \(e.g. \['zz'\]\)"):
        pool_positions(pa.array(["p1", "zz"]), pool)


def test_shards_of_one_trained_template_answer_as_one_ivf_index():
    """Every shard adds to a copy of one trained IVF: a query probes the same lists in
    each, so the merged answer is the single index's answer at the same nprobe."""
    x = clustered(4000, 16, 40, seed=5)
    q = clustered(60, 16, 40, seed=6)
    template = train_index(x, "IVF32,Flat")
    assert template.is_trained and template.ntotal == 0
    whole = build_index(x, "IVF32,Flat", template=template)
    set_search_params(whole, nprobe=4)
    want_scores, want = whole.search(q, 10)
    parts = []
    for lo, hi in shard_ranges(len(x), 4):
        shard = build_index(x[lo:hi], "IVF32,Flat", template=template)
        set_search_params(shard, nprobe=4)
        s, labels = shard.search(q, 10)
        parts.append((s, labels_to_rows(labels, row_table(np.arange(lo, hi)))))
    scores, got = merge_topk([p[0] for p in parts], [p[1] for p in parts], 10)
    np.testing.assert_array_equal(scores, want_scores)
    assert got.tolist() == want.tolist()
    assert train_rows(make_index("IVF32,Flat", 16), 10**6) == 65_536
    assert train_rows(make_index("IVF1024,PQ8", 16), 10**6) == 262_144
    assert train_rows(make_index("IVF32,Flat", 16), 500) == 500


def test_a_memory_mapped_shard_answers_like_a_loaded_one(tmp_path):
    x = clustered(2000, 16, 10, seed=7)
    ws = Workspace.open(str(tmp_path / "ws"))
    for factory in ("Flat", "IVF16,Flat"):
        index = build_index(x, factory)
        ws.write_bytes(ws.path("shard.faiss"), memoryview(faiss.serialize_index(index)))
        loaded = load_index(ws, ws.path("shard.faiss"))
        mapped = load_index(ws, ws.path("shard.faiss"), mmap=True)
        for got in (loaded, mapped):
            set_search_params(got, nprobe=16)
            np.testing.assert_array_equal(got.search(x[:20], 5)[1], loaded.search(x[:20], 5)[1])


@given(rows=st.integers(0, 10_000), shards=st.integers(1, 64))
def test_shard_ranges_are_contiguous_and_balanced(rows, shards):
    ranges = shard_ranges(rows, shards)
    assert len(ranges) == shards and ranges[0][0] == 0 and ranges[-1][1] == rows
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
    sizes = [hi - lo for lo, hi in ranges]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


@given(
    files=st.lists(st.integers(0, 50), min_size=1, max_size=8),
    shards=st.integers(1, 10),
)
def test_file_slices_cover_exactly_the_range(files, shards):
    total = sum(files)
    everything = np.arange(total)
    chunks = np.split(everything, np.cumsum(files)[:-1])
    for lo, hi in shard_ranges(total, shards):
        got = [chunks[f][a:b] for f, a, b in file_slices(files, lo, hi)]
        joined = np.concatenate(got) if got else np.zeros(0, int)
        np.testing.assert_array_equal(joined, everything[lo:hi])
        assert all(b > a for _, a, b in file_slices(files, lo, hi))
    with pytest.raises(ValueError):
        file_slices(files, 0, total + 1)


@pytest.mark.parametrize(
    ("factory", "words"),
    [
        ("bogus", ["'bogus'", "does not parse", "IVF1024,Flat"]),
        ("", ["empty"]),
        ("IDMap,Flat", ["IDMap", "leave"]),
        ("IVF0,Flat", ["at least 1 list"]),
    ],
)
def test_bad_factory_strings_are_input_errors(factory, words):
    with pytest.raises(InputError) as err:
        make_index(factory, 16)
    for word in words:
        assert word in str(err.value)


def test_inner_product_metric_and_training_needs():
    assert make_index("Flat", 8).metric_type == faiss.METRIC_INNER_PRODUCT
    assert min_train_rows(make_index("Flat", 8)) == 0
    assert min_train_rows(make_index("HNSW32", 8)) == 0
    assert min_train_rows(make_index("IVF64,Flat", 8)) == 64
    assert min_train_rows(make_index("PQ4", 8)) == 256
    assert min_train_rows(make_index("IVF16,PQ4", 8)) == 256


def test_a_space_too_small_to_train_names_factory_rows_and_fix():
    with pytest.raises(InputError) as err:
        check_trainable("IVF4096,Flat", 32, rows=3000)
    message = str(err.value)
    for word in ("IVF4096,Flat", "4096", "3000", "fewer IVF lists (e.g. 'IVF64,...')"):
        assert word in message
    x = clustered(100, 8, 4)
    with pytest.raises(InputError, match="needs at least 256 training rows"):
        build_index(x, "PQ4")
    check_trainable("IVF16,Flat", 32, rows=16)  # exactly enough: the shards share it


def test_ivf_and_hnsw_build_and_find_neighbours():
    x = clustered(3000, 32, 50, seed=3)
    q = clustered(100, 32, 50, seed=4)
    rows, _ = brute_force(x, q, 10)
    for factory, params in (("IVF32,Flat", {"nprobe": 8}), ("HNSW16", {"ef_search": 64})):
        index = build_index(x, factory)
        assert index.ntotal == 3000 and index.is_trained
        applied = set_search_params(index, **params)
        assert applied == {
            {"nprobe": "nprobe", "ef_search": "efSearch"}[k]: v for k, v in params.items()
        }
        _, labels = index.search(q, 10)
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(labels, rows, strict=True)])
        assert recall > 0.9, (factory, recall)
    assert set_search_params(build_index(x, "Flat"), nprobe=4, ef_search=4) == {}


def test_gpu_asked_without_one_is_a_clear_error():
    index = make_index("Flat", 8)
    assert to_gpu(index, False) == (index, None)
    if faiss.get_num_gpus() == 0:
        with pytest.raises(InputError, match="faiss sees no GPU"):
            to_gpu(index, True)


def test_open_index_names_the_fix(tmp_path):
    ws = Workspace.open(str(tmp_path / "ws"))
    with pytest.raises(InputError, match="unknown space 'colour'"):
        open_index(ws, "colour")
    with pytest.raises(InputError, match="run `vlselect index"):
        open_index(ws, "text")
    Index.begin(ws, "text")  # an attempt started and never committed
    with pytest.raises(InputError, match="did not finish"):
        open_index(ws, "text")
