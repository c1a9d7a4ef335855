"""Fixtures the fault tests share."""

from __future__ import annotations

import pytest

from tests.jobs.test_progress_job import build_tiny_ws


@pytest.fixture(scope="session")
def progress_ws(ray_session, tmp_path_factory):
    """A 300-row world with its spaces and tiny base, for runs of ``vlselect progress``
    (each test names its own run)."""
    return build_tiny_ws(tmp_path_factory)
