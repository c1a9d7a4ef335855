"""The ``vlselect`` command line: one subcommand per stage of jobs.registry, each also
``python -m jobs.<stage>``.

Every subcommand takes ``--workspace``, ``--config FILE.yaml``, ``--set KEY=VALUE``
and ``--address``, and a flag per top-level field of its config model (jobs.flags).
Configuration layers, later wins: the stage's defaults, the workspace's ``vlselect.yaml``,
``--config``, ``--set``, then the flags.

Exit codes: 0 success, 2 bad input or config (one message, nothing written),
1 a failure during the run, 130 interrupted. A workspace that is full or read-only
(ENOSPC, EDQUOT, EROFS, EFBIG) is a failure during the run, told in one message
without a traceback: stages write an attempt and commit it with a manifest last
(engine.commit), so what the failed run left is never taken for finished, and a rerun
resumes.
"""

from __future__ import annotations

import argparse
import errno
import os
import re
import sys
import traceback
from types import ModuleType

from engine.config import build_config, load_yaml_file, parse_set_overrides
from engine.errors import InputError
from engine.warning_filters import install as install_warning_filters
from engine.workspace import Workspace
from jobs.flags import add_config_flags, overrides
from jobs.registry import STAGES, Stage

STORAGE_ERRORS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is used up",
    errno.EROFS: "the filesystem is read-only",
    errno.EFBIG: "a file grew past the size limit of this process or filesystem",
}


def storage_error(err: BaseException) -> tuple[int, str] | None:
    """``(errno, detail)`` if ``err``, or an error it wraps, is a full or read-only disk.

    Ray re-raises a task's error as ``RayTaskError`` with the original as ``cause``, and
    Ray Data wraps a UDF's error once more, keeping only its text; so the errno is looked
    for in the exception chain first, then in the text (``OSError: [Errno 28] ...``).
    """
    seen: set[int] = set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, OSError) and cause.errno in STORAGE_ERRORS:
            return cause.errno, cause.strerror or str(cause)
        cause = getattr(cause, "cause", None) or cause.__cause__ or cause.__context__
    for found in re.finditer(r"(?:OS|IO)Error: \[Errno (\d+)\][^\n]*", str(err)):
        if int(found.group(1)) in STORAGE_ERRORS:
            return int(found.group(1)), found.group(0)
    return None


def _common_flags(p: argparse.ArgumentParser, stage: Stage) -> None:
    p.add_argument(
        *stage.workspace_flags,
        dest="workspace",
        required=stage.needs_workspace,
        default=None,
        help="workspace directory or URI (s3://bucket/prefix?endpoint_override=...)",
    )
    p.add_argument("--config", help="YAML file of stage sections (see configs/)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config field of this stage (dotted keys, YAML values)",
    )
    p.add_argument("--address", help="Ray address (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--log-level", default="INFO")
    p.add_argument(
        "--log-format",
        choices=["text", "json"],
        default=os.environ.get("VLSELECT_LOG_FORMAT", "text"),
        help="json: one JSON object per log line, for a log pipeline (or VLSELECT_LOG_FORMAT)",
    )
    p.add_argument(
        "--worker-logs",
        action="store_true",
        help="forward every Ray worker's stdout/stderr to this terminal (or "
        "VLSELECT_WORKER_LOGS=1); by default they stay in Ray's logs and the dashboard",
    )


def build_parser(chosen: str | None = None) -> argparse.ArgumentParser:
    """The parser; only the ``chosen`` stage's module is imported (for its config flags),
    so ``vlselect --help`` imports no stage, and neither Ray nor torch."""
    parser = argparse.ArgumentParser(
        prog="vlselect",
        description="Select the training subset of a vision-language instruction pool, on Ray.",
    )
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for name, stage in STAGES.items():
        module = stage.load() if name == chosen else None
        p = sub.add_parser(
            name,
            help=stage.summary,
            description=module.__doc__ if module else stage.summary,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        _common_flags(p, stage)
        if module is not None:
            add_config_flags(p, module.CONFIG, getattr(module, "FLAGS", {}))
    return parser


def resolve_config(module: ModuleType, args: argparse.Namespace, ws: Workspace):
    stage = args.stage
    layers = [ws.read_config() if ws.exists() else {}]
    if args.config:
        data = load_yaml_file(args.config, sections=[*STAGES, "pipeline"])
        if "pipeline" in data:  # a pipeline config: its steps are the run stage's
            data = {**data, "run": {**(data.get("run") or {}), "steps": data.pop("pipeline")}}
        layers.append(data)
    layers.append({stage: parse_set_overrides(args.set)})
    layers.append({stage: overrides(args, module.CONFIG)})
    return build_config(stage, module.CONFIG, *layers)


def _chosen_stage(argv: list[str]) -> str | None:
    """The stage named on the command line (its first word that is one), if any."""
    return next((a for a in argv if a in STAGES), None)


def main(argv: list[str] | None = None) -> int:
    from jobs.runtime import (
        check_workspace_shared,
        configure_logging,
        connect,
        quiet_ray_data_console,
        set_address,
    )

    install_warning_filters()  # before the stages import their libraries
    quiet_ray_data_console()
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(_chosen_stage(argv)).parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    module = STAGES[args.stage].load()
    try:
        ws = Workspace.open(args.workspace or module.DEFAULT_WORKSPACE)
        cfg = resolve_config(module, args, ws)
        set_address(args.address, worker_logs=args.worker_logs)
        if STAGES[args.stage].needs_workspace and (args.address or os.environ.get("RAY_ADDRESS")):
            connect()  # a cluster: every node must see a local workspace path
            check_workspace_shared(ws)
        module.main(cfg, ws)
    except InputError as err:
        print(f"vlselect {args.stage}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"vlselect {args.stage}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the CLI's last line of defence
        disk = storage_error(err)
        if disk is not None:
            code, detail = disk
            where = args.workspace or module.DEFAULT_WORKSPACE
            print(
                f"vlselect {args.stage}: failed: a write failed: {STORAGE_ERRORS[code]} "
                f"({detail}). Free space or make the disk writable (the workspace is {where}; "
                "Ray's temporary files are under RAY_TMPDIR, else /tmp), then run the same "
                "command again: finished shards are kept, and nothing the failed run left "
                "unfinished is taken for finished (artifacts are written under temporary "
                "attempts, published by a manifest written last).",
                file=sys.stderr,
            )
            return 1
        if isinstance(err, OSError) and "NETWORK_CONNECTION" in str(err):
            print(
                f"vlselect {args.stage}: failed: the object store cannot be reached ({err}). "
                "Check the URI's endpoint_override and scheme, the network and the "
                "credentials, then run the same command again: it resumes.",
                file=sys.stderr,
            )
            return 1
        traceback.print_exc()
        print(f"vlselect {args.stage}: failed: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
