"""docs/configuration.md is what jobs/config_reference.py renders from the config models."""

from __future__ import annotations

from jobs import config_reference


def test_configuration_md_is_current():
    path = config_reference.OUTPUT
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    assert text == config_reference.render(), (
        "docs/configuration.md is stale: run `python -m jobs.config_reference`"
    )
