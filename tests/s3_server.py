"""A real S3-compatible server on loopback (moto's standalone server), for tests. No tests here.

Starts ``python -m moto.server`` (moto is in the dev extra, so its version is locked) as a
subprocess on a free port of 127.0.0.1, waits until it answers, and creates a bucket. The
``s3_server`` fixture of tests/conftest.py holds one for the whole session.

    def test_x(s3_server):
        ws = Workspace.open(s3_server.uri("x"))   # s3://vlbucket/x?endpoint_override=...
        fs = s3_server.fs()                        # a pyarrow S3FileSystem on the bucket's server
        s3_server.stop(keep_objects=True)          # unreachable now: connection refused
        s3_server.start()                          # the same port, the objects put back

The URI carries the endpoint, scheme and region as query options (the ones
``pyarrow.fs.FileSystem.from_uri`` accepts: ``region``, ``scheme``, ``endpoint_override``,
``allow_bucket_creation``, ``allow_bucket_deletion``, ``allow_delayed_open``,
``tls_ca_file_path``, ``tls_verify_certificates``; anything else is "Unexpected query
parameter"), so it can go to Ray workers as it is. The credentials do not go in it: pyarrow
reads ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` from the environment, which
tests/conftest.py sets (moto accepts any).

**moto keeps no state across a restart**: its backends live in the server process's memory,
so a stopped server comes back with no bucket and no object (checked with moto 5.2.5). To
bring a server back as it was, ``stop(keep_objects=True)`` (what ``restart()`` does) first
copies every object of every bucket into this process, and ``start()`` puts them back under
the same keys, before it returns. What that does not keep: object metadata (ETags,
modification times), versions, and multipart uploads in flight, which a stop aborts as a
crash would. While stopped, a pyarrow call fails with ``NETWORK_CONNECTION ... Could not
connect to server`` after its retries (about 6 s with pyarrow's default 3 attempts).

The server's output (werkzeug's request lines included) goes to ``log_path``, never to the
test output; tests/conftest.py shows the lines a failed test caused.
"""

from __future__ import annotations

import atexit
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pyarrow.fs as pafs

HOST = "127.0.0.1"
ACCESS_KEY = "testing"
SECRET_KEY = "testing"
REGION = "us-east-1"
DEFAULT_BUCKET = "vlbucket"
STARTUP_TIMEOUT_S = 30.0  # it answers in about 0.5 s on 2 idle cores
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # werkzeug colours its request lines even into a file


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class S3Server:
    """One moto server process on 127.0.0.1:``port`` holding ``bucket``; started on creation."""

    def __init__(
        self,
        bucket: str = DEFAULT_BUCKET,
        port: int | None = None,
        log_dir: str | os.PathLike | None = None,
        startup_timeout: float = STARTUP_TIMEOUT_S,
    ):
        self.bucket = bucket
        self.host = HOST
        self.port = port or free_port()
        self.startup_timeout = startup_timeout
        log_dir = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="s3-server-"))
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"moto-server-{self.port}.log"
        self.proc: subprocess.Popen | None = None
        self.startup_s: float | None = None
        self._snapshot: dict[str, dict[str, bytes]] | None = None
        atexit.register(self._terminate)  # a session that dies before the fixture's stop()
        self.start()

    # -- where it is -----------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        """``host:port``, pyarrow's ``endpoint_override``."""
        return f"{self.host}:{self.port}"

    @property
    def endpoint_url(self) -> str:
        """``http://host:port``, boto3's ``endpoint_url``."""
        return f"http://{self.endpoint}"

    def uri(self, prefix: str = "") -> str:
        """``s3://<bucket>/<prefix>?endpoint_override=127.0.0.1:<port>&scheme=http&region=us-east-1``:
        a URI ``pyarrow.fs.FileSystem.from_uri`` (so ``Workspace.open``) resolves as it is."""
        path = "/".join(p for p in (self.bucket, prefix.strip("/")) if p)
        return f"s3://{path}?endpoint_override={self.endpoint}&scheme=http&region={REGION}"

    def fs(self, **options) -> pafs.S3FileSystem:
        """A pyarrow S3FileSystem on this server (paths are ``<bucket>/<key>``); ``options``
        go to S3FileSystem (``allow_bucket_creation=True``, a ``retry_strategy``...)."""
        return pafs.S3FileSystem(
            endpoint_override=self.endpoint,
            scheme="http",
            access_key=ACCESS_KEY,
            secret_key=SECRET_KEY,
            region=REGION,
            **options,
        )

    def client(self):
        """A boto3 S3 client on this server."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name=REGION,
        )

    # -- its life --------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        """Start the server on ``port``, wait until it answers, create the bucket and put back
        the objects a ``stop(keep_objects=True)`` kept.

        Raises:
            RuntimeError: it exited, or did not answer within ``startup_timeout`` seconds
                (the message holds its output).
        """
        if self.running:
            return
        with open(self.log_path, "a") as log:
            log.write(f"--- s3_server: starting moto on {self.endpoint} ---\n")
            log.flush()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", self.host, "-p", str(self.port)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C of pytest reaches us, and we stop it
            )
        began = time.monotonic()
        while not self._answers():
            if self.proc.poll() is not None:
                self._fail(f"moto server exited with status {self.proc.returncode}")
            if time.monotonic() - began > self.startup_timeout:
                self._terminate()
                self._fail(f"moto server did not answer within {self.startup_timeout:.0f} s")
            time.sleep(0.1)
        self.startup_s = time.monotonic() - began
        self._restore()

    def stop(self, keep_objects: bool = False) -> None:
        """Stop the server (SIGTERM, SIGKILL after 5 s); from now on connections are refused.

        ``keep_objects=True`` first copies every object of every bucket into this process,
        so that the next ``start()`` puts them back (moto itself forgets everything).
        """
        if not self.running:
            return
        if keep_objects:
            self._snapshot = self._objects()
        self._terminate()

    def restart(self, keep_objects: bool = True) -> None:
        """Stop and start again on the same port, with the objects put back unless
        ``keep_objects=False`` (then only an empty bucket)."""
        self.stop(keep_objects=keep_objects)
        self.start()

    # -- its output ------------------------------------------------------------------------

    def log_size(self) -> int:
        return self.log_path.stat().st_size if self.log_path.exists() else 0

    def log_text(self, since: int = 0, max_lines: int = 200) -> str:
        """The server's output from byte ``since`` on (its last ``max_lines`` lines), uncoloured."""
        if not self.log_path.exists():
            return ""
        with open(self.log_path, "rb") as f:
            f.seek(since)
            text = f.read().decode(errors="replace")
        lines = _ANSI.sub("", text).splitlines()
        cut = len(lines) - max_lines
        head = [f"[... {cut} earlier lines in {self.log_path}]"] if cut > 0 else []
        return "\n".join(head + lines[-max_lines:])

    # -- inside ----------------------------------------------------------------------------

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.endpoint_url}/moto-api/", timeout=1):
                return True
        except urllib.error.HTTPError:
            return True  # an HTTP answer of any status: it is serving
        except OSError:
            return False

    def _fail(self, what: str) -> None:
        raise RuntimeError(f"{what} ({self.log_path}):\n{self.log_text(max_lines=60)}")

    def _terminate(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def _objects(self) -> dict[str, dict[str, bytes]]:
        """Every bucket's objects, key -> bytes (directory markers ``a/b/`` included)."""
        client = self.client()
        kept: dict[str, dict[str, bytes]] = {}
        for bucket in client.list_buckets()["Buckets"]:
            name = bucket["Name"]
            kept[name] = {}
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
                for obj in page.get("Contents", []):
                    body = client.get_object(Bucket=name, Key=obj["Key"])["Body"]
                    kept[name][obj["Key"]] = body.read()
        return kept

    def _restore(self) -> None:
        snapshot = {self.bucket: {}, **(self._snapshot or {})}
        client = self.client()
        for name, objects in snapshot.items():
            client.create_bucket(Bucket=name)
            for key, data in objects.items():
                client.put_object(Bucket=name, Key=key, Body=data)
        self._snapshot = None
