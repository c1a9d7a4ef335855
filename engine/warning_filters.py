"""Which warnings reach a person, in the driver and in every Ray worker process.

Two rules, applied by :func:`install` (the CLI calls it first thing; ``jobs.runtime.connect``
names it as Ray's ``worker_process_setup_hook``, so every worker of the job runs it too):

1. **Known harmless third-party warnings are filtered by name** (:data:`KNOWN_HARMLESS`):
   each entry names the category, the message, the module that raises it, and why it is
   harmless here. Every other warning still shows.
2. **Strict mode** (``VLSELECT_STRICT_WARNINGS=1``, which the test suite sets): a
   ``DeprecationWarning``, ``PendingDeprecationWarning`` or ``FutureWarning`` attributed to
   one of vlselect's own modules (:data:`OWN_MODULES`) is raised as an error, so a call that
   a library has deprecated fails a test while the library still accepts it. In the pytest
   process the same rule comes from ``filterwarnings`` in ``pyproject.toml``; this module
   carries it into Ray's workers, where pytest's filters do not reach.

Plain Python; no Ray.
"""

from __future__ import annotations

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


KNOWN_HARMLESS: tuple[Harmless, ...] = ()


def install(strict: bool | None = None) -> None:
    """Apply :data:`KNOWN_HARMLESS` and, when ``strict`` (default: ``VLSELECT_STRICT_WARNINGS``
    is ``1``), turn deprecations attributed to :data:`OWN_MODULES` into errors.

    Idempotent: ``warnings.filterwarnings`` drops an identical filter before adding it again.
    Strict filters go in last, so they win over a harmless entry whose module regex is broad.
    """
    for entry in KNOWN_HARMLESS:
        warnings.filterwarnings("ignore", entry.message, entry.category, entry.module)
    if strict is None:
        strict = os.environ.get(STRICT_ENV) == "1"
    if strict:
        for category in DEPRECATIONS:
            warnings.filterwarnings("error", category=category, module=OWN_MODULES)
