"""Fixtures the fault tests share, and the report of what they injected and what survived.

Each fault test hands its figures to ``fault_report`` once its assertions passed. With
``VLSELECT_FAULT_REPORT=path.json`` set, the session writes them there (and a markdown
table beside it): the summary in the README is one such run.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from engine.quality import markdown_table
from tests.jobs.test_progress_job import build_tiny_ws


@pytest.fixture(scope="session")
def progress_ws(ray_session, tmp_path_factory):
    """A 300-row world with its spaces and tiny base, for runs of ``vlselect progress``
    (each test names its own run)."""
    return build_tiny_ws(tmp_path_factory)


@pytest.fixture(scope="session")
def _fault_cases():
    cases: list[dict] = []
    yield cases
    out = os.environ.get("VLSELECT_FAULT_REPORT")
    if out and cases:
        write_report(Path(out), cases)


@pytest.fixture
def fault_report(_fault_cases, request):
    """``fault_report(injected=..., outcome=..., lost=0, **figures)``: record this test's case."""

    def record(*, injected: str, outcome: str, lost: int, **figures) -> None:
        _fault_cases.append(
            {
                "test": request.node.nodeid,
                "injected": injected,
                "outcome": outcome,
                "lost": lost,
                **figures,
            }
        )

    return record


def write_report(out: Path, cases: list[dict]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "cases": cases}
    out.write_text(json.dumps(report, indent=1) + "\n")
    rows = [
        [c["injected"], c["outcome"], c["lost"], f"`{c['test'].split('::')[0]}`"] for c in cases
    ]
    table = markdown_table(["fault injected", "what it cost", "rows lost", "test"], rows)
    out.with_suffix(".md").write_text(table + "\n")
