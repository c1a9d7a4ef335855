"""The workspace on a real S3-compatible server (moto on loopback, tests/s3_server.py)."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from engine.workspace import Workspace


def test_the_uri_names_bucket_prefix_endpoint_scheme_and_region(s3_server):
    uri = s3_server.uri("t0/")
    assert uri == (
        f"s3://vlbucket/t0?endpoint_override=127.0.0.1:{s3_server.port}&scheme=http"
        "&region=us-east-1"
    )
    ws = Workspace.open(uri)
    assert isinstance(ws.fs, pafs.S3FileSystem) and ws.root == "vlbucket/t0"
    assert ws.uri == uri  # the form handed to Ray workers


def test_json_round_trips(s3_server):
    ws = Workspace.open(s3_server.uri("t1"))
    ws.write_json(ws.path("stage", "meta.json"), {"status": "complete", "rows": 3})
    assert ws.read_json(ws.path("stage", "meta.json")) == {"status": "complete", "rows": 3}
    assert ws.exists("stage", "meta.json") and ws.is_dir("stage")


def test_a_table_written_reads_back_with_pyarrow(s3_server):
    ws = Workspace.open(s3_server.uri("t2"))
    table = pa.table({"id": ["a", "b", "c"], "x": [1.5, 2.5, 3.5]})
    ws.write_table(ws.path("part", "000.parquet"), table)
    assert pq.read_table(ws.path("part", "000.parquet"), filesystem=ws.fs).equals(table)
    assert ws.parquet_rows(ws.path("part")) == 3
    # the same object through a filesystem of its own, not the workspace's
    assert pq.read_table("vlbucket/t2/part/000.parquet", filesystem=s3_server.fs()).equals(table)


def test_list_files_sees_finished_files_only(s3_server):
    ws = Workspace.open(s3_server.uri("t3"))
    for name in ("b.parquet", "a.parquet", "meta.json"):
        ws.write_bytes(ws.path("d", name), b"x")
    ws.makedirs("d", "sub")
    assert ws.list_files("d") == [
        "vlbucket/t3/d/a.parquet",
        "vlbucket/t3/d/b.parquet",
        "vlbucket/t3/d/meta.json",
    ]  # the directory "sub" is no file
    assert ws.list_files("d", suffix=".parquet") == [
        "vlbucket/t3/d/a.parquet",
        "vlbucket/t3/d/b.parquet",
    ]
    assert ws.list_files("nothing-here") == []


def _read_in_worker(uri: str, name: str) -> tuple[dict, dict]:
    from engine.workspace import Workspace

    ws = Workspace.open(uri)
    env = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_EC2_METADATA_DISABLED")}
    return ws.read_json(ws.path(name)), env


def test_a_ray_worker_reads_what_the_driver_wrote_through_the_same_uri(ray_session, s3_server):
    ray = ray_session
    ws = Workspace.open(s3_server.uri("t5"))
    ws.write_json(ws.path("hello.json"), {"from": "driver"})
    read = ray.remote(num_cpus=0.1)(_read_in_worker)
    data, env = ray.get(read.remote(ws.uri, "hello.json"), timeout=120)
    assert data == {"from": "driver"}
    # moto accepts any credentials: these show the worker got the ones conftest set
    assert env == {
        "AWS_ACCESS_KEY_ID": os.environ["AWS_ACCESS_KEY_ID"],
        "AWS_EC2_METADATA_DISABLED": "true",
    }


def test_a_stopped_server_refuses_and_comes_back_on_its_port_with_its_objects(s3_server):
    ws = Workspace.open(s3_server.uri("t6"))
    ws.write_json(ws.path("kept.json"), {"k": 1})
    ws.makedirs("empty-dir")
    port = s3_server.port
    s3_server.stop(keep_objects=True)
    try:
        once = s3_server.fs(retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=1))
        with pytest.raises(OSError, match="connect"):
            once.get_file_info("vlbucket/t6/kept.json")
    finally:
        s3_server.start()
    assert s3_server.port == port and s3_server.running
    assert ws.read_json(ws.path("kept.json")) == {"k": 1}
    assert ws.is_dir("empty-dir")
