"""The ``vlselect`` command line: one subcommand per stage, each also ``python -m jobs.<stage>``.

Every subcommand takes ``--workspace``, ``--config FILE.yaml``, ``--set KEY=VALUE``
and ``--address``. Configuration layers, later wins: the stage's defaults, the
workspace's ``vlselect.yaml``, ``--config``, ``--set``, then the stage's own flags.

Exit codes: 0 success, 2 bad input or config (one message, nothing written),
1 a failure during the run, 130 interrupted. A workspace that is full or read-only
(ENOSPC, EDQUOT, EROFS, EFBIG) is a failure during the run, told in one message
without a traceback: stages write under temporary names and rename when complete,
so what the failed run left is never taken for finished, and a rerun resumes.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import re
import sys
import traceback
from types import ModuleType

from engine.config import build_config, load_yaml_file, parse_set_overrides
from engine.errors import InputError
from engine.warning_filters import install as install_warning_filters
from engine.workspace import Workspace
from jobs.runtime import configure_logging, quiet_ray_data_console, set_address

STAGE_MODULES = {
    "world": "jobs.world",
    "ingest": "jobs.ingest",
    "embed": "jobs.embed",
    "skills": "jobs.skills",
    "cluster": "jobs.cluster",
    "index": "jobs.index",
    "search": "jobs.search",
    "target": "jobs.target",
    "base": "jobs.base",
    "progress": "jobs.progress",
    "demo": "jobs.demo",
    "bench": "jobs.bench",
}
DESCRIPTIONS = {
    "world": "generate the shapes world (the embedded default pool) into a workspace",
    "ingest": "LLaVA JSON / JSONL / Parquet -> <ws>/pool, bad records -> <ws>/rejects",
    "embed": "pool -> <ws>/embeddings/<space> (clip, dino, text; skill from <ws>/skills)",
    "skills": "an LLM names the visual skills each question needs -> <ws>/skills (cached, resumable)",
    "cluster": "spherical k-means over embedding spaces -> <ws>/clusters/<name>",
    "index": "a space's vectors -> sharded FAISS indexes in <ws>/index/<space> (resumable)",
    "search": "nearest pool ids of a .npy file of query vectors, through the shard actors",
    "target": "select for benchmarks: predict concept or skill from cross-ranks, then retrieve",
    "base": "build (or reuse) the tiny LLaVA's base, cached in <ws>/models/<name>",
    "progress": "PROGRESS: a LoRA fine-tune (Ray Train, DeepSpeed) that selects its own data online",
    "demo": "the whole pipeline on the embedded default",
    "bench": "the throughput suite: every stage at pool sizes from --sizes, beside its reference",
}


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlselect",
        description="Select the training subset of a vision-language instruction pool, on Ray.",
    )
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for stage, module_name in STAGE_MODULES.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(
            stage,
            help=DESCRIPTIONS[stage],
            description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        ws_flags = ["--workspace"] + (["--out"] if stage == "world" else [])
        p.add_argument(
            *ws_flags,
            dest="workspace",
            required=stage not in ("demo", "bench"),
            default=None,
            help="workspace directory or URI",
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
        module.add_arguments(p)
    return parser


def resolve_config(module: ModuleType, args: argparse.Namespace, ws: Workspace):
    stage = module.STAGE
    layers = [ws.read_config() if ws.exists() else {}]
    if args.config:
        layers.append(load_yaml_file(args.config))
    layers.append({stage: parse_set_overrides(args.set)})
    layers.append({stage: module.overrides_from_args(args)})
    return build_config(stage, module.CONFIG, *layers)


def main(argv: list[str] | None = None) -> int:
    install_warning_filters()  # before the stages import their libraries
    quiet_ray_data_console()
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    module = importlib.import_module(STAGE_MODULES[args.stage])
    try:
        ws = Workspace.open(args.workspace or module.DEFAULT_WORKSPACE)
        cfg = resolve_config(module, args, ws)
        set_address(args.address, worker_logs=args.worker_logs)
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
                "names and renamed when complete).",
                file=sys.stderr,
            )
            return 1
        traceback.print_exc()
        print(f"vlselect {args.stage}: failed: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
