"""Security of what a user hands in: image paths stay under the image root, no file is
ever unpickled, API keys come from the environment and go nowhere but the server, and
the README keeps Ray's token authentication on with names the installed Ray knows.
"""

from __future__ import annotations

import ast
import io
import json
import shutil
import uuid
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from engine.artifacts import IndexMeta, Pool, Skills
from engine.commit import MANIFEST
from engine.errors import InputError
from engine.faiss_index import IndexInfo
from engine.target_input import read_benchmark
from engine.workspace import Workspace
from jobs.cli import main
from tests.fake_openai import FakeOpenAI, default_rule

ROOT = Path(__file__).resolve().parents[2]


def png(color: str, size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


# -- image paths stay under the image root ------------------------------------------------

SECRET = png("blue", (5, 5))


@pytest.fixture
def image_place(tmp_path: Path) -> tuple[Path, Path]:
    """An image root, a secret image beside it, and links from inside the root to it."""
    root = tmp_path / "images"
    root.mkdir()
    (root / "ok.png").write_bytes(png("red", (8, 8)))
    outside = tmp_path / "private"
    outside.mkdir()
    (outside / "secret.png").write_bytes(SECRET)
    (root / "link.png").symlink_to(outside / "secret.png")
    (root / "linkdir").symlink_to(outside)
    (root / "inside-link.png").symlink_to(root / "ok.png")  # a link that stays inside: fine
    return root, outside / "secret.png"


def escapes(secret: Path) -> dict[str, str]:
    return {
        "dotdot": "../private/secret.png",
        "dotdot-inside": "ok.png/../../private/secret.png",
        "absolute": str(secret),
        "file-uri": f"file://{secret}",
        "symlinked-file": "link.png",
        "symlinked-dir": "linkdir/secret.png",
        "system-file": "/etc/hostname",
        "foreign-uri": "s3://bucket/private/secret.png",
    }


def test_ingest_rejects_every_image_path_that_leaves_the_root(image_place, ray_session, capsys):
    root, secret = image_place
    conv = [{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "red"}]
    paths = {"good": "ok.png", "inside-link": "inside-link.png", **escapes(secret)}
    source = root.parent / "pool.jsonl"
    source.write_text(
        "".join(
            json.dumps({"id": i, "image": p, "conversations": conv}) + "\n"
            for i, p in paths.items()
        )
    )
    ws = root.parent / "ws"
    # No decoding: the root check alone must keep /etc/hostname and the secret out.
    args = ["--workspace", str(ws), "--source", str(source), "--images", str(root)]
    assert main(["ingest", *args, "--image-check", "none"]) == 0
    found = Pool.open(Workspace.open(str(ws)))
    pool = found.read_table()
    assert sorted(pool.column("id").to_pylist()) == ["good", "inside-link"]
    assert SECRET not in pool.column("image").to_pylist()
    rejects = {r["id"]: r for r in found.read_table(under="rejects").to_pylist()}
    assert set(rejects) == set(escapes(secret))
    for name, reject in rejects.items():
        assert reject["reason_code"] == "image_escapes_root", reject
        assert paths[name] in reject["reason"] and "outside the image root" in reject["reason"]
    assert found.meta.rejected_by_reason == {"image_escapes_root": len(escapes(secret))}


def test_a_benchmark_cannot_read_outside_its_image_root(image_place):
    root, secret = image_place
    records = [
        {"id": name, "image": p, "question": "Colour?"} for name, p in escapes(secret).items()
    ]
    path = root / "bench.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    bench = read_benchmark(str(path))  # the image root is the file's folder
    assert len(bench) == 0 and SECRET not in bench.images
    assert {r["reason_code"] for r in bench.rejects} == {"image_escapes_root"}


# -- nothing a user hands in is unpickled -------------------------------------------------

SCANNED = ("engine", "actors", "jobs", "benchmarks")
PICKLE_MODULES = {"pickle", "_pickle", "cPickle", "cloudpickle", "dill", "joblib"}
UNPICKLERS = {"load", "loads", "Unpickler"}


def _dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else None
    return None


def _is_const(node: ast.AST | None, value: bool) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def unpickling_calls(source: str, filename: str) -> list[str]:
    """``file:line: what`` for each place that could unpickle data read from a file."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.ImportFrom) and node.module in PICKLE_MODULES:
            names = {a.name for a in node.names} & UNPICKLERS
            if names:
                found.append(f"{where}: from {node.module} import {', '.join(sorted(names))}")
        if not isinstance(node, ast.Call):
            continue
        kwargs = {k.arg: k.value for k in node.keywords}
        if _is_const(kwargs.get("allow_pickle"), True):
            found.append(f"{where}: allow_pickle=True")
        name = _dotted(node.func) or ""
        module, _, attr = name.rpartition(".")
        pickler = module.split(".")[-1] in PICKLE_MODULES and attr in UNPICKLERS
        if pickler or attr == "read_pickle":
            found.append(f"{where}: {name}(")
        elif name in ("np.load", "numpy.load") and not _is_const(kwargs.get("allow_pickle"), False):
            found.append(f"{where}: {name}( without allow_pickle=False")
        elif name == "torch.load" and not _is_const(kwargs.get("weights_only"), True):
            found.append(f"{where}: torch.load( without weights_only=True")
    return found


def test_the_scanner_finds_each_unpickling_form():
    snippet = "\n".join(
        [
            "import pickle, joblib, numpy as np, torch",  # 1
            "from pickle import loads",  # 2
            "pickle.load(f)",  # 3
            "pickle.loads(b)",  # 4
            "joblib.load(p)",  # 5
            "np.load(p)",  # 6
            "np.load(p, allow_pickle=True)",  # 7: two findings
            "torch.load(p)",  # 8
            "torch.load(p, weights_only=False)",  # 9
            "pd.read_pickle(p)",  # 10
            "np.load(p, allow_pickle=False)",  # 11: safe
            "torch.load(p, weights_only=True)",  # 12: safe
            "np.save(p, a, allow_pickle=False)",  # 13: safe
        ]
    )
    lines = [int(f.split(":")[1]) for f in unpickling_calls(snippet, "x.py")]
    assert sorted(lines) == [2, 3, 4, 5, 6, 7, 7, 8, 9, 10]


def test_no_source_file_unpickles_what_it_reads():
    files = [p for folder in SCANNED for p in sorted((ROOT / folder).rglob("*.py"))]
    assert len(files) > 50  # the scan really walked the project
    found = [
        hit for p in files for hit in unpickling_calls(p.read_text(), str(p.relative_to(ROOT)))
    ]
    assert not found, "unpickling of files a user hands in:\n" + "\n".join(found)


class _Payload:
    """Unpickling it creates ``marker``: the proof that a pickle ran code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_pickled_queries_file_is_refused_without_being_unpickled(tmp_path):
    from jobs.search import load_queries

    marker = tmp_path / "payload-ran"
    path = tmp_path / "queries.npy"
    np.save(path, np.array([_Payload(marker)], dtype=object), allow_pickle=True)
    meta = IndexMeta(
        space="text", factory="Flat", metric="ip", dim=4, vectors=10, rows=10, shards=1,
        rows_per_shard=[10], excluded=0, excluded_per_shard=[0], seconds=0.0, config={},
    )  # fmt: skip
    info = IndexInfo(
        space="text", dir=str(tmp_path), dim=4, rows=10, shards=1, factory="Flat", meta=meta,
        fingerprint="0" * 64, built_from=None,
    )  # fmt: skip
    with pytest.raises(InputError, match=r"cannot be read as a numeric \.npy array.*np\.save"):
        load_queries(str(path), info)
    assert not marker.exists()
    np.load(path, allow_pickle=True)  # the control: loaded the unsafe way, the payload runs
    assert marker.exists()


# -- API keys: from the environment, to the server, nowhere else ---------------------------

KEY_ENV = "VLSELECT_FAULT_API_KEY"


@pytest.fixture(scope="module")
def pool_ws(ray_session, tmp_path_factory) -> Path:
    """A workspace holding an ingested pool of 12 text-only samples."""
    base = tmp_path_factory.mktemp("keys")
    source = base / "pool.jsonl"
    questions = [f"What is {i} plus {i}?" for i in range(11)] + ["ECHO THE KEY"]
    source.write_text(
        "".join(
            json.dumps(
                {
                    "id": f"s{i}",
                    "conversations": [
                        {"from": "human", "value": q},
                        {"from": "gpt", "value": "x"},
                    ],
                }
            )
            + "\n"
            for i, q in enumerate(questions)
        )
    )
    ws = base / "ws"
    assert main(["ingest", "--workspace", str(ws), "--source", str(source)]) == 0
    return ws


def texts_of(path: Path) -> bytes:
    """A file's bytes, Parquet decompressed to its rows (zstd would hide a key)."""
    if path.suffix == ".parquet":
        return json.dumps(pq.read_table(path).to_pylist(), default=str).encode()
    return path.read_bytes()


def ray_log_files() -> list[Path]:
    import ray

    node = ray._private.worker._global_node
    logs = Path(node.get_session_dir_path()) / "logs"
    return [p for p in logs.rglob("*") if p.is_file()]


def test_the_api_key_reaches_the_server_and_no_file_or_log(pool_ws, tmp_path, monkeypatch, capfd):
    key = f"sk-vlselect-{uuid.uuid4().hex}"
    monkeypatch.setenv(KEY_ENV, key)
    ws = tmp_path / "ws"
    shutil.copytree(pool_ws / "pool", ws / "pool")

    def rule(question, n):
        if "ECHO THE KEY" in question:  # a server that echoes the key back in an error
            return "broken", f"invalid api key {key}"
        return default_rule(question, n)

    with FakeOpenAI(rule) as server:
        code = main(
            [
                "skills", "--workspace", str(ws), "--log-level", "DEBUG",
                "--backend", "openai", "--base-url", server.base_url, "--model", "fake",
                "--set", f"openai.api_key_env={KEY_ENV}", "--set", "openai.backoff_s=0",
                "--set", "embed=false",
            ]
        )  # fmt: skip
    out, err = capfd.readouterr()
    assert code == 0, err
    # The key was sent, so its absence from everything below means something.
    assert server.auth == {f"Bearer {key}"}
    found = Skills.open(Workspace.open(str(ws)))
    assert found.meta.config["openai"]["api_key_env"] == KEY_ENV and found.meta.failed == 1
    echoed = [r for r in found.read_table().to_pylist() if r["status"] == "failed"]
    assert "invalid api key ***" in echoed[0]["reason"]  # the echo was scrubbed
    assert "vlselect-summary" in out and "skills:" in err  # the capture holds the run's output
    assert key not in out and key not in err
    written = [p for p in ws.rglob("*") if p.is_file()]
    names = {p.name for p in written}
    assert MANIFEST in names and any(n.endswith(".parquet") for n in names)
    for path in [*written, *ray_log_files()]:
        assert key.encode() not in texts_of(path), path


def test_a_key_put_in_the_config_is_refused_and_never_echoed(
    pool_ws, tmp_path, monkeypatch, capsys
):
    key = f"sk-vlselect-{uuid.uuid4().hex}"
    monkeypatch.delenv(KEY_ENV, raising=False)
    config = tmp_path / "skills.yaml"
    config.write_text(yaml.safe_dump({"skills": {"openai": {"api_key": key}}}))
    base = ["skills", "--workspace", str(pool_ws), "--backend", "openai", "--model", "m"]
    url = ["--base-url", "http://127.0.0.1:9/v1"]
    cases = [
        ([*base, *url, "--config", str(config)], "unknown key 'openai.api_key'"),
        ([*base, *url, "--set", f"openai.api_key={key}"], "unknown key 'openai.api_key'"),
        # The key pasted where the variable's name belongs: refused without showing it.
        ([*base, *url, "--set", f"openai.api_key_env={key}"], "name not shown"),
        ([*base, "--base-url", f"http://user:{key}@127.0.0.1:9/v1"], "carries credentials"),
    ]
    for argv, words in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert words in err and "api_key_env" in err, err
        assert key not in err
    assert not (pool_ws / "skills").exists()
    assert not (pool_ws / "cache").exists()


# -- Ray token authentication -------------------------------------------------------------


def test_the_readme_keeps_token_auth_on_with_names_ray_knows():
    from ray._private.authentication.authentication_token_setup import AUTH_MODE_ENV_VAR
    from ray.scripts.scripts import cli

    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Running on a cluster with `ray job submit`")[1].split("\n## ")[0]
    assert f"export {AUTH_MODE_ENV_VAR}=token" in section
    assert "ray get-auth-token --generate" in section and "get-auth-token" in cli.commands
    assert "RAY_AUTH_MODE=disabled" not in section
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    assert config["file_mounts"]["/home/ubuntu/.ray/auth_token"] == "~/.ray/auth_token"
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c for c in starts if "ray start" in c)
