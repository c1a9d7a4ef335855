"""The CLI contract: console script and python -m entry points, shipped configs, exit codes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from engine.config import build_config, load_yaml_file
from jobs.cli import main
from jobs.registry import STAGES

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_python_m_entry_points_answer_help(stage):
    out = subprocess.run(
        [sys.executable, "-m", STAGES[stage].module, "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "--workspace" in out and "--config" in out


def test_console_script_lists_every_stage():
    out = subprocess.run(
        [str(BIN / "vlselect"), "--help"], capture_output=True, text=True, check=True
    ).stdout
    for stage in STAGES:
        assert stage in out


def test_top_level_help_imports_neither_ray_nor_torch():
    code = (
        "import sys\n"
        "from jobs.cli import build_parser\n"
        "build_parser().format_help()\n"
        "print(sorted(m for m in ('ray', 'torch', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    assert out.strip() == "[]"


def test_flags_come_from_the_config_fields():
    """Every top-level scalar field of a stage's config is a flag; a stage's extra spellings
    reach nested fields; lists take comma-separated values and repeat; a flag left out
    leaves the field alone (``--limit 0`` is a value, not an absence)."""
    from jobs.cli import build_parser
    from jobs.flags import overrides

    def parsed(*argv):
        args = build_parser(argv[0]).parse_args([argv[0], "--workspace", "w", *argv[1:]])
        return overrides(args, STAGES[argv[0]].load().CONFIG)

    assert parsed("progress", "--workers", "4", "--metric", "loss", "--no-use-gpu") == {
        "num_workers": 4, "selection": {"metric": "loss"}, "use_gpu": False}  # fmt: skip
    assert parsed("embed", "--spaces", "clip,text", "--spaces", "dino") == {
        "spaces": ["clip", "text", "dino"]}  # fmt: skip
    assert parsed("skills", "--limit", "0", "--base-url", "http://h/v1") == {
        "limit": 0, "openai": {"base_url": "http://h/v1"}}  # fmt: skip
    relative = parsed("ingest", "--source", "data/pool.json", "--images", "s3://b/img")
    assert relative == {"source": os.path.abspath("data/pool.json"), "images": "s3://b/img"}
    assert parsed("cluster") == {}


def test_every_shipped_config_loads():
    configs = sorted((ROOT / "configs").glob("*.yaml"))
    assert configs, "configs/ ships example YAML files"
    for path in configs:
        first = path.read_text().splitlines()[0]
        assert first.startswith("# vlselect ") or first.startswith("# ray job submit"), (
            f"{path.name} must start with the command that runs it"
        )
        sections = load_yaml_file(path, sections=[*STAGES, "pipeline"])
        assert sections, path
        steps = sections.pop("pipeline", [])
        for stage in sections:
            build_config(stage, STAGES[stage].load().CONFIG, sections)
        for step in steps:  # a pipeline's steps: each one stage's section
            ((stage, section),) = step.items()
            build_config(stage, STAGES[stage].load().CONFIG, {stage: section})


def test_unknown_config_section_and_missing_config_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"ingset": {"source": "x"}}))
    assert main(["ingest", "--workspace", str(tmp_path / "ws"), "--config", str(bad)]) == 2
    assert "ingset" in capsys.readouterr().err
    assert main(["ingest", "--workspace", str(tmp_path / "ws"), "--config", "nope.yaml"]) == 2
    assert main(["ingest", "--workspace", str(tmp_path / "ws")]) == 2
    assert "no source to ingest" in capsys.readouterr().err
    assert not (tmp_path / "ws").exists()


def test_argparse_errors_exit_2():
    with pytest.raises(SystemExit) as exc:
        main(["world", "--out", "x", "--size", "many"])
    assert exc.value.code == 2


def test_json_logs_are_one_object_per_line(capsys):
    """--log-format json: every log line a JSON object a log pipeline can parse."""
    import json
    import logging

    from jobs.runtime import configure_logging

    configure_logging("INFO", "json")
    try:
        log = logging.getLogger("vlselect.test")
        log.info("shard %d of %d done", 3, 8)
        try:
            raise ValueError("bad row")
        except ValueError:
            log.exception("shard failed")
        log.debug("not shown at INFO")
    finally:
        configure_logging("INFO", "text")
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [(r["level"], r["logger"], r["msg"]) for r in lines] == [
        ("INFO", "vlselect.test", "shard 3 of 8 done"),
        ("ERROR", "vlselect.test", "shard failed"),
    ]
    assert "ValueError: bad row" in lines[1]["exc"] and lines[0]["ts"].startswith("20")
    out = subprocess.run(
        [str(BIN / "vlselect"), "ingest", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "--log-format {text,json}" in out


def test_stage_counts_go_out_as_ray_metrics(ray_session):
    from ray.util.metrics import Counter

    from jobs.runtime import _metrics, export_stage_metrics

    export_stage_metrics("ingest", {"records_in": 5, "accepted": 4, "rejected": 1,
                                    "seconds": 1.5, "flag": True})  # fmt: skip
    export_stage_metrics("ingest", {"records_in": 0, "seconds": 0.1})  # zero: nothing added
    assert isinstance(_metrics["rows"], Counter) and set(_metrics) == {"rows", "seconds", "runs"}


def test_a_full_or_read_only_disk_is_found_however_deep_ray_wrapped_it():
    import errno

    from jobs.cli import storage_error

    full = OSError(errno.ENOSPC, "No space left on device")
    assert storage_error(full) == (errno.ENOSPC, "No space left on device")
    try:  # raised inside another error's handling, as a stage's clean-up would
        try:
            raise full
        except OSError as inner:
            raise RuntimeError("shard 3 failed") from inner
    except RuntimeError as outer:
        assert storage_error(outer)[0] == errno.ENOSPC
    # Ray Data's UserCodeException keeps only the text of the task's traceback.
    wrapped = RuntimeError("UDF failed\n  ...\nOSError: [Errno 30] Read-only file system: 'x'")
    assert storage_error(wrapped) == (errno.EROFS, "OSError: [Errno 30] Read-only file system: 'x'")
    assert storage_error(OSError(errno.ENOENT, "No such file")) is None
    assert storage_error(RuntimeError("OSError: [Errno 2] No such file")) is None


def test_an_object_store_that_cannot_be_reached_is_one_message(tmp_path, capsys):
    from tests.s3_server import free_port

    uri = f"s3://vlbucket/ws?endpoint_override=127.0.0.1:{free_port()}&scheme=http"
    assert main(["ingest", "--workspace", uri, "--source", str(tmp_path / "x.json")]) == 1
    err = capsys.readouterr().err
    assert "the object store cannot be reached" in err and "Traceback" not in err
