"""Which warnings reach a person, in the driver and in every Ray worker process.

Two rules, applied by :func:`install` (the CLI calls it first thing; ``jobs.runtime.connect``
names it as Ray's ``worker_process_setup_hook``, so every worker of the job runs it too):

1. **Known harmless third-party warnings are filtered by name** (:data:`KNOWN_HARMLESS`):
   each entry names the category, the message, the module that raises it, and why it is
   harmless here; log records the same way (:data:`KNOWN_HARMLESS_LOGS`: the logger and the
   message). Every other warning still shows.
2. **Strict mode** (``VLSELECT_STRICT_WARNINGS=1``, which the test suite sets): a
   ``DeprecationWarning``, ``PendingDeprecationWarning`` or ``FutureWarning`` attributed to
   one of vlselect's own modules (:data:`OWN_MODULES`) is raised as an error, so a call that
   a library has deprecated fails a test while the library still accepts it. In the pytest
   process the same rule comes from ``filterwarnings`` in ``pyproject.toml``; this module
   carries it into Ray's workers, where pytest's filters do not reach.

Plain Python; no Ray.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from dataclasses import dataclass

#: The regex (``warnings`` matches it at the start of the module name) of vlselect's own
#: modules; ``pyproject.toml``'s pytest ``filterwarnings`` uses the same one.
OWN_MODULES = r"(engine|actors|jobs|benchmarks|tests)(\.|$)"
DEPRECATIONS = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)
STRICT_ENV = "VLSELECT_STRICT_WARNINGS"


@dataclass(frozen=True)
class Harmless:
    """A third-party warning shown to no one: ``message`` and ``module`` are regexes matched
    at the start of the warning's text (ignoring case) and of the module it is attributed to,
    as ``warnings.filterwarnings`` matches them. ``example`` is a text seen here, raised from
    ``example_module``: the tests check that the entry hides it and only it."""

    category: type[Warning]
    message: str
    module: str
    why: str
    example: str
    example_module: str

    def matches(self, text: str, category: type[Warning], module: str) -> bool:
        return (
            re.compile(self.message, re.I).match(text) is not None
            and issubclass(category, self.category)
            and re.compile(self.module).match(module) is not None
        )


KNOWN_HARMLESS: tuple[Harmless, ...] = (
    Harmless(
        DeprecationWarning,
        r"(Support for class-based `config` is deprecated|Pydantic V1 style `@root_validator`)",
        r"ray\.llm\.",
        "Ray 2.60's own Ray Data LLM models still use pydantic v1 idioms, at import of "
        "ray.data.llm; nothing of ours calls them, and Ray, not we, must migrate them.",
        "Support for class-based `config` is deprecated, use ConfigDict instead.",
        "ray.llm._internal.batch.stages.base",
    ),
    Harmless(
        DeprecationWarning,
        r"`(use_push_based_shuffle|use_polars|use_arrow_tensor_v2)` is deprecated",
        r"ray\.data\.context$",
        "Ray Data warns of its own deprecated DataContext fields whenever it copies a "
        "context (Ray Train's dataset setup does); vlselect sets none of them.",
        "`use_polars` is deprecated, please configure `use_polars_sort`  instead.",
        "ray.data.context",
    ),
)


@dataclass(frozen=True)
class HarmlessLog:
    """A third-party log record shown to no one: ``logger`` is the name of the logger that
    logs it (a filter on a logger sees only its own records; a handler's filter matches
    children too), ``message`` a regex matched at the start of the record's text."""

    logger: str
    message: str
    why: str
    example: str

    def matches(self, record: logging.LogRecord) -> bool:
        name = record.name
        return (name == self.logger or name.startswith(self.logger + ".")) and (
            re.match(self.message, record.getMessage()) is not None
        )


KNOWN_HARMLESS_LOGS: tuple[HarmlessLog, ...] = (
    HarmlessLog(
        "ray._private.authentication.authentication_token_setup",
        r"Token authentication is enabled for this Ray cluster",
        "Said at every start of a local Ray, whose token Ray made itself; how to run a "
        "cluster with token authentication is in the README.",
        "Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to "
        "opt out.",
    ),
    HarmlessLog(
        "ray.data",
        r"Truncating long operator name",
        "Ray Data shortens a fused operator's name in its progress bar; the bar still shows.",
        "Truncating long operator name to 100 characters. To disable this behavior, set ...",
    ),
    HarmlessLog(
        "DeepSpeed",
        r"Setting accelerator to CPU",
        "DeepSpeed says it at import on any machine without a GPU: --plan on a laptop, the "
        "CPU training path (DS_ACCELERATOR=cpu) and the tests. A GPU worker that cannot "
        "see its GPU is refused by the trainer's own check, naming the device it expected.",
        "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to "
        "detect it.",
    ),
)


class HarmlessLogFilter(logging.Filter):
    """Drops the records :data:`KNOWN_HARMLESS_LOGS` names. :func:`install` puts it on each
    entry's logger; a handler that sees records of many loggers can take it too (Ray Data's
    console handler does, in ``jobs/ray_data_logging.yaml``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(entry.matches(record) for entry in KNOWN_HARMLESS_LOGS)


def install(strict: bool | None = None) -> None:
    """Apply :data:`KNOWN_HARMLESS` and, when ``strict`` (default: ``VLSELECT_STRICT_WARNINGS``
    is ``1``), turn deprecations attributed to :data:`OWN_MODULES` into errors.

    Each :data:`KNOWN_HARMLESS_LOGS` logger gets a :class:`HarmlessLogFilter`.

    Idempotent: ``warnings.filterwarnings`` drops an identical filter before adding it again.
    Strict filters go in last, so they win over a harmless entry whose module regex is broad.
    """
    for entry in KNOWN_HARMLESS_LOGS:
        logger = logging.getLogger(entry.logger)
        if not any(isinstance(f, HarmlessLogFilter) for f in logger.filters):
            logger.addFilter(HarmlessLogFilter())
    for entry in KNOWN_HARMLESS:
        warnings.filterwarnings("ignore", entry.message, entry.category, entry.module)
    if strict is None:
        strict = os.environ.get(STRICT_ENV) == "1"
    if strict:
        for category in DEPRECATIONS:
            warnings.filterwarnings("error", category=category, module=OWN_MODULES)
