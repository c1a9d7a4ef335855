"""The warning policy: deprecations from our code fail, known harmless ones are not shown.

In this process pytest's ``filterwarnings`` (pyproject.toml) holds the strict rule; in Ray's
workers ``engine.warning_filters.install`` does, through the setup hook ``jobs.runtime``
names. Both are checked here, and that they say the same thing.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import tomllib

from engine import warning_filters

ROOT = Path(__file__).resolve().parents[1]


def _warn(category: type[Warning], module: str, message: str = "old call") -> None:
    """Warn as if from ``module`` (the frame a library's ``stacklevel`` points at)."""
    warnings.warn_explicit(message, category, f"{module.replace('.', '/')}.py", 1, module=module)


def test_pyproject_and_the_worker_rule_name_the_same_modules_and_categories():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]
    lines = config["ini_options"]["filterwarnings"]
    strict = {line.split(":")[2]: line.split(":")[3] for line in lines if line.startswith("error")}
    assert strict == {c.__name__: warning_filters.OWN_MODULES for c in warning_filters.DEPRECATIONS}


@pytest.mark.parametrize("category", warning_filters.DEPRECATIONS)
@pytest.mark.parametrize("module", ["engine.llava.model", "actors.llm", "jobs.cli", "tests.x"])
def test_a_deprecation_attributed_to_our_code_fails_the_test(category, module):
    with pytest.raises(category, match="old call"):
        _warn(category, module)


@pytest.mark.parametrize("module", ["transformers.modeling_utils", "ray.data", "enginex", "jobsy"])
def test_a_third_party_deprecation_stays_a_warning(module):
    with pytest.warns(FutureWarning, match="old call"):
        _warn(FutureWarning, module)


def _in_fresh_python(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``code`` in a new interpreter: its warning filters are Python's, not pytest's."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", **(env or {})},
        timeout=60,
    )


def test_install_is_strict_only_when_asked_and_hides_only_what_it_names():
    code = """
        import warnings
        from engine import warning_filters
        warning_filters.install()
        for entry in warning_filters.KNOWN_HARMLESS:
            with warnings.catch_warnings(record=True) as seen:
                warnings.warn_explicit(entry.example, entry.category, "x.py", 1, module=entry.example_module)
            assert not seen, (entry, seen)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            warning_filters.install()
            warnings.warn_explicit("other", UserWarning, "x.py", 1, module="transformers.x")
        assert [str(w.message) for w in seen] == ["other"], seen
        try:
            warnings.warn_explicit("old call", FutureWarning, "x.py", 1, module="engine.pool")
        except FutureWarning:
            print("raised")
        else:
            print("warned")
    """
    assert _in_fresh_python(code).stdout.split() == ["warned"]
    strict = _in_fresh_python(code, {"VLSELECT_STRICT_WARNINGS": "1"})
    assert strict.stdout.split() == ["raised"], strict.stderr


def test_every_known_harmless_entry_says_why_and_matches_its_example():
    for entry in warning_filters.KNOWN_HARMLESS:
        assert len(entry.why) > 20, entry
        assert entry.matches(entry.example, entry.category, entry.example_module), entry
        assert not entry.matches(entry.example, entry.category, "engine.pool"), entry


def _worker_warns(category_name: str, module: str) -> str:
    import warnings as w

    category = {"FutureWarning": FutureWarning, "UserWarning": UserWarning}[category_name]
    with w.catch_warnings(record=True) as seen:
        w.warn_explicit("old call", category, "x.py", 1, module=module)
    return f"warned {len(seen)}"


def test_ray_workers_run_the_same_rule(ray_session):
    ray = ray_session
    task = ray.remote(num_cpus=0.1)(_worker_warns)
    with pytest.raises(ray.exceptions.RayTaskError, match="FutureWarning: old call"):
        ray.get(task.remote("FutureWarning", "actors.llm"))
    assert ray.get(task.remote("FutureWarning", "transformers.x")) == "warned 1"
    assert ray.get(task.remote("UserWarning", "actors.llm")) == "warned 1"


def test_every_known_harmless_log_entry_says_why_and_drops_only_its_records():
    import logging

    drop = warning_filters.HarmlessLogFilter()
    for entry in warning_filters.KNOWN_HARMLESS_LOGS:
        assert len(entry.why) > 20, entry
        record = logging.LogRecord(
            entry.logger, logging.WARNING, "x.py", 1, entry.example, None, None
        )
        assert not drop.filter(record), entry
        other = logging.LogRecord(entry.logger, logging.WARNING, "x.py", 1, "disk full", None, None)
        assert drop.filter(other), entry
        ours = logging.LogRecord(
            "vlselect.x", logging.WARNING, "x.py", 1, entry.example, None, None
        )
        assert drop.filter(ours), entry


def test_ray_data_console_shows_warnings_but_not_info_lines_and_its_file_keeps_all():
    code = """
        import logging
        from jobs.runtime import quiet_ray_data_console
        from engine.warning_filters import install
        install()
        quiet_ray_data_console()
        import ray.data  # configures its logging from RAY_DATA_LOGGING_CONFIG
        log = logging.getLogger("ray.data._internal.execution.streaming_executor")
        log.info("Execution plan of Dataset x")
        log.warning("a real warning")
        logging.getLogger("ray.data._internal.progress.utils").warning(
            "Truncating long operator name to 100 characters.")
        logging.getLogger("ray._private.authentication.authentication_token_setup").warning(
            "Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled")
        from ray.llm._internal.common.observability.logging import get_logger
        get_logger("common.utils.download_utils").info("No cloud storage mirror configured")
        get_logger("x").warning("a real LLM warning")
        handlers = logging.getLogger("ray.data").handlers
        print("handlers", sorted(type(h).__name__ for h in handlers))
    """
    done = _in_fresh_python(code)
    assert done.returncode == 0, done.stderr[-2000:]
    console = done.stdout + done.stderr
    assert "a real warning" in console and "a real LLM warning" in console
    hidden_lines = ("Execution plan", "Truncating long operator name", "Token authentication",
                    "No cloud storage mirror")  # fmt: skip
    for hidden in hidden_lines:
        assert hidden not in console, console
    assert "handlers ['PlainRayHandler', 'SessionFileHandler']" in done.stdout
