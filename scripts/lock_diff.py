"""Compare the distributions installed in this interpreter with a lock file.

    python scripts/lock_diff.py constraints/cpu.lock              # report; exit 1 on a difference
    python scripts/lock_diff.py constraints/cpu.lock --extra-only  # names the lock does not have
    python scripts/lock_diff.py --moved OLD.lock NEW.txt           # what moves between two locks

What ``pip freeze --all`` lists, the project itself aside, must equal the lock: the same
names at the same versions, nothing more. ``scripts/install.sh`` runs it after installing,
and ``tests/test_lock.py`` on every test run.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import sys
import sysconfig
from pathlib import Path

PROJECT = "vlselect"
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")


def canonical(name: str) -> str:
    """The PEP 503 normal form of a distribution name (``Open_Clip.torch`` -> ``open-clip-torch``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: str | Path) -> dict[str, str]:
    """``{canonical name: version}`` of every ``name==version`` line of a pip-style lock."""
    pins = {}
    for line in Path(path).read_text().splitlines():
        match = _PIN.match(line)
        if match:
            pins[canonical(match.group(1))] = match.group(2)
    if not pins:
        raise ValueError(f"{path} holds no 'name==version' line: is it a lock?")
    return pins


def installed() -> dict[str, str]:
    """``{canonical name: version}`` of the distributions in this interpreter's site-packages
    (what ``pip freeze`` lists), the project aside. Packages that a library vendors and puts
    on ``sys.path`` at import (Ray's ``thirdparty_files``) are not installed: left out."""
    site = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    found = {}
    for dist in importlib.metadata.distributions(path=site):
        name = dist.metadata["Name"]
        if name and canonical(name) != PROJECT:
            found[canonical(name)] = dist.version
    return found


def differences(lock: dict[str, str], env: dict[str, str]) -> dict[str, list]:
    """What keeps ``env`` from equalling ``lock``: missing, extra, and (name, locked, installed)."""
    return {
        "missing": sorted(set(lock) - set(env)),
        "extra": sorted(set(env) - set(lock)),
        "mismatched": sorted(
            (n, lock[n], env[n]) for n in set(lock) & set(env) if lock[n] != env[n]
        ),
    }


def moved(old: dict[str, str], new: dict[str, str]) -> list[str]:
    """Markdown table rows of every package whose version differs between two locks."""
    rows = ["| package | locked | latest |", "|---|---|---|"]
    for name in sorted(set(old) | set(new)):
        if old.get(name) != new.get(name):
            rows.append(f"| {name} | {old.get(name, '-')} | {new.get(name, '-')} |")
    return rows if len(rows) > 2 else ["(nothing moves: the lock is the newest allowed)"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("lock")
    parser.add_argument("other", nargs="?", help="with --moved: the newer lock")
    parser.add_argument(
        "--extra-only", action="store_true", help="print installed names the lock lacks"
    )
    parser.add_argument(
        "--moved", action="store_true", help="compare LOCK with OTHER, not the venv"
    )
    args = parser.parse_args(argv)
    if args.moved:
        if not args.other:
            parser.error("--moved needs two files: OLD NEW")
        print("\n".join(moved(read_lock(args.lock), read_lock(args.other))))
        return 0
    lock, env = read_lock(args.lock), installed()
    diff = differences(lock, env)
    if args.extra_only:
        print(" ".join(diff["extra"]))
        return 0
    if not any(diff.values()):
        print(f"lock_diff: the environment equals {args.lock} ({len(lock)} packages)")
        return 0
    print(f"lock_diff: the environment differs from {args.lock}:", file=sys.stderr)
    for name in diff["missing"]:
        print(f"  missing     {name}=={lock[name]}", file=sys.stderr)
    for name in diff["extra"]:
        print(f"  not locked  {name}=={env[name]}", file=sys.stderr)
    for name, want, have in diff["mismatched"]:
        print(f"  version     {name}: locked {want}, installed {have}", file=sys.stderr)
    print("  Fix: bash scripts/install.sh (or rm -rf .venv && make install).", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
