"""vLLM's own offline loop: the bare reference of benchmarks/skills_vllm.py. Runs in the
vLLM environment (.venv-llm), imports nothing of vlselect.

    .venv-llm/bin/python benchmarks/vllm_offline.py MODEL PROMPTS.json COUNTS OUT.json

PROMPTS.json: a list of chat message lists. COUNTS: comma-separated prompt counts; for each,
``LLM.chat`` answers the first COUNT prompts greedily in one call, timed. The engine is
built once and warmed up first (its start is not timed). Writes, per count, the seconds,
the questions and the generated tokens.
"""

from __future__ import annotations

import json
import os
import sys
import time


def main() -> None:
    model, prompts_path, counts, out = sys.argv[1:5]
    from vllm import LLM, SamplingParams

    with open(prompts_path) as f:
        prompts = json.load(f)
    max_tokens = int(os.environ.get("MAX_TOKENS", "32"))
    max_model_len = int(os.environ.get("MAX_MODEL_LEN", "2048"))
    t0 = time.perf_counter()
    # the settings of configs/skills-vllm-cpu.yaml's engine
    llm = LLM(
        model=model,
        max_model_len=max_model_len,
        dtype="float32",
        enable_prefix_caching=True,
        enforce_eager=True,
    )
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    load_seconds = time.perf_counter() - t0
    llm.chat(prompts[:4], params, use_tqdm=False)  # warm-up
    runs = []
    for count in (int(c) for c in counts.split(",")):
        # each count from an empty prefix cache, as a fresh processor's engine starts
        llm.reset_prefix_cache()
        start = time.perf_counter()
        outputs = llm.chat(prompts[:count], params, use_tqdm=False)
        seconds = time.perf_counter() - start
        tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
        runs.append({"questions": count, "seconds": seconds, "tokens": tokens})
    with open(out, "w") as f:
        json.dump({"load_seconds": load_seconds, "runs": runs}, f)


if __name__ == "__main__":
    main()
