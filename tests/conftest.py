"""Shared fixtures: one local Ray per test session, a tiny generated world, and a loopback S3
server (moto)."""

from __future__ import annotations

import os

import pytest
from hypothesis import settings

os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
# Deprecations raised from our code are errors: pyproject.toml's filterwarnings in this
# process, engine/warning_filters.py in Ray's workers (which inherit this environment).
os.environ["VLSELECT_STRICT_WARNINGS"] = "1"
# Credentials for the loopback S3 server (the s3_server fixture; moto accepts any). pyarrow reads
# them from the environment, and so do Ray's workers, which inherit the environment of the
# process that starts the local Ray (ray_session, in this process): so they are set here, at
# import, before any Ray starts. No EC2 metadata look-up (seconds of timeouts off EC2).
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")

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


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """One moto S3 server on 127.0.0.1 for the session, bucket ``vlbucket`` (tests/s3_server.py).

    Tests share it: each writes under a prefix of its own (``s3_server.uri("my-test")``), and
    one that stops it starts it again before it ends.
    """
    from tests.s3_server import S3Server

    server = S3Server(log_dir=tmp_path_factory.mktemp("s3-server"))
    yield server
    server.stop()


_S3_LOG_START = pytest.StashKey[int]()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test that used ``s3_server`` shows the server's output of that test."""
    outcome = yield
    server = getattr(item, "funcargs", {}).get("s3_server")
    if server is None:
        return
    if call.when == "setup":
        item.stash[_S3_LOG_START] = server.log_size()
    report = outcome.get_result()
    if report.failed:
        since = item.stash.get(_S3_LOG_START, 0)
        report.sections.append((f"moto server log ({server.log_path})", server.log_text(since)))
