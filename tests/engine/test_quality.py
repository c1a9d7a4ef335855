"""The quality benchmark's maths: baseline selections, Rel, seeds' summary."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.quality import mean_std, random_selection, relative_performance, score_selection

SCORES = np.array([0.5, 3.0, np.nan, 1.0, 2.0, 0.1, 4.0])  # ascending: 5, 0, 3, 4, 1, 6


def test_score_selection_keeps_the_end_it_is_asked_for():
    assert score_selection(SCORES, 2, "low").tolist() == [0, 5]
    assert score_selection(SCORES, 2, "high").tolist() == [1, 6]
    assert score_selection(SCORES, 2, "middle").tolist() == [3, 4]  # ranks 3 and 4 of 6
    assert score_selection(SCORES, 3, "middle").tolist() == [0, 3, 4]
    assert score_selection(SCORES, 7, "high").tolist() == list(range(7))  # NaN taken last


@given(
    n=st.integers(1, 60),
    data=st.data(),
    keep=st.sampled_from(["high", "low", "middle"]),
)
def test_selections_are_exact_and_distinct(n, data, keep):
    count = data.draw(st.integers(0, n))
    scores = np.asarray(data.draw(st.lists(st.floats(allow_nan=True), min_size=n, max_size=n)))
    for picked in (score_selection(scores, count, keep), random_selection(n, count, seed=3)):
        assert len(picked) == len(set(picked.tolist())) == count
        assert picked.dtype == np.int64 and (picked >= 0).all() and (picked < n).all()


def test_random_selection_is_seeded_and_refuses_too_many():
    assert random_selection(100, 10, 1).tolist() == random_selection(100, 10, 1).tolist()
    assert random_selection(100, 10, 1).tolist() != random_selection(100, 10, 2).tolist()
    with pytest.raises(ValueError, match="cannot select 11 of 10"):
        random_selection(10, 11, 0)


def test_relative_performance_is_the_mean_ratio_to_full_data():
    full = {"a": 0.8, "b": 0.5, "c": 0.0}
    method = {"a": 0.4, "b": 0.5, "c": 0.3}
    assert relative_performance(method, full, ["a", "b", "c"]) == pytest.approx(75.0)
    with pytest.raises(ValueError, match="no accuracy for"):
        relative_performance(method, full, ["a", "d"])
    with pytest.raises(ValueError, match="undefined"):
        relative_performance(method, full, ["c"])


def test_mean_std_uses_the_sample_deviation():
    assert mean_std([1.0, 3.0]) == (2.0, pytest.approx(np.sqrt(2.0)))
    assert mean_std([0.7]) == (0.7, 0.0)
