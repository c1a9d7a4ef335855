"""Shared fixtures: one local Ray per test session, and a tiny generated world."""

from __future__ import annotations

import os

import pytest
from hypothesis import settings

os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
# Deprecations raised from our code are errors: pyproject.toml's filterwarnings in this
# process, engine/warning_filters.py in Ray's workers (which inherit this environment).
os.environ["VLSELECT_STRICT_WARNINGS"] = "1"

# Property tests check behaviour, not time: on a shared 2-core CI machine one example
# can pass hypothesis's 200 ms deadline only because of the load beside it.
settings.register_profile("vlselect", deadline=None)
settings.load_profile("vlselect")


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray started once for the whole session (jobs see it and do not start another)."""
    import ray

    from jobs.runtime import worker_runtime_env

    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        runtime_env=worker_runtime_env(),
    )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def small_world(ray_session, tmp_path_factory):
    """A 2000-sample world with its LLaVA JSON export, generated once (read-only for tests)."""
    from jobs.cli import main

    ws = tmp_path_factory.mktemp("world") / "ws"
    assert main(["world", "--out", str(ws), "--size", "2000", "--llava-json"]) == 0
    return ws
